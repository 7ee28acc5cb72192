"""The evaluation benchmarks of the paper (docs/algorithm.md section 6), loaded from local files.

    names = resolve_names("all")                     # the eight paper benchmarks, Table 1 order
    bench = load_benchmark("geo3k", "data/eval")     # -> Benchmark(name, problems, files, ...)

Two layouts are read, tried in this order for each benchmark:

1. The authors' evaluation layout (LLaMA-Factory style): `DIR/dataset_info.json` maps a dataset
   name to {"file_name", "formatting": "sharegpt", "columns", "tags"}; the file is a JSON list (or
   JSON lines) of records with `messages` [{"role": "user", "content": "...<image>..."},
   {"role": "assistant", "content": "<label>"}] and `images`, paths relative to DIR (LLaMA-Factory's
   media dir) or to the file's folder. Entry names match a benchmark when they normalise to it
   (case, `-`, `_` ignored), optionally followed by a split or subset: "We-Math", "wemath_test" and
   "MathVerse-testmini-vision-only" all work; an exact name wins, several others are an error.
   The `alpaca` formatting (prompt/query/response columns) is read too.
2. The training schema (`problem` with `<image>` placeholders, `answer`, `images`) in parquet:
   `DIR/<name>.parquet` or a folder `DIR/<name>/` (its `test` split when the files name splits).

The ninth benchmark, "synth", is the synthetic test split (vppo.synth) unless DIR holds one of its
own. Every problem keeps its row index in the source (`Problem.meta["row"]`): the evaluation
derives its sampling seed from it, so a benchmark with a skipped broken row seeds the others the
same way as before.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from vppo import synth
from vppo.data import IMAGE_PLACEHOLDER, PROMPT_SUFFIX, LoadStats, Problem, load_problems

# Canonical key -> display name, in the column order of the paper's Table 1; "synth" last.
TITLES = {
    "mathverse": "MathVerse",
    "dynamath": "DynaMath",
    "mmk12": "MMK12",
    "geo3k": "Geo3k",
    "mathvision": "MathVision",
    "wemath": "We-Math",
    "logicvista": "LogicVista",
    "mmmu_pro": "MMMU-Pro",
    "synth": "synth",
}
PAPER_BENCHMARKS = tuple(k for k in TITLES if k != "synth")
# Other names of a benchmark (normalised form -> key), e.g. the hub's hiyouga/geometry3k.
ALIASES = {"geometry3k": "geo3k"}

# avg@8 (%) from the paper's Table 1 (docs/algorithm.md section 6).
PAPER_RESULTS = {
    "Qwen2.5-VL-7B": {
        "mathverse": 39.0, "dynamath": 55.7, "mmk12": 42.5, "geo3k": 37.1,
        "mathvision": 18.4, "wemath": 46.4, "logicvista": 42.4, "mmmu_pro": 25.1,
    },
    "VPPO-7B": {
        "mathverse": 71.6, "dynamath": 68.1, "mmk12": 82.8, "geo3k": 46.5,
        "mathvision": 33.3, "wemath": 71.5, "logicvista": 47.9, "mmmu_pro": 37.9,
    },
}  # fmt: skip
PAPER_AVG = {"Qwen2.5-VL-7B": 38.3, "VPPO-7B": 57.5}


@dataclass
class Benchmark:
    """One benchmark's problems and where they came from (for the manifest)."""

    name: str  # canonical key, e.g. "wemath"
    problems: list[Problem]
    files: list[Path]  # the files read (hashed into the manifest)
    layout: str  # "sharegpt" | "alpaca" | "parquet" | "synth"
    stats: LoadStats = field(default_factory=LoadStats)
    image_dir: Path | None = None
    skipped_in_limit: int = 0  # with `limit`: rows skipped before the kept problems (a broken row 3
    # of --limit 5 means rows 0-5 were read to keep 5)

    @property
    def title(self) -> str:
        return TITLES.get(self.name, self.name)


