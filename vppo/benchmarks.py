"""The evaluation benchmarks of the paper (docs/algorithm.md section 6), loaded from local files.

    names = resolve_names("all")                     # the eight paper benchmarks, Table 1 order
    bench = load_benchmark("geo3k", "data/eval")     # -> Benchmark(name, problems, files, ...)

Where a benchmark is found, tried in this order (docs/data.md has one paragraph per source):

1. `paths[name]`: a benchmark's own release given one by one (`--benchmark-path NAME=PATH`), read by
   its module in vppo.datasets.
2. The authors' layout (vppo.datasets.papo_eval): DIR is a PAPO-Eval checkout holding the `data/`
   folder of chamber111/VPPO-Eval, or that `data/` folder itself; the benchmark is the
   `data/dataset_info.json` entry with its real name (`hiyouga_geometry3k`, `AI4Math_MathVerse`,
   `AI4Math_MathVerse_vision_dependent` (the benchmark `mathverse_vision_dependent`),
   `We-Math_We-Math`, `lscpku_LogicVista`, `MMMU_MMMU_Pro`, `PAPO_MMK12`, `DynaMath_DynaMath_Sample`,
   `MathLLMs_MathVision`), or an entry named like the benchmark optionally followed by a split or
   subset ("We-Math", "wemath_test", "MathVerse-testmini-vision-only"); an exact name wins, several
   others are an error listing them.
3. The benchmark's own release (Hub / GitHub) in DIR/<FOLDER>, the folder name
   `hf download <repo> --local-dir <FOLDER>` gives (geometry3k, MathVerse, We-Math, LogicVista,
   MMMU_Pro, MMK12, DynaMath_Sample, MathVision), read by its module in vppo.datasets with its
   default split / config / version (`splits[name]` overrides it).
4. The training schema (`problem` with `<image>` placeholders, `answer`, `images`) in parquet:
   `DIR/<name>.parquet` or a folder `DIR/<name>/` (its `test` split when the files name splits).

The ninth benchmark, "synth", is the synthetic test split (vppo.synth) unless DIR holds one of its
own. Every problem keeps its row index in the source (`Problem.meta["row"]`): the evaluation
derives its sampling seed from it, so a benchmark with a skipped broken row seeds the others the
same way as before. A broken row is skipped, counted and named with its reason (`Benchmark.broken`);
a benchmark whose every image is missing is an error.
"""

from __future__ import annotations

import difflib
import json
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from vppo import synth
from vppo.data import PROMPT_SUFFIX, BrokenRowWarning, LoadStats, Problem, load_problems
from vppo.datasets import RELEASES, RawRows, answer_kind, papo_eval
from vppo.datasets.mathverse import VISION_DEPENDENT
from vppo.datasets.papo_eval import unbox  # noqa: F401 - part of this module's API (tests, callers)

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
    "mathverse_vision_dependent": "MathVerse-VD",
    "synth": "synth",
}
PAPER_BENCHMARKS = tuple(k for k in TITLES if k not in ("synth", "mathverse_vision_dependent"))
# The entry names of the authors' data/dataset_info.json (PAPO-Eval + chamber111/VPPO-Eval).
ENTRY_NAMES = {
    "geo3k": "hiyouga_geometry3k",
    "mathverse": "AI4Math_MathVerse",
    "mathverse_vision_dependent": "AI4Math_MathVerse_vision_dependent",
    "wemath": "We-Math_We-Math",
    "logicvista": "lscpku_LogicVista",
    "mmmu_pro": "MMMU_MMMU_Pro",
    "mmk12": "PAPO_MMK12",
    "dynamath": "DynaMath_DynaMath_Sample",
    "mathvision": "MathLLMs_MathVision",
}
# Other names of a benchmark (normalised form -> key): the hub's hiyouga/geometry3k, the authors'
# entry names, the Hub repositories' names.
ALIASES = {
    "geometry3k": "geo3k",
    "mathversevd": "mathverse_vision_dependent",  # its title
    **{re.sub(r"[^a-z0-9]", "", v.lower()): k for k, v in ENTRY_NAMES.items()},
    **{
        re.sub(r"[^a-z0-9]", "", m.SOURCE.lower()): k
        for k, m in RELEASES.items()
        if k != "mathverse_vision_dependent"
    },
}

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
    layout: str  # "sharegpt" | "alpaca" (the authors' layout) | "release" | "parquet" | "synth"
    stats: LoadStats = field(default_factory=LoadStats)
    image_dir: Path | None = None
    skipped_in_limit: int = 0  # with `limit`: rows skipped before the kept problems (a broken row 3
    # of --limit 5 means rows 0-5 were read to keep 5)
    source: dict[str, Any] = field(default_factory=dict)  # what was read and why (split, entry, schema)
    broken: list[str] = field(default_factory=list)  # "row N: reason" of every skipped row

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
# names in the authors' layout


