"""Geo3k as hiyouga/geometry3k releases it on the Hub (the VPPO README's Geo3k link).

Schema (dataset card of hiyouga/geometry3k): parquet files `data/{train,validation,test}-*.parquet`
with `images` (a list of image structs {"bytes", "path"}), `problem` (text with an `<image>`
placeholder per image) and `answer` (free-form: a number or a LaTeX expression). That is already
the training schema, so a row is a problem as it stands.

Default split: `test` (601 problems), the split the paper's Table 1 evaluates (the authors' Geo3k
entry, `hiyouga_geometry3k`, is built from it).
"""

from __future__ import annotations

from pathlib import Path

from vppo.datasets import RawRows, convert_rows, image_value, release_files

KEY = "geo3k"
SOURCE = "hiyouga/geometry3k"
FOLDER = "geometry3k"
SCHEMA = "hiyouga/geometry3k dataset card: data/<split>-*.parquet with images, problem, answer"
DEFAULT_SPLIT = "test"


def read(path: Path, split: str | None = None) -> RawRows:
    split = split or DEFAULT_SPLIT
    files = release_files(path, split)

    def convert(rec: dict, f: Path) -> tuple[str, list, str]:
        images = rec["images"] if isinstance(rec["images"], list) else [rec["images"]]
        images = [image_value(im, [f.parent, path if path.is_dir() else f.parent]) for im in images]
        return rec["problem"], images, rec["answer"]

    columns = ("images", "problem", "answer")
    rows, broken = convert_rows(files, columns, SCHEMA, convert, consumed=columns)
    return RawRows(rows, files, {"source": SOURCE, "split": split, "schema": SCHEMA}, broken)
