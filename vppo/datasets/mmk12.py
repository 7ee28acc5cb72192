"""MMK12 as FanqingM/MMK12 releases it on the Hub (the VPPO README's MMK12 link).

Schema (the issue's reading of the dataset card; the card's feature list could not be fetched
here): parquet files of a `train` and a `test` split with `question` (the options, when there are
any, already written inside the text), `answer` (a capital letter for multiple choice, else a
number or expression) and `image` (one image struct {"bytes", "path"}); `id` and `subject` are kept
as meta. A row becomes `<image>` + question; the answer as stored.

Default split: `test` (2,000 problems): the split PAPO and VPPO evaluate and validate on (the
PAPO_ViRL39K_train card: "We use the `test` set from FanqingM/MMK12").
"""

from __future__ import annotations

from pathlib import Path

from vppo.datasets import (
    RawRows,
    convert_rows,
    image_value,
    release_files,
    text_of,
    with_image,
)

KEY = "mmk12"
SOURCE = "FanqingM/MMK12"
FOLDER = "MMK12"
SCHEMA = "FanqingM/MMK12: <split>-*.parquet with question (options inline), answer, image"
DEFAULT_SPLIT = "test"


def read(path: Path, split: str | None = None) -> RawRows:
    split = split or DEFAULT_SPLIT
    files = release_files(path, split)
    base = [path] if path.is_dir() else []

    def convert(rec: dict, f: Path) -> tuple[str, list, str]:
        image = image_value(rec["image"], [f.parent, *base])
        return with_image(text_of(rec, "question")), [image], rec["answer"]

    columns = ("question", "answer", "image")
    rows, broken = convert_rows(files, columns, SCHEMA, convert, consumed=columns)
    return RawRows(rows, files, {"source": SOURCE, "split": split, "schema": SCHEMA}, broken)
