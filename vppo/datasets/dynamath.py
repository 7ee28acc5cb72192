"""DynaMath as DynaMath/DynaMath_Sample releases it on the Hub (the VPPO README's DynaMath link).

Schema (dataset card of DynaMath/DynaMath_Sample: ten splits `sample_variant1` ...
`sample_variant10`, files `data/sample1-*.parquet` ... `data/sample10-*.parquet`, 501 seed
questions each): `id`, `question` (multiple-choice questions carry their options inside the
text), `image` (a path string), `decoded_image` (an image struct {"bytes", "path"}),
`ground_truth` (the answer: a capital letter for multiple choice, else a number or expression),
`answer_type`, `subject`, `knowledge_level`. A row becomes `<image>` + question, the answer
`ground_truth`; the image is `decoded_image` (`image` when that is empty).

Default: all ten variants, variant-major (5,010 problems): DynaMath's own average-case accuracy is
taken over the ten variants. The VPPO README says the authors filtered DynaMath to verifiable,
exact-match instances (their file ships in chamber111/VPPO-Eval as `DynaMath_DynaMath_Sample`); the
filter is not published. `--split dynamath=1,2` reads only those variants.
"""

from __future__ import annotations

import re
from pathlib import Path

from vppo.datasets import (
    RawRows,
    convert_rows,
    image_value,
    text_of,
    with_image,
)

KEY = "dynamath"
SOURCE = "DynaMath/DynaMath_Sample"
FOLDER = "DynaMath_Sample"
SCHEMA = (
    "DynaMath/DynaMath_Sample dataset card: data/sample{1..10}-*.parquet with question, decoded_image, "
    "ground_truth"
)
DEFAULT_SPLIT = ",".join(str(v) for v in range(1, 11))


def _variant_files(path: Path, variants: list[int]) -> list[tuple[int, Path]]:
    if path.is_file():
        m = re.match(r"sample(\d+)", path.name)
        return [(int(m.group(1)) if m else 0, path)]
    if not path.is_dir():
        raise ValueError(f"{path} does not exist")
    found: dict[int, list[Path]] = {}
    for f in sorted(path.rglob("*.parquet")):
        m = re.match(r"sample(?:_variant)?(\d+)[-_.]", f.name)
        if m:
            found.setdefault(int(m.group(1)), []).append(f)
    missing = [v for v in variants if v not in found]
    if missing:
        raise ValueError(
            f"{path}: no file of variant(s) {missing} (expected data/sample<N>-*.parquet; variants "
            f"there: {sorted(found)})"
        )
    return [(v, f) for v in variants for f in found[v]]


def read(path: Path, split: str | None = None) -> RawRows:
    spec = split or DEFAULT_SPLIT
    try:
        variants = [int(v.removeprefix("sample_variant").removeprefix("sample")) for v in spec.split(",")]
    except ValueError as e:
        raise ValueError(f"DynaMath variants must be numbers 1-10 (e.g. '1,2'), got {spec!r}") from e
    pairs = _variant_files(path, variants)
    variant_of = {f: variant for variant, f in pairs}  # a file holds one variant (its name says which)
    base = [path] if path.is_dir() else []

    def convert(rec: dict, f: Path) -> tuple[str, list, str]:
        text = with_image(text_of(rec, "question"))
        image = image_value(rec["decoded_image"] or rec.get("image"), [f.parent, *base])
        return text, [image], rec["ground_truth"]

    files = [f for _, f in pairs]
    rows, broken = convert_rows(
        files,
        ("question", "decoded_image", "ground_truth"),
        SCHEMA,
        convert,
        consumed=("question", "decoded_image", "ground_truth", "image"),
        extra=lambda f: {"variant": variant_of[f]},
    )
    choice = {"source": SOURCE, "variants": variants, "schema": SCHEMA}
    return RawRows(rows, files, choice, broken)