def _names(key: str) -> list[str]:
    return [normalize(key)] + [a for a, k in ALIASES.items() if k == key]


def _entry_matches(entry: str, key: str) -> bool:
    """An entry or file name names benchmark `key` when it normalises to the key or an alias of it,
    optionally followed by a split or subset ("geo3k_test", "MathVerse-testmini-vision-only")."""
    norm = normalize(entry)
    return any(norm.startswith(n) for n in _names(key))


def find_entry(info: dict, key: str, info_path: Path | None) -> str | None:
    """The dataset_info entry for benchmark `key`: an exact (normalised) name first, then
    name+split. An entry that is exactly another benchmark's name never matches by prefix
    (`AI4Math_MathVerse_vision_dependent` is not MathVerse). Several matches are an error."""
    exact = [e for e in info if normalize(e) in _names(key)]
    if exact:
        return exact[0]
    others = {n for k in TITLES if k != key for n in _names(k)}
    hits = [e for e in info if _entry_matches(e, key) and normalize(e) not in others]
    if len(hits) > 1:
        raise ValueError(
            f"benchmarks: {key!r} matches several entries of {info_path}: {hits}; name one of them "
            "exactly (--benchmarks accepts entry names), or keep one file per benchmark"
        )
    return hits[0] if hits else None


def sharegpt_rows(records: list[dict], entry: dict, where: str) -> list[dict]:
    """ShareGPT / alpaca records -> training-schema rows, image paths as written
    (vppo.datasets.papo_eval.records_to_rows)."""
    return papo_eval.records_to_rows(records, entry, where, None).rows


def load_authors(key: str, data_dir: Path, *, strict: bool = False) -> Benchmark | None:
    """Benchmark `key` from the authors' layout in DIR (DIR or DIR/data holding dataset_info.json),
    or None when there is no such file or no entry for it."""
    info_file = papo_eval.info_path(data_dir)
    if info_file is None:
        return None
    name = find_entry(papo_eval.read_info(info_file), key, info_file)
    if name is None:
        return None
    try:
        raw, formatting = papo_eval.read(info_file, name)
    except ValueError as e:
        raise ValueError(f"benchmark {TITLES[key]}: {e}") from e
    return _benchmark(key, raw, formatting, strict=strict, image_dir=info_file.parent)


# ----------------------------------------------------------------------------------------------------
# the benchmarks' own releases


def _release_folder(key: str, data_dir: Path) -> Path | None:
    """DIR/<FOLDER> of the benchmark's module (the name `hf download --local-dir` gives; case and
    `-`/`_` ignored)."""
    want = normalize(RELEASES[key].FOLDER)
    hits = [p for p in sorted(data_dir.iterdir()) if p.is_dir() and normalize(p.name) == want]
    return hits[0] if hits else None


def load_release(key: str, path: Path, *, split: str | None = None, strict: bool = False) -> Benchmark:
    """Benchmark `key` from its own release at `path` (a folder as downloaded, or one file)."""
    module = RELEASES[key]
    kw = {"versions": VISION_DEPENDENT} if key == "mathverse_vision_dependent" else {}
    try:
        raw = module.read(path, split, **kw)
    except (ValueError, OSError) as e:
        raise ValueError(f"benchmark {TITLES[key]} ({module.SOURCE} release at {path}): {e}") from e
    return _benchmark(key, raw, "release", strict=strict, image_dir=path if path.is_dir() else path.parent)


