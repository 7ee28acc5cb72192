"""LogicVista as released by its authors (lscpku/LogicVista on the Hub, Yijia-Xiao/LogicVista on GitHub).

Schema (the release as public loaders read it; the published card does not spell the keys out):
`dataset.json`, a JSON object keyed by question id whose values hold `imagename` (a file under
`images/`), `question` (the choices are written inside the text)
and `answer` (one or more capital letters, e.g. `A` or `A, C`), plus `reasoning`, `skill` and other
meta; the images in `images/`. A row becomes `<image>` + question; the answer as stored. 448
problems, all of them (the benchmark has one split).
"""

from __future__ import annotations

from pathlib import Path

from vppo.datasets import (
    RawRows,
    convert_rows,
    image_value,
    text_of,
    with_image,
)

KEY = "logicvista"
SOURCE = "lscpku/LogicVista"
FOLDER = "LogicVista"
SCHEMA = "LogicVista release: dataset.json keyed by id with imagename, question, answer; images/"
DEFAULT_SPLIT = "all"


def read(path: Path, split: str | None = None) -> RawRows:
    f = path if path.is_file() else path / "dataset.json"
    if not f.is_file():
        found = sorted(p.name for p in path.iterdir())[:20] if path.is_dir() else []
        raise ValueError(f"{path}: no dataset.json (the LogicVista release; folder holds {found})")

    def convert(rec: dict, f: Path) -> tuple[str, list, str]:
        text = with_image(text_of(rec, "question"))
        image = image_value(rec["imagename"], [f.parent / "images", f.parent])
        return text, [image], rec["answer"]

    columns = ("imagename", "question", "answer")
    rows, broken = convert_rows([f], columns, SCHEMA, convert, consumed=columns)
    return RawRows(rows, [f], {"source": SOURCE, "split": DEFAULT_SPLIT, "schema": SCHEMA}, broken)
