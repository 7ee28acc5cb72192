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
    broken_row,
    image_value,
    read_table,
    release_files,
    require_columns,
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
    rows, broken = [], {}
    base = [path] if path.is_dir() else []
    for f in files:
        recs = read_table(f)
        require_columns(recs, ("question", "answer", "image"), f, SCHEMA)
        for rec in recs:
            i = len(rows)
            try:
                image = image_value(rec["image"], [f.parent, *base])
                text = with_image(text_of(rec, "question"))
            except (ValueError, FileNotFoundError) as e:
                rows.append(broken_row(i, str(e), broken))
                continue
            meta = {k: v for k, v in rec.items() if k not in ("question", "answer", "image")}
            rows.append({**meta, "problem": text, "answer": rec["answer"], "images": [image], "row": i})
    return RawRows(rows, files, {"source": SOURCE, "split": split, "schema": SCHEMA}, broken)