def _benchmark(key: str, raw: RawRows, layout: str, *, strict: bool, image_dir: Path | None) -> Benchmark:
    """RawRows -> Benchmark: vppo.data checks every row (text, answer, placeholders, every image
    decodes); each skipped row is named with its reason."""
    title = TITLES[key]
    if strict and raw.broken:
        i, reason = next(iter(sorted(raw.broken.items())))
        raise ValueError(f"benchmark {title}: broken row {i}: {reason}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BrokenRowWarning)  # warned below, with the reasons
        loaded = load_problems(raw.rows, id_key="row", strict=False)
    kept = {p.meta["row"] for p in loaded}
    reasons = dict(raw.broken)
    for r in raw.rows:
        if r["row"] not in kept and r["row"] not in reasons:
            try:
                load_problems([r], id_key="row", strict=True)
                reasons[r["row"]] = "skipped"  # not reached: a row that loads alone loads in the set
            except ValueError as e:
                reasons[r["row"]] = str(e).split(": ", 1)[-1]
    broken = [f"row {i}: {reasons[i]}" for i in sorted(reasons)]
    if strict and broken:
        raise ValueError(f"benchmark {title}: broken {broken[0]}")
    loaded.stats.broken, loaded.stats.first_broken = len(broken), broken[0] if broken else None
    if broken:
        warnings.warn(
            f"benchmark {title}: skipped {len(broken)} broken row(s) of {len(raw.rows)}; "
            f"the first: {broken[0]}",
            BrokenRowWarning,
            stacklevel=3,
        )
    images_lost = [b for b in broken if any(w in b for w in ("image file", "does not decode", "no image"))]
    if images_lost and not any(p.images for p in loaded):
        raise ValueError(
            f"benchmark {title}: every image is missing or unreadable ({len(images_lost)} rows; the "
            f"first: {images_lost[0]}); a text-only evaluation of a visual benchmark is not run"
        )
    problems = [replace(p, uid=f"{key}[{p.meta['row']}]") for p in loaded]
    source = {"layout": layout, **raw.choice}
    return Benchmark(key, problems, raw.files, layout, loaded.stats, image_dir, source=source, broken=broken)


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
    source = {"layout": "parquet", "split": "test" if src.is_dir() else None, "schema": "the training schema"}
    return Benchmark(
        key, problems, files, "parquet", loaded.stats, src if src.is_dir() else src.parent, source=source
    )


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
    source = {"layout": "synth", "split": "test", "schema": "vppo.synth"}
    return Benchmark("synth", problems, [src], "synth", loaded.stats, None, source=source)


def load_benchmark(
    name: str,
    data_dir: str | Path | None,
    *,
    strict: bool = False,
    limit: int | None = None,
    paths: dict[str, str | Path] | None = None,
    splits: dict[str, str] | None = None,
) -> Benchmark:
    """Load one benchmark by name (where it is looked for: the module docstring).

    paths: benchmark key -> its own release (a folder as downloaded, or one file), read first.
    splits: benchmark key -> the split / config / variants of its own release (module defaults).
    Raises ValueError naming the benchmark and what was looked for when nothing is found.
    `limit` keeps the first `limit` problems (by row); `skipped_in_limit` counts the broken rows
    passed over to reach them.
    """
    key = canonical(name)
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    paths = {canonical(k): Path(v).expanduser() for k, v in (paths or {}).items()}
    splits = {canonical(k): v for k, v in (splits or {}).items()}
    for k in set(paths) | set(splits):
        if k not in RELEASES:
            raise ValueError(
                f"benchmark {TITLES[k]} has no release of its own to read (known: {sorted(RELEASES)})"
            )
    bench = None
    if key in paths:
        bench = load_release(key, paths[key], split=splits.get(key), strict=strict)
    elif data_dir is not None:
        d = Path(data_dir).expanduser()
        if not d.is_dir():
            raise ValueError(f"data_dir {d} is not a folder")
        bench = load_authors(key, d, strict=strict)
        folder = _release_folder(key, d) if bench is None and key in RELEASES else None
        if folder is not None:
            bench = load_release(key, folder, split=splits.get(key), strict=strict)
        if bench is None:
            bench = load_parquet(key, d, strict=strict)
    if bench is None and key == "synth":
        bench = load_synth()
    if bench is None:
        if data_dir is None:
            raise ValueError(f"benchmark {TITLES[key]}: no data_dir given (nor --benchmark-path)")
        folder = f", for its release in a folder {RELEASES[key].FOLDER}/" if key in RELEASES else ""
        raise ValueError(
            f"benchmark {TITLES[key]} not found in {data_dir}: looked for the dataset_info.json entry "
            f"{ENTRY_NAMES.get(key, key)!r} (in DIR or DIR/data){folder} and for {key}.parquet or a "
            f"{key}/ folder of training-schema parquet" + _listing(Path(data_dir))
        )
    if key in splits and bench.layout != "release":
        raise ValueError(
            f"--split {key}={splits[key]}: a split of the benchmark's own release, but {bench.title} was "
            f"read from {bench.layout} files {[str(f) for f in bench.files]}, which hold one split"
        )
    if limit is not None and len(bench.problems) > limit:
        bench.problems = bench.problems[:limit]
        # rows (broken, or a source without row indices) passed over to reach the limit
        bench.skipped_in_limit = bench.problems[-1].meta["row"] + 1 - limit
    elif limit is not None:
        bench.skipped_in_limit = bench.stats.rows - len(bench.problems)
    if not bench.problems:
        raise ValueError(
            f"benchmark {bench.title}: no usable problems in {[str(f) for f in bench.files]}"
            + (f" ({len(bench.broken)} broken rows; the first: {bench.broken[0]})" if bench.broken else "")
        )
    return bench


def _listing(d: Path) -> str:
    info = papo_eval.info_path(d)
    if info is not None:
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
            "source": b.source,
            "problems": len(b.problems),
            "rows_read": b.stats.rows,
            "broken": b.stats.broken,
            "first_broken": b.stats.first_broken,
            "broken_rows": b.broken[:50],
            "skipped_in_limit": b.skipped_in_limit,
            "non_string_answers": b.stats.non_string_answers,
            "first_non_string": b.stats.first_non_string,
            "files": [str(f) for f in b.files],
        }
        for b in benchmarks
    ]


