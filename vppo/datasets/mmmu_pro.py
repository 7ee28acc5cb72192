"""MMMU-Pro as MMMU/MMMU_Pro releases it on the Hub (the VPPO README's MMMU-Pro link).

Schema (dataset card of MMMU/MMMU_Pro; lmms-eval's `lmms_eval/tasks/mmmu_pro/utils.py` reads the
same columns): one folder per config with `test-*.parquet`:
- `standard (10 options)` and `standard (4 options)`: `id`, `question` (with `<image N>` markers
  where images belong), `options` (a STRING holding a Python list, e.g. `"['a', 'b']"`; options may
  carry `<image N>` markers too), `answer` (a capital letter), `image_1` ... `image_7` (image
  structs, unused ones null), `subject`, `explanation`, `img_type`, `topic_difficulty`. A row
  becomes the question with its options folded in (vppo.datasets.fold_options), each `<image N>`
  marker an `<image>` placeholder with `image_N` in its place (a marker used twice gives the image
  twice), the answer as stored.
- `vision`: `id`, `image` (a screenshot showing the question and its options), `options`, `answer`,
  `subject`. A row becomes `<image>` alone, as the config intends (the options are in the image).

Default config: `standard (10 options)`, MMMU-Pro's main text-and-image setting. Which config the
authors' file (`MMMU_MMMU_Pro` in PAPO-Eval / VPPO-Eval) was built from is not published; PAPO-Eval's
`papo_eval/run_eval.py` groups it with its vision-dependent sets, which may point at `vision`, not
confirmed. `--split mmmu_pro=vision` reads that config.
"""

from __future__ import annotations

import re
from pathlib import Path

from vppo.data import IMAGE_PLACEHOLDER
from vppo.datasets import (
    RawRows,
    convert_rows,
    fold_options,
    image_value,
    parse_options,
    text_of,
)

KEY = "mmmu_pro"
SOURCE = "MMMU/MMMU_Pro"
FOLDER = "MMMU_Pro"
SCHEMA = (
    "MMMU/MMMU_Pro dataset card: <config>/test-*.parquet with question, options, answer, image_1..7 "
    "(vision: image)"
)
DEFAULT_SPLIT = "standard (10 options)"
CONFIGS = ("standard (10 options)", "standard (4 options)", "vision")
_MARKER = re.compile(r"<image (\d+)>")


def _files(path: Path, config: str) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ValueError(f"{path} does not exist")
    folder = path / config
    files = sorted(folder.glob("test-*.parquet")) or sorted(folder.glob("*.parquet"))
    if not files:
        there = sorted(p.name for p in path.iterdir() if p.is_dir())
        raise ValueError(
            f"{path}: no parquet file in config folder {config!r} (config folders there: {there})"
        )
    return files


def _standard(rec: dict, base: list[Path]) -> tuple[str, list]:
    text = fold_options(text_of(rec, "question"), parse_options(rec["options"]))
    images = []
    for n in _MARKER.findall(text):
        value = rec.get(f"image_{n}")
        if value is None:
            raise ValueError(f"<image {n}> but image_{n} is empty")
        images.append(image_value(value, base))
    return _MARKER.sub(IMAGE_PLACEHOLDER, text), images


def read(path: Path, split: str | None = None) -> RawRows:
    config = split or DEFAULT_SPLIT
    if config not in CONFIGS:
        raise ValueError(f"MMMU-Pro config must be one of {list(CONFIGS)}, got {config!r}")
    files = _files(path, config)
    vision = config == "vision"
    need = ("image", "options", "answer") if vision else ("question", "options", "answer", "image_1")
    base = [path] if path.is_dir() else []

    def convert(rec: dict, f: Path) -> tuple[str, list, str]:
        if vision:
            text, images = IMAGE_PLACEHOLDER, [image_value(rec["image"], [f.parent, *base])]
        else:
            text, images = _standard(rec, [f.parent, *base])
        return text, images, rec["answer"]

    rows, broken = convert_rows(
        files,
        need,
        SCHEMA,
        convert,
        consumed=lambda k: k in ("question", "answer", "image") or k.startswith("image_"),
    )
    return RawRows(rows, files, {"source": SOURCE, "config": config, "schema": SCHEMA}, broken)