def normalize(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_KEYS = {normalize(k): k for k in TITLES}


def canonical(name: str) -> str:
    """The canonical key of a benchmark name ("We-Math" -> "wemath"); ValueError with the closest."""
    norm = normalize(name)
    if norm in _KEYS:
        return _KEYS[norm]
    if norm in ALIASES:
        return ALIASES[norm]
    hit = difflib.get_close_matches(norm, list(_KEYS) + list(ALIASES), n=1, cutoff=0.5)
    hint = f" (did you mean {TITLES[_KEYS.get(hit[0]) or ALIASES[hit[0]]]!r}?)" if hit else ""
    raise ValueError(
        f"benchmarks: unknown benchmark {name!r}{hint}; known: {', '.join(TITLES.values())}, all"
    )


def resolve_names(spec: str | list[str]) -> list[str]:
    """Benchmark keys from "all", a comma-separated string or a list; "all" = the eight of the paper."""
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    parts = [p.strip() for p in parts if p.strip()]
    if not parts:
        raise ValueError("benchmarks: no benchmark named")
    out: list[str] = []
    for p in parts:
        for key in PAPER_BENCHMARKS if p.lower() == "all" else (canonical(p),):
            if key not in out:
                out.append(key)
    return out


# ----------------------------------------------------------------------------------------------------
# the authors' layout: dataset_info.json + ShareGPT (or alpaca) JSON files


def _entry_matches(entry: str, key: str) -> bool:
    """An entry or file name names benchmark `key` when it normalises to the key or an alias of it,
    optionally followed by a split or subset ("geo3k_test", "MathVerse-testmini-vision-only"). No
    name is a prefix of another benchmark's name, so a prefix cannot pick the wrong benchmark."""
    norm = normalize(entry)
    names = [normalize(key)] + [normalize(a) for a, k in ALIASES.items() if k == key]
    return any(norm.startswith(n) for n in names)


def find_entry(info: dict, key: str, info_path: Path) -> str | None:
    """The dataset_info entry for benchmark `key`: an exact (normalised) name first, then name+split."""
    exact = [e for e in info if normalize(e) == normalize(key)]
    hits = exact or [e for e in info if _entry_matches(e, key)]
    if len(hits) > 1:
        raise ValueError(
            f"benchmarks: {key!r} matches several entries of {info_path}: {hits}; "
            "rename the ones not to evaluate or keep one file per benchmark"
        )
    return hits[0] if hits else None


def _read_records(path: Path) -> list[dict]:
    """Records of a JSON list file, a JSON lines file (.jsonl, or any file that is not one JSON
    value), or a {"<key>": [...]} wrapper."""
    text = path.read_text(encoding="utf-8")
    try:
        data = None if path.suffix == ".jsonl" else json.loads(text)
    except json.JSONDecodeError:
        data = None
    if data is None:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is neither JSON nor JSON lines: {e}") from e
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ValueError(f"{path} must hold a list of records")
    return data


def unbox(label: str) -> str:
    """A label written as `\\boxed{x}` -> `x` (the grader compares the boxed content of a response
    with the bare answer). Anything else is returned stripped."""
    s = label.strip()
    m = re.fullmatch(r"\\boxed\s*\{(.*)\}", s, flags=re.S)
    if m is None:
        return s
    inner, depth = m.group(1), 0
    for ch in inner:  # only unwrap when the braces of the box close at the very end
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth < 0:
            return s
    return inner.strip() if depth == 0 else s


def _strip_suffix(text: str) -> str:
    """Drop a VPPO prompt suffix already present in the question: the loader appends it."""
    t = text.rstrip()
    return t[: -len(PROMPT_SUFFIX)].rstrip() if t.endswith(PROMPT_SUFFIX) else text


def sharegpt_rows(records: list[dict], entry: dict, where: str) -> list[dict]:
    """ShareGPT / alpaca records -> training-schema rows {"problem", "answer", "images", "row"}.

    The question is the first user turn, the label the last assistant turn (unwrapped from
    `\\boxed{}`). A record with images but no `<image>` placeholder gets them in front of the text,
    as LLaMA-Factory's Qwen2-VL template places them. Records that cannot be read are kept with an
    empty problem, so load_problems() counts them as broken rows.
    """
    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("sharegpt", "alpaca"):
        raise ValueError(f"{where}: formatting must be 'sharegpt' or 'alpaca', got {formatting!r}")
    cols, tags = entry.get("columns", {}), entry.get("tags", {})
    image_col = cols.get("images", "images")
    rows = []
    if formatting == "sharegpt":
        role, content, user, assistant = _message_tags(records, cols, tags, where)
    for i, rec in enumerate(records):
        question, label = "", ""
        if formatting == "sharegpt":
            msgs = rec.get(cols.get("messages", "conversations")) or []
            users = [m.get(content, "") for m in msgs if isinstance(m, dict) and m.get(role) == user]
            bots = [m.get(content, "") for m in msgs if isinstance(m, dict) and m.get(role) == assistant]
            question, label = (users[0] if users else ""), (bots[-1] if bots else "")
        else:
            prompt, query = (
                rec.get(cols.get("prompt", "instruction")) or "",
                rec.get(cols.get("query", "input")),
            )
            question = f"{prompt}\n{query}" if query else prompt
            label = rec.get(cols.get("response", "output")) or ""
        images = rec.get(image_col) or []
        images = [images] if isinstance(images, str) else list(images)
        question = _strip_suffix(str(question))
        if images and IMAGE_PLACEHOLDER not in question:
            question = IMAGE_PLACEHOLDER * len(images) + question
        label = unbox(label) if isinstance(label, str) else label  # load_problems counts the others
        rows.append({"problem": question, "answer": label, "images": images, "row": i})
    return rows


# (role, content, user, assistant) message keys: LLaMA-Factory's default and the OpenAI style.
MESSAGE_TAGS = (("from", "value", "human", "gpt"), ("role", "content", "user", "assistant"))


def _message_tags(records: list[dict], cols: dict, tags: dict, where: str) -> tuple[str, str, str, str]:
    """The (role, content, user, assistant) keys of the ShareGPT messages: the entry's `tags` over
    the MESSAGE_TAGS layout whose role and content keys the messages use. ValueError naming the
    keys found when neither layout fits."""
    col = cols.get("messages", "conversations")
    found = {k for r in records for m in (r.get(col) or []) if isinstance(m, dict) for k in m}
    names = ("role_tag", "content_tag", "user_tag", "assistant_tag")
    if found and "role_tag" not in tags:
        fits = [t for t in MESSAGE_TAGS if {t[0], t[1]} <= found]
        if not fits:
            raise ValueError(
                f"{where}: the {col!r} messages have keys {sorted(found)}, neither from/value nor "
                "role/content; set 'tags' (role_tag, content_tag, user_tag, assistant_tag) in the entry"
            )
        return tuple(tags.get(n, d) for n, d in zip(names, fits[0]))
    return tuple(tags.get(n, d) for n, d in zip(names, MESSAGE_TAGS[0]))


def _image_dir(rows: list[dict], candidates: list[Path]) -> Path:
    """The first candidate folder under which the first relative image path exists."""
    first = next((im for r in rows for im in r["images"] if isinstance(im, str)), None)
    if first is None or Path(first).is_absolute():
        return candidates[0]
    return next((c for c in candidates if (c / first).exists()), candidates[0])


def load_sharegpt(key: str, data_dir: Path, *, strict: bool = False) -> Benchmark | None:
    """Benchmark `key` from DIR/dataset_info.json, or None when the file has no entry for it."""
    info_path = data_dir / "dataset_info.json"
    if not info_path.is_file():
        return None
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{info_path} is not valid JSON: {e}") from e
    name = find_entry(info, key, info_path)
    if name is None:
        return None
    entry = info[name]
    if "file_name" not in entry:
        raise ValueError(f"{info_path}: entry {name!r} has no 'file_name' (hub entries are not read offline)")
    path = data_dir / entry["file_name"]
    if not path.is_file():
        raise ValueError(
            f"benchmark {TITLES[key]}: {info_path} entry {name!r} names {path}, which does not exist"
        )
    rows = sharegpt_rows(_read_records(path), entry, f"{info_path}[{name!r}]")
    image_dir = _image_dir(rows, [data_dir, path.parent])
    loaded = load_problems(rows, image_dir=image_dir, strict=strict, id_key="row")
    problems = [replace(p, uid=f"{key}[{p.meta['row']}]") for p in loaded]
    return Benchmark(
        key, problems, [info_path, path], entry.get("formatting", "alpaca"), loaded.stats, image_dir
    )


# ----------------------------------------------------------------------------------------------------
# the training schema in parquet


def _parquet_source(key: str, data_dir: Path) -> Path | None:
    candidates = [p for p in sorted(data_dir.iterdir()) if p.suffix == ".parquet" or p.is_dir()]
    for p in candidates:  # exact name first, then name + split ("geo3k_test.parquet")
        if normalize(p.stem if p.is_file() else p.name) == normalize(key):
            return p
    hits = [p for p in candidates if _entry_matches(p.stem if p.is_file() else p.name, key)]
    if len(hits) > 1:
        raise ValueError(
            f"benchmarks: {key!r} matches several sources in {data_dir}: {[h.name for h in hits]}"
        )
    return hits[0] if hits else None


def load_parquet(key: str, data_dir: Path, *, strict: bool = False) -> Benchmark | None:
    """Benchmark `key` from DIR/<key>.parquet or DIR/<key>/ (its test split), or None."""
    src = _parquet_source(key, data_dir)
    if src is None or (src.is_dir() and not any(src.rglob("*.parquet"))):
        return None
    loaded = load_problems(src, split="test", strict=strict)
    problems = [replace(p, uid=f"{key}[{_row_of(p)}]", meta={**p.meta, "row": _row_of(p)}) for p in loaded]
    files = sorted(src.rglob("*.parquet")) if src.is_dir() else [src]
    return Benchmark(key, problems, files, "parquet", loaded.stats, src if src.is_dir() else src.parent)


def _row_of(p: Problem) -> int:
    """The source row index load_problems() wrote into the uid ("name[12]" or "name[12] (id=..)")."""
    m = re.search(r"\[(\d+)\]", p.uid)
    if m is None:
        raise ValueError(f"cannot read the row index from uid {p.uid!r}")
    return int(m.group(1))


# ----------------------------------------------------------------------------------------------------
# synth and the dispatcher


def load_synth() -> Benchmark:
    """The synthetic test split (built by vppo.synth on first use, in the cache)."""
    src = Path(synth.ensure_synth_data()) / "test.parquet"
    if not src.is_file():
        raise ValueError(f"benchmark synth: {src} does not exist (rebuild with python -m vppo.synth)")
    loaded = load_problems(src)
    problems = [replace(p, uid=f"synth[{_row_of(p)}]", meta={**p.meta, "row": _row_of(p)}) for p in loaded]
    return Benchmark("synth", problems, [src], "synth", loaded.stats, None)


def load_benchmark(name: str, data_dir: str | Path | None, *, strict: bool = False, limit: int | None = None):
    """Load one benchmark by name from `data_dir` (layouts in the module docstring).

    Raises ValueError naming the benchmark and what was looked for when nothing is found.
    `limit` keeps the first `limit` problems (by row); `skipped_in_limit` counts the broken rows
    passed over to reach them.
    """
    key = canonical(name)
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    bench = None
    if data_dir is not None:
        d = Path(data_dir).expanduser()
        if not d.is_dir():
            raise ValueError(f"data_dir {d} is not a folder")
        bench = load_sharegpt(key, d, strict=strict) or load_parquet(key, d, strict=strict)
    if bench is None and key == "synth":
        bench = load_synth()
    if bench is None:
        if data_dir is None:
            raise ValueError(f"benchmark {TITLES[key]}: no data_dir given")
        raise ValueError(
            f"benchmark {TITLES[key]} not found in {data_dir}: looked for a dataset_info.json entry named "
            f"like {key!r} and for {key}.parquet or a {key}/ folder of parquet files"
            + _listing(Path(data_dir))
        )
    if limit is not None and len(bench.problems) > limit:
        bench.problems = bench.problems[:limit]
        # rows (broken, or a source without row indices) passed over to reach the limit
        bench.skipped_in_limit = bench.problems[-1].meta["row"] + 1 - limit
    elif limit is not None:
        bench.skipped_in_limit = bench.stats.rows - len(bench.problems)
    if not bench.problems:
        raise ValueError(f"benchmark {bench.title}: no usable problems in {[str(f) for f in bench.files]}")
    return bench


def _listing(d: Path) -> str:
    info = d / "dataset_info.json"
    if info.is_file():
        try:
            return f" (dataset_info.json entries: {sorted(json.loads(info.read_text()))})"
        except (json.JSONDecodeError, OSError, TypeError):
            return ""
    return f" (folder holds: {sorted(p.name for p in d.iterdir())[:20]})" if d.is_dir() else ""


def describe(benchmarks: list[Benchmark]) -> list[dict[str, Any]]:
    """One line per benchmark for logs and the manifest."""
    return [
        {
            "name": b.name,
            "title": b.title,
            "layout": b.layout,
            "problems": len(b.problems),
            "rows_read": b.stats.rows,
            "broken": b.stats.broken,
            "first_broken": b.stats.first_broken,
            "skipped_in_limit": b.skipped_in_limit,
            "non_string_answers": b.stats.non_string_answers,
            "first_non_string": b.stats.first_non_string,
            "files": [str(f) for f in b.files],
        }
        for b in benchmarks
    ]
