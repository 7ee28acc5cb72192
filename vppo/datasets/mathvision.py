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
    convert_rows,
    fold_options,
    image_value,
    parse_options,
    release_files,
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
    base = [path] if path.is_dir() else []

    def convert(rec: dict, f: Path) -> tuple[str, list, str]:
        text = fold_options(text_of(rec, "question"), parse_options(rec["options"]))
        image = image_value(rec["decoded_image"] or rec.get("image"), [f.parent, *base])
        return with_image(text), [image], rec["answer"]

    rows, broken = convert_rows(
        files,
        ("question", "options", "decoded_image", "answer"),
        SCHEMA,
        convert,
        consumed=("question", "decoded_image", "answer", "image"),
    )
    return RawRows(rows, files, {"source": SOURCE, "split": split, "schema": SCHEMA}, broken)
