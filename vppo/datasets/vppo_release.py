"""The training schema of the released VPPO recipe: `problem`, `answer`, `images` (data.format=vppo).

Sources in this schema:
- chamber111/VPPO_ViRL39K_train (training) and chamber111/VPPO_MMK12_validation (validation), the
  two sets the released recipe trains and validates on: huaixuheqing/VPPO-RL
  `examples/configs/config.yaml` (`data.train_files`, `data.val_files`, with `prompt_key: problem`,
  `answer_key: answer`, `image_key: images` for both) and `examples/configs/train_ours_7b.sh`.
- PAPOGalaxy/PAPO_ViRL39K_train (dataset card: `id` string, `problem` string, `answer` string,
  `images` a list of {"bytes", "path"} image structs; 38,870 rows, one `train` split) and
  PAPOGalaxy/PAPO_MMK12_test, the PAPO conversions of TIGER-Lab/ViRL39K and of the FanqingM/MMK12
  `test` split that the VPPO code base (EasyR1 / PAPO) reads with the same keys.
- the project's own files (vppo.synth, the tiny base's data).

Not confirmed here: the column types of chamber111's two snapshots (their cards could not be read
from this machine); the loader takes them to match PAPO's card, and `python -m vppo.data check`
prints what a downloaded copy really holds. A snapshot folder (`hf download <repo> --local-dir
DIR`) holds `data/train-*.parquet` only: the released trainer loads BOTH sets with
`load_dataset(path, split="train")` (verl/utils/dataset.py: `train` unless the path ends in
`@split`), so the validation set is the MMK12 snapshot's `train` split. vppo.data does the same
when a folder asked for its validation split names only `train`, and says so in the log.

A row becomes a Problem as the released dataset class builds its prompt: `problem` is the text
(one `<image>` placeholder per image, split there into the chat content list), `images` the images
in placeholder order (bytes, paths relative to the source's folder, or decoded images), `answer`
the ground truth (one that is a whole `\\boxed{...}` is unwrapped: vppo.data.unwrap_boxed).
"""

from __future__ import annotations

from vppo.data import SourceFormat

FORMAT = SourceFormat(
    name="vppo",
    problem_key="problem",
    answer_key="answer",
    image_key="images",
    id_key=None,  # the first of id / qid / uid / pid present (PAPO's conversion has `id`)
    schema="chamber111/VPPO_ViRL39K_train, chamber111/VPPO_MMK12_validation, PAPOGalaxy/PAPO_*",
)
