"""Compare two metrics.jsonl files key by key, timing keys left out (docs/parity/README.md).

python docs/parity/compare_records.py A.jsonl B.jsonl
"""

import json
import sys

TIMING = ("step_seconds", "tokens_per_second")


def main(path_a: str, path_b: str) -> None:
    a = [json.loads(line) for line in open(path_a)]
    b = [json.loads(line) for line in open(path_b)]
    n = min(len(a), len(b))
    diffs: dict[str, list] = {}  # key -> [records differing, max |a - b|, first step]
    for ra, rb in zip(a[:n], b[:n]):
        if ra["step"] != rb["step"]:
            raise ValueError(f"step {ra['step']} of {path_a} faces step {rb['step']} of {path_b}")
        for k in sorted(set(ra) | set(rb)):
            if k.startswith("time_") or k in TIMING or ra.get(k) == rb.get(k):
                continue
            d = diffs.setdefault(k, [0, 0.0, ra["step"]])
            d[0] += 1
            try:
                d[1] = max(d[1], abs(ra[k] - rb[k]))
            except (KeyError, TypeError):  # a key only one side has
                d[1] = float("nan")
    print(f"compared {n} records; keys differing (count, max abs diff, first step): {diffs or 'none'}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
