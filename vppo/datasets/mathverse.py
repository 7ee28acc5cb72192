"""MathVerse as AI4Math/MathVerse releases it on the Hub (the VPPO README's MathVerse link).

Schema (dataset card of AI4Math/MathVerse, config `testmini`): `testmini.parquet` with
`sample_index`, `problem_index`, `problem_version` (Text Dominant, Text Lite, Vision Intensive,
Vision Dominant, Vision Only), `question` (multiple-choice questions carry their `Choices:` inside
the text), `image` (an image struct {"bytes", "path"}), `answer` (a capital letter for
multiple choice, else free-form), `question_type` ("multi-choice" / "free-form"), `metadata`,
`query_wo`, `query_cot`, `question_for_eval`. A row becomes `<image>` + `question` (the
`query_wo` text when `question` is empty, as for some Vision Only rows: an assumption, the card
does not say which rows those are), the answer as stored.

Default: testmini, all five problem versions (3,940 problems). The VPPO README says the authors
filtered MathVerse to verifiable, exact-match instances; that filtered file ships only in their
layout (chamber111/VPPO-Eval: `AI4Math_MathVerse`), and its row list is not published, so the raw
release reads the whole testmini. `mathverse_vision_dependent` (the authors' entry
`AI4Math_MathVerse_vision_dependent`) keeps the versions VISION_DEPENDENT; that this is how the
authors cut it is an assumption (PAPO-Eval does not publish the cut).
"""

from __future__ import annotations

from pathlib import Path

from vppo.datasets import (
    RawRows,
    convert_rows,
    image_value,
    release_files,
    with_image,
)

KEY = "mathverse"
SOURCE = "AI4Math/MathVerse"
FOLDER = "MathVerse"
SCHEMA = "AI4Math/MathVerse dataset card: testmini.parquet with question, image, answer, problem_version"
DEFAULT_SPLIT = "testmini"
VERSIONS = ("Text Dominant", "Text Lite", "Vision Intensive", "Vision Dominant", "Vision Only")
VISION_DEPENDENT = ("Vision Intensive", "Vision Dominant", "Vision Only")


def read(path: Path, split: str | None = None, *, versions: tuple[str, ...] = VERSIONS) -> RawRows:
    split = split or DEFAULT_SPLIT
    files = [f for f in release_files(path, split) if "text_only" not in f.name]
    if not files:
        raise ValueError(f"{path}: only a text-only file of split {split!r}; the image one is missing")
    base = [path] if path.is_dir() else []

    def convert(rec: dict, f: Path) -> tuple[str, list, str]:
        text = rec["question"] if str(rec["question"] or "").strip() else rec.get("query_wo")
        if not isinstance(text, str) or not text.strip():
            raise ValueError("missing or empty 'question' (and no 'query_wo')")
        image = image_value(rec["image"], [f.parent, *base])
        return with_image(text), [image], rec["answer"]

    rows, broken = convert_rows(
        files,
        ("question", "image", "answer", "problem_version"),
        SCHEMA,
        convert,
        consumed=("question", "image", "answer"),
        keep=lambda rec: rec["problem_version"] in versions,
    )
    choice = {"source": SOURCE, "split": split, "versions": list(versions), "schema": SCHEMA}
    return RawRows(rows, files, choice, broken)
