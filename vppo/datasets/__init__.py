"""Data sources, one module per published format: rows in the training schema, ready for vppo.data.

    from vppo.datasets import RELEASES
    raw = RELEASES["mathverse"].read(Path("data/eval/MathVerse"), split=None)  # -> RawRows
    problems = load_problems(raw.rows, id_key="row")                            # vppo.data

The benchmark modules (geo3k, mathverse, mathvision, dynamath, wemath, logicvista, mmmu_pro, mmk12)
each read one benchmark's own release, as `hf download <repo> --local-dir <FOLDER>` leaves it, and
papo_eval reads the authors' evaluation layout (xhguo7/PAPO-Eval's `data/dataset_info.json` with
ShareGPT JSON files, as chamber111/VPPO-Eval ships them). Every module's docstring cites the schema
it reads and says how a row becomes a problem; what could not be confirmed from a published source
is said there too. Training-format modules (ViRL39K's raw release and others) live in this package
beside them and are not listed here.

A benchmark module has KEY (the canonical benchmark key of vppo.benchmarks), SOURCE (the Hub or
GitHub repository), FOLDER (the folder name `hf download` gives, the repository name), SCHEMA (the
published schema it reads), DEFAULT_SPLIT (the split / config / variant set read unless told
otherwise, and why) and `read(path, split) -> RawRows`. A row it cannot convert (a missing value, an
image it cannot find) is kept with the reason in `RawRows.broken`, never dropped silently; an unknown
column set or a folder without the chosen split is a ValueError naming the file and what was found.
"""

from __future__ import annotations

import ast
import csv
import json
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from vppo.data import IMAGE_PLACEHOLDER, answer_kind  # noqa: F401  (answer_kind: one rule for every check)

TABLE_SUFFIXES = (".parquet", ".json", ".jsonl", ".csv")


@dataclass
class RawRows:
    """A benchmark's rows in the training schema and where they came from.

    rows: {"problem" (text with one `<image>` per image), "answer", "images" (encoded bytes, a
        {"bytes", "path"} dict or an absolute path), "row" (index in the source order; seeds the
        evaluation), plus the source's own meta columns}; a row that could not be converted has an
        empty "problem" and its reason in `broken`.
    files: the files read (hashed into the evaluation manifest).
    choice: what was read and why (split / config / version filter, the schema), for the manifest.
    """

    rows: list[dict]
    files: list[Path]
    choice: dict[str, Any]
    broken: dict[int, str] = field(default_factory=dict)  # row -> reason


def broken_row(i: int, reason: str, broken: dict[int, str]) -> dict:
    """A placeholder for row `i` that vppo.data counts as broken; the reason goes into `broken`."""
    broken[i] = reason
    return {"problem": "", "answer": "", "images": [], "row": i}


# ----------------------------------------------------------------------------------------------------
# reading tables


def read_table(path: Path) -> list[dict]:
    """Records of a parquet, JSON (a list, or a dict keyed by id: each value gets its key as `id`),
    JSON lines or CSV file, in file order."""
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        try:
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not JSON lines: {e}") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if isinstance(data, dict) and data and all(isinstance(v, dict) for v in data.values()):
        return [{"id": k, **v} for k, v in data.items()]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ValueError(f"{path} must hold a list of records or a dict of records keyed by id")
    return data


def require_columns(records: list[dict], need: Iterable[str], where: Path, schema: str) -> None:
    """ValueError naming the file, the columns it has and the schema expected, when a column is missing."""
    if not records:
        raise ValueError(f"{where} holds no rows")
    have = set(records[0])
    missing = [c for c in need if c not in have]
    if missing:
        raise ValueError(
            f"{where}: unknown column set {sorted(have)}; missing {missing} of the schema it should "
            f"follow ({schema})"
        )


def split_files(folder: Path, split: str, *, suffixes: Sequence[str] = TABLE_SUFFIXES) -> list[Path]:
    """The table files of `split` under `folder`: files named `<split>.<ext>`, `<split>-*` or
    `<split>_*`, or any file inside a `<split>/` folder. ValueError listing the files found when
    none is of this split (a benchmark folder with no test split is an error, not a silent pick)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in suffixes)

    def of_split(p: Path) -> bool:
        rel = p.relative_to(folder)
        stem = p.name[: -len(p.suffix)]
        return stem == split or stem.startswith((f"{split}-", f"{split}_")) or split in rel.parts[:-1]

    chosen = [p for p in files if of_split(p)]
    if not chosen:
        found = [str(p.relative_to(folder)) for p in files][:20]
        raise ValueError(f"{folder}: no file of split {split!r} (table files there: {found})")
    return chosen


def release_files(path: Path, split: str) -> list[Path]:
    """`path` itself when it is a file (its split is what it holds), else its files of `split`."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ValueError(f"{path} does not exist")
    return split_files(path, split)


