"""MathVision as MathLLMs/MathVision releases it on the Hub (the VPPO README's MathVision link).

Schema (dataset card of MathLLMs/MathVision; lmms-eval's `lmms_eval/tasks/mathvision/utils.py`
reads the same columns): `data/test-*.parquet` (3,040 problems) and `data/testmini-*.parquet` (304)
with `id`, `question`, `options` (a list, empty for free-form problems), `image` (a path string such
as `images/1.jpg`), `decoded_image` (an image struct {"bytes", "path"}), `answer` (a capital
letter when there are options, else free-form), `solution`, `level`, `subject`. A row becomes
`<image>` + the question with its options folded in (vppo.datasets.fold_options: a `Choices:` block
of `A. option` lines), the answer as stored; the image is `decoded_image` (`image`, a path under
the release folder, when that is empty).

Default split: `test`. The VPPO README says the authors filtered MathVision to verifiable,
exact-match instances (their file ships in chamber111/VPPO-Eval as `MathLLMs_MathVision`); which
split the filter started from is not published, so `--split mathvision=testmini` reads the other.
"""

from __future__ import annotations

from pathlib import Path

from vppo.datasets import (
    RawRows,
    broken_row,
    fold_options,
    image_value,
    parse_options,
    read_table,
    release_files,
    require_columns,
    text_of,
    with_image,
)

KEY = "mathvision"
SOURCE = "MathLLMs/MathVision"
FOLDER = "MathVision"
SCHEMA = (
    "MathLLMs/MathVision dataset card: data/<split>-*.parquet with question, options, decoded_image, answer"
)
DEFAULT_SPLIT = "test"


def read(path: Path, split: str | None = None) -> RawRows:
    split = split or DEFAULT_SPLIT
    files = release_files(path, split)
    rows, broken = [], {}
    base = [path] if path.is_dir() else []
    for f in files:
        recs = read_table(f)
        require_columns(recs, ("question", "options", "decoded_image", "answer"), f, SCHEMA)
        for rec in recs:
            i = len(rows)
            try:
                text = fold_options(text_of(rec, "question"), parse_options(rec["options"]))
                image = image_value(rec["decoded_image"] or rec.get("image"), [f.parent, *base])
            except (ValueError, FileNotFoundError) as e:
                rows.append(broken_row(i, str(e), broken))
                continue
            meta = {k: v for k, v in rec.items() if k not in ("question", "decoded_image", "answer", "image")}
            rows.append(
                {**meta, "problem": with_image(text), "answer": rec["answer"], "images": [image], "row": i}
            )
    return RawRows(rows, files, {"source": SOURCE, "split": split, "schema": SCHEMA}, broken)
