"""ViRL39K as TIGER-Lab releases it: `39Krelease.parquet` beside `images.zip` (data.format=virl39k).

Schema (TIGER-Lab/ViRL39K dataset card, "Dataset Keys"; the column names and types as loaders
of the release read them): `question` (string, the problem text with one `<image>` placeholder per
image, usually leading), `answer` (string, always `\\boxed{...}` per the card), `image` (a list of
paths relative to the release folder, `images/<qid>-<k>.jpg`), `qid` (string), and the meta columns
`category` (string), `source` (string), `PassRate_32BTrained` and `PassRate_7BBase` (floats; the
card calls the second "7BUntrained" and labels only half of the rows). 38,870 rows, one file.

The images ship as `images.zip`, whose members carry the same `images/...` names; the card says to
unzip it. Here an image path is taken from the folder of the parquet file (or data.image_dir) when
that file exists, else read straight from a `.zip` archive in that folder without extracting it
(vppo.images.ZipMember); a path found in neither is a broken row naming the path and the archives
searched, and a source whose every image is missing stops the load (a lost modality, not a
warning).

Not confirmed here: whether every `question` carries its placeholders (the sources read show a
leading `<image>`); a row whose placeholder count differs from its image count is a broken row,
named, as in every format. Whether the zip members sit at `images/...` or one folder deeper: the
lookup accepts both (a member whose name ends with `/<path>`, when only one does).

A row becomes a Problem: `question` -> problem text, `\\boxed{X}` -> answer `X` (so the grader's
multiple-choice and unit rules see the bare answer: `B. second` against `B`), `image` -> images,
`qid` names the row in messages, the other columns stay in `Problem.meta`. VPPO itself trains on
chamber111/VPPO_ViRL39K_train, a conversion of this release (vppo.datasets.vppo_release).
"""

from __future__ import annotations

from vppo.data import SourceFormat

FORMAT = SourceFormat(
    name="virl39k",
    problem_key="question",
    answer_key="answer",
    image_key="image",
    id_key="qid",
    schema="TIGER-Lab/ViRL39K (39Krelease.parquet + images.zip)",
)