def convert_rows(
    files: Iterable[Path],
    need: Sequence[str],
    schema: str,
    convert: Callable[[dict, Path], tuple[str, list, Any]],
    *,
    consumed: Collection[str] | Callable[[str], bool],
    keep: Callable[[dict], bool] | None = None,
    extra: Callable[[Path], dict] | None = None,
) -> tuple[list[dict], dict[int, str]]:
    """The rows and broken reasons of a benchmark's table files: the loop every benchmark module
    shares, so that each module says only how one of its records becomes a problem.

    Each file is read (read_table) and its columns checked against `need` (require_columns, naming
    `schema`). Each record that `keep` accepts (every record without `keep`; a skipped one gets no
    row index) becomes the next row, its "row" counted across all the files: `convert(rec, file)`
    gives its (problem text, images, answer), and the record's columns not `consumed` (a collection
    of names, or a predicate on a name) come along as meta, followed by `extra(file)` when given
    (per-file fields, as DynaMath's variant). A ValueError or FileNotFoundError from `convert` makes
    the row a broken_row with the error as its reason; any other error propagates."""
    is_consumed = consumed if callable(consumed) else frozenset(consumed).__contains__
    rows: list[dict] = []
    broken: dict[int, str] = {}
    for f in files:
        recs = read_table(f)
        require_columns(recs, need, f, schema)
        for rec in recs:
            if keep is not None and not keep(rec):
                continue
            i = len(rows)
            try:
                problem, images, answer = convert(rec, f)
            except (ValueError, FileNotFoundError) as e:
                rows.append(broken_row(i, str(e), broken))
                continue
            meta = {k: v for k, v in rec.items() if not is_consumed(k)}
            more = extra(f) if extra is not None else {}
            rows.append({**meta, **more, "problem": problem, "answer": answer, "images": images, "row": i})
    return rows, broken


# ----------------------------------------------------------------------------------------------------
# turning a row into a problem


def option_letters(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]


def fold_options(question: str, options: Sequence[str]) -> str:
    """The question with its options below it, one lettered line each:

        <question>
        Choices:
        A. <option 1>
        B. <option 2>

    The authors' converted files (PAPO-Eval / VPPO-Eval) carry the options already folded in; their
    conversion script is not published (PAPO-Eval's prepare_data.py only downloads the converted
    JSON), so this layout follows the benchmarks' own evaluation code (lmms-eval's mathvision and
    mmmu_pro doc_to_text: `A. option` lines after the question) and may differ in spacing."""
    if not options:
        return question
    lines = [f"{letter}. {str(o).strip()}" for letter, o in zip(option_letters(len(options)), options)]
    return f"{question.rstrip()}\nChoices:\n" + "\n".join(lines)


def parse_options(value: Any) -> list[str]:
    """An options column as a list: a list as is, a string holding a Python list (MMMU-Pro stores
    `"['a', 'b']"`), or an empty value as []."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    if isinstance(value, str):
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError) as e:
            raise ValueError(f"options {value[:80]!r} is not a list") from e
        if isinstance(parsed, (list, tuple)):
            return [str(v) for v in parsed]
    raise ValueError(f"options of type {type(value).__name__} is not a list")


def text_of(rec: dict, col: str) -> str:
    """The text in column `col`; ValueError (the row is broken) when it is missing or empty."""
    value = rec.get(col)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"missing or empty {col!r}")
    return value


def with_image(question: str, n_images: int = 1) -> str:
    """`<image>` in front of the text for each image it does not place itself (Qwen2.5-VL's
    template puts images before the text, as LLaMA-Factory does for records without placeholders)."""
    missing = n_images - question.count(IMAGE_PLACEHOLDER)
    return IMAGE_PLACEHOLDER * max(missing, 0) + question


def image_value(value: Any, base: Sequence[Path]) -> Any:
    """A stored image as vppo.data reads it: a {"bytes", "path"} struct with bytes, or raw bytes, as
    is; a path (a string, or a struct without bytes) resolved against the `base` folders in order.
    FileNotFoundError naming every place looked when a path resolves nowhere."""
    if isinstance(value, dict) and value.get("bytes") is not None:
        return value
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    path = value.get("path") if isinstance(value, dict) else value
    if not isinstance(path, str) or not path:
        raise ValueError(f"no image (got {type(value).__name__})")
    p = Path(path)
    if p.is_absolute():
        if not p.is_file():
            raise FileNotFoundError(f"image file {p} not found")
        return str(p)
    tried = list(dict.fromkeys(b / p for b in base))  # in order, each folder once
    hit = next((t for t in tried if t.is_file()), None)
    if hit is None:
        raise FileNotFoundError(f"image file {path!r} not found (looked at {[str(t) for t in tried]})")
    return str(hit.resolve())


# ----------------------------------------------------------------------------------------------------
# the registry (imported last: the modules use the helpers above)

from vppo.datasets import (  # noqa: E402
    dynamath,
    geo3k,
    logicvista,
    mathverse,
    mathvision,
    mmk12,
    mmmu_pro,
    wemath,
)

# benchmark key -> the module reading its own release (vppo.benchmarks.TITLES has the keys)
RELEASES = {m.KEY: m for m in (mathverse, dynamath, mmk12, geo3k, mathvision, wemath, logicvista, mmmu_pro)}
# the vision-dependent subset of MathVerse is a benchmark of its own in the authors' layout
RELEASES["mathverse_vision_dependent"] = mathverse
