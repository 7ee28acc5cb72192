"""We-Math as We-Math/We-Math releases it on the Hub (the VPPO README's We-Math link).

Schema (the release as public loaders read it; the dataset card itself could not be fetched here):
`testmini.json`, a JSON list of 1,740 problems with `ID`, `key` (the step of a multi-step problem),
`question`, `option` (ONE string holding every choice, e.g. `A. 3; B. 4; C. 5; D. 6; E. No correct
answer`), `image_path` (a file name under the release's `images/` folder) and `answer` (a capital
letter), plus `knowledge concept` and other meta. Any `testmini` table (JSON lines, CSV, parquet)
in the folder is read the same way. A row becomes `<image>` + question + a `Choices:` line holding
the option string verbatim; the answer as stored.

Default split: `testmini`, the split the We-Math paper and the authors evaluate (the only one with
answers).
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

KEY = "wemath"
SOURCE = "We-Math/We-Math"
FOLDER = "We-Math"
SCHEMA = (
    "We-Math/We-Math: testmini.json with question, option (one string), image_path (under images/), answer"
)
DEFAULT_SPLIT = "testmini"


def read(path: Path, split: str | None = None) -> RawRows:
    split = split or DEFAULT_SPLIT
    files = release_files(path, split)
    root = path if path.is_dir() else path.parent

    def convert(rec: dict, f: Path) -> tuple[str, list, str]:
        text = text_of(rec, "question")
        option = str(rec["option"] or "").strip()
        text = f"{text.rstrip()}\nChoices: {option}" if option else text
        image = image_value(rec["image_path"], [root / "images", root, f.parent])
        return with_image(text), [image], rec["answer"]

    columns = ("question", "option", "image_path", "answer")
    rows, broken = convert_rows(files, columns, SCHEMA, convert, consumed=columns)
    return RawRows(rows, files, {"source": SOURCE, "split": split, "schema": SCHEMA}, broken)