# ----------------------------------------------------------------------------------------------------
# the data check (python -m vppo.eval --check-data): no model


# Qwen2-VL's image processor (smart_resize) refuses an image whose long side is more than 200 times
# its short side; the evaluation skips such a row (vppo.eval), the check names it beforehand.
MAX_ASPECT_RATIO = 200


def check_benchmark(bench: Benchmark, suffix: str | None = PROMPT_SUFFIX) -> dict[str, Any]:
    """What --check-data prints for one loaded benchmark: files, rows, broken rows and why, images,
    answer kinds, one prompt as the model reads it (before the chat template)."""
    kinds = Counter(answer_kind(p.answer) for p in bench.problems)
    wide = [
        f"{p.uid}: image {j} is {w}x{h}"
        for p in bench.problems
        for j, (w, h) in enumerate(p.image_sizes)
        if max(w, h) > MAX_ASPECT_RATIO * max(min(w, h), 1)
    ]
    first = bench.problems[0]
    prompt = first.problem.strip() + (f"\n\n{suffix}" if suffix else "")
    return {
        "name": bench.name,
        "title": bench.title,
        "layout": bench.layout,
        "source": bench.source,
        "files": [str(f) for f in bench.files],
        "rows": bench.stats.rows,
        "problems": len(bench.problems),
        "broken": bench.broken or ([bench.stats.first_broken] if bench.stats.first_broken else []),
        "broken_count": bench.stats.broken,
        "images": sum(len(p.images) for p in bench.problems),
        "problems_with_images": sum(bool(p.images) for p in bench.problems),
        "answer_kinds": dict(sorted(kinds.items())),
        "aspect_ratio_over_200": wide,
        "prompt": {"uid": first.uid, "text": prompt, "answer": first.answer},
    }


def check_report(checks: list[dict[str, Any]], errors: dict[str, str]) -> str:
    """The --check-data text: one block per benchmark, errors last."""
    out = []
    for c in checks:
        src = ", ".join(f"{k}={v}" for k, v in c["source"].items() if k not in ("schema", "layout"))
        out += [
            f"== {c['title']} ({c['name']}): {c['layout']} layout; {src}",
            f"   schema: {c['source'].get('schema', '-')}",
            "   files: " + ", ".join(c["files"]),
            f"   rows {c['rows']}, problems {c['problems']}, broken {c['broken_count']}, images "
            f"{c['images']} (in {c['problems_with_images']} problems), answers "
            + ", ".join(f"{k} {v}" for k, v in c["answer_kinds"].items()),
        ]
        out += [f"   broken {b}" for b in c["broken"][:10]]
        if len(c["broken"]) > 10:
            out.append(f"   ... and {len(c['broken']) - 10} more broken rows")
        out += [
            f"   refused by Qwen2-VL's processor (aspect ratio > 200): {w}"
            for w in c["aspect_ratio_over_200"][:5]
        ]
        p = c["prompt"]
        out += [f"   prompt of {p['uid']} (answer {p['answer']!r}):"]
        out += ["   | " + line for line in p["text"].splitlines()]
    for name, err in errors.items():
        out.append(f"== {TITLES.get(name, name)} ({name}): ERROR {err}")
    return "\n".join(out) + "\n"
