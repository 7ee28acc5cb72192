"""Problems from training sources, their prompts, and the processor inputs built from them.

A source is a table of rows; a row becomes a Problem (a text with one `<image>` placeholder per image,
a ground-truth answer, the images). Which columns hold what is the source's format (`format=`,
data.format), one module per published schema in vppo/datasets/:

    vppo     `problem`, `answer`, `images`: the released recipe's sets (chamber111/VPPO_ViRL39K_train,
             chamber111/VPPO_MMK12_validation), PAPO's, the project's own (vppo.datasets.vppo_release)
    virl39k  `question`, `answer` (boxed), `image` paths into `images.zip`, `qid`: TIGER-Lab's raw
             release (vppo.datasets.virl39k)
    columns  the keys given (`problem_key`, `answer_key`, `image_key`)
    auto     the keys given when they are all columns of the source (the defaults are vppo's), else
             the one preset whose columns are there; otherwise an error listing the presets and the
             columns found (docs/training-data.md)

One API serves the training loop and the evaluation:

    problems = load_problems("data/virl39k.parquet", processor=processor, max_prompt_length=4096)
    batch = encode_prompts(problems[:8], processor)     # left-padded, ready for generate()
    suppress = vision_token_ids(processor)              # keep these out of sampling

Sources: a parquet file or a folder of them, a `datasets.save_to_disk` folder, a hub name (`name` or
`name@split`, read from the local cache only unless `allow_download=True`), or an in-memory list of
row dicts. Images are encoded bytes, {"bytes", "path"} structs, decoded images, or paths relative
to the source's folder, read from the file there or, failing that, straight from a `.zip` archive in
that folder (ViRL39K's `images.zip`, never extracted): vppo.images reads and decodes them. A
validation split asked of a folder or hub set whose only split is `train` reads that split, with a
note in the log (the released trainer loads chamber111/VPPO_MMK12_validation as `split="train"`).
An answer that is one whole `\\boxed{...}` is unwrapped (ViRL39K writes every answer so; the grader
wants the bare answer).

A broken row (missing problem or answer, an image that is missing or does not decode, placeholders
that do not match the images, an image the processor refuses when prompt lengths are checked) is
skipped and counted, with one warning per load naming the first one and `stats.broken_rows` naming
each; `strict=True` raises instead. A source whose every image fails is an error, not a warning:
training would go on with a whole modality lost. `python -m vppo.data check SOURCE` reports all of
this without a model.

The prompt follows the released recipe (docs/algorithm.md section 5): the problem text, trimmed, then a blank
line and PROMPT_SUFFIX (the `math_perception` format prompt of the EasyR1 / PAPO code VPPO builds on),
split at the placeholders into the Qwen2.5-VL chat content list. A problem text that already ends
with the suffix (up to spacing) has it cut first, so the instruction is not given twice. The chat
template adds its default system message, as in the released training code.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
from PIL import Image

from vppo.config import VPPO_PROMPT_SUFFIX
from vppo.images import (  # noqa: F401  (open_image, to_rgb, ZipMember...: still vppo.data's API)
    ImageSource,
    MissingImageError,
    ZipMember,
    check_image,
    image_source,
    open_image,
    to_rgb,
)

logger = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"
PROMPT_SUFFIX = VPPO_PROMPT_SUFFIX  # one copy of the released prompt suffix (vppo.config holds it)
# Written beside a model the project trained (the tiny base, a training export): the suffix its prompts
# used, so evaluation asks the question the way the model learned it.
PROMPT_FILE = "vppo_prompt.json"
# Released recipe (docs/algorithm.md section 5): 256 and 1280 merged 28x28 cells.
DEFAULT_MIN_PIXELS = 256 * 28 * 28
DEFAULT_MAX_PIXELS = 1280 * 28 * 28
# Special tokens a policy must never sample: fed back for scoring, an <|image_pad|> inside a response
# counts as an image slot and the forward fails (docs/traps.md section 2).
VISION_SPECIAL_TOKENS = (
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
ID_KEYS = ("id", "qid", "uid", "pid")
SPLIT_NAMES = ("train", "validation", "val", "test", "dev")
HELD_OUT_SPLITS = ("validation", "val", "dev")  # not test: a benchmark without one is an error
FORMATS = ("auto", "vppo", "virl39k", "columns")  # data.format


@dataclass(frozen=True)
class SourceFormat:
    """Which columns of a source hold the problem text, the answer, the images and the row id.

    One per published schema, each in its own module of vppo/datasets/ that cites the schema.
    """

    name: str
    problem_key: str
    answer_key: str
    image_key: str | None  # None: a text-only set
    id_key: str | None  # None: the first of ID_KEYS present
    schema: str  # the published schema it reads (dataset / file), for messages and `check`

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(k for k in (self.problem_key, self.answer_key, self.image_key) if k)


class BrokenRowWarning(UserWarning):
    """Rows were skipped while loading problems."""


@dataclass(frozen=True)
class Problem:
    """One problem: text with `<image>` placeholders, the ground-truth answer, and its images.

    `images` holds undecoded sources (encoded bytes, an absolute path, or a PIL image) so a large set
    stays small in memory; `pil_images()` decodes them. `image_sizes` are (width, height) as stored.
    """

    uid: str
    problem: str
    answer: str
    images: tuple[ImageSource, ...] = ()
    image_sizes: tuple[tuple[int, int], ...] = ()
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def pil_images(self) -> list[Image.Image]:
        return [open_image(src) for src in self.images]


@dataclass
class LoadStats:
    rows: int = 0  # rows read (before `limit` stops the read)
    kept: int = 0
    broken: int = 0
    overlong: int = 0
    non_string_answers: int = 0  # kept rows whose answer was not a string (converted, see _answer_text)
    first_broken: str | None = None  # the message naming the first broken row
    first_non_string: str | None = None  # the first such row and its answer
    broken_rows: list[str] = field(default_factory=list)  # every broken row and why
    image_rows: int = 0  # rows that name at least one image
    image_failures: int = 0  # of those, rows broken by an image (missing, undecodable)
    boxed_answers: int = 0  # kept rows whose answer was one whole \\boxed{...} (unwrapped)
    format: str | None = None  # the SourceFormat.name the rows were read with
    files: list[str] = field(default_factory=list)  # the files read (parquet, arrow folders)


@dataclass
class ProblemSet(Sequence):
    """The loaded problems (a read-only sequence) and how many rows were dropped and why."""

    problems: list[Problem]
    stats: LoadStats

    def __len__(self) -> int:
        return len(self.problems)

    def __getitem__(self, i):
        return self.problems[i]

    def __iter__(self) -> Iterator[Problem]:
        return iter(self.problems)


def unwrap_boxed(answer: str) -> str:
    """The content of an answer that is one whole `\\boxed{...}` (optionally inside `$...$`), else
    the answer unchanged: ViRL39K stores `\\boxed{B}`, and the grader's multiple-choice and unit
    rules compare a response's boxed content with the bare `B`."""
    t = answer.strip()
    if len(t) > 1 and t[0] == t[-1] == "$":
        t = t.strip("$").strip()
    m = re.match(r"\\boxed\s*\{", t)
    if m is None:
        return answer
    depth = 0
    for i in range(m.end() - 1, len(t)):
        depth += {"{": 1, "}": -1}.get(t[i], 0)
        if depth == 0:
            return t[m.end() : i].strip() if i == len(t) - 1 else answer
    return answer  # never closes


# ----------------------------------------------------------------------------------------------------
# prompts and processor inputs


def build_messages(problem: Problem | str, suffix: str | None = PROMPT_SUFFIX) -> list[dict]:
    """Chat messages for the Qwen2.5-VL template: one user turn, images where the placeholders are.

    The text is `problem.strip() + "\\n\\n" + suffix` (no suffix when `suffix` is None or empty), split
    at `<image>`; the image entries carry no data (the processor gets the images in order). A
    problem that already ends with the suffix, up to spacing, has it cut first (strip_instruction).
    """
    text = problem.problem if isinstance(problem, Problem) else problem
    text = strip_instruction(text.strip(), suffix)
    if suffix:
        text = f"{text}\n\n{suffix}"
    content: list[dict] = []
    for i, part in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if i > 0:
            content.append({"type": "image"})
        if part:
            content.append({"type": "text", "text": part})
    return [{"role": "user", "content": content}]


def strip_instruction(text: str, suffix: str | None) -> str:
    """`text` without a trailing copy of `suffix` that differs from it only in whitespace (a line
    break for a space, `<think></think>` for `<think> </think>`, a doubled space), else `text`.
    Sources that already carry the format instruction would otherwise give it twice."""
    target = "".join(suffix.split()) if suffix else ""
    if not target:
        return text
    # positions of text's last len(target) non-space characters
    pos: list[int] = []
    for i in range(len(text) - 1, -1, -1):
        if not text[i].isspace():
            pos.append(i)
            if len(pos) == len(target):
                break
    if len(pos) < len(target) or "".join(text[i] for i in reversed(pos)) != target:
        return text
    return text[: pos[-1]].rstrip()


def render_prompt(problem: Problem, processor, suffix: str | None = PROMPT_SUFFIX) -> str:
    """The chat-template prompt text (one `<|image_pad|>` per image, before the processor expands it)."""
    return processor.apply_chat_template(
        build_messages(problem, suffix), add_generation_prompt=True, tokenize=False
    )


def image_token_count(processor, width: int, height: int) -> int:
    """Number of `<|image_pad|>` tokens the processor makes for an image of this size."""
    ip = processor.image_processor
    return ip.get_number_of_image_patches(height, width, {}) // ip.merge_size**2


def prompt_length(problem: Problem, processor, suffix: str | None = PROMPT_SUFFIX) -> int:
    """Prompt length in tokens after image expansion, computed without decoding the images."""
    ids = processor.tokenizer(render_prompt(problem, processor, suffix), add_special_tokens=False)[
        "input_ids"
    ]
    # Each image appears as one pad token in the rendered text and as image_token_count() after expansion.
    return len(ids) + sum(image_token_count(processor, w, h) - 1 for w, h in problem.image_sizes)


def encode_prompts(
    problems: Sequence[Problem],
    processor,
    suffix: str | None = PROMPT_SUFFIX,
    padding_side: str = "left",
):
    """Processor inputs for a batch of B prompts, LEFT padded for generation by default.

    Returns the processor's BatchFeature: input_ids (B, T), attention_mask (B, T), mm_token_type_ids
    (B, T) (needed by the 3-D rope index), and when any problem has images pixel_values
    (sum_i h_i * w_i, C * 2 * 14 * 14) with image_grid_thw (num_images, 3), images in prompt order.
    Generation and the scoring passes must use this same processor so the image grids match.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if len(problems) == 0:
        raise ValueError("problems must not be empty")
    texts = [render_prompt(p, processor, suffix) for p in problems]
    images = [img for p in problems for img in p.pil_images()]
    return processor(
        text=texts, images=images or None, padding=True, padding_side=padding_side, return_tensors="pt"
    )


def save_prompt_suffix(model_dir: str | os.PathLike, suffix: str | None) -> Path:
    """Record in `model_dir` the prompt suffix a model was trained with (PROMPT_FILE)."""
    path = Path(model_dir) / PROMPT_FILE
    path.write_text(json.dumps({"suffix": suffix}, ensure_ascii=False) + "\n")
    return path


def load_prompt_suffix(model_dir: str | os.PathLike) -> str | None:
    """The suffix recorded by save_prompt_suffix, or the released PROMPT_SUFFIX when none was recorded."""
    path = Path(model_dir) / PROMPT_FILE
    if not path.is_file():
        return PROMPT_SUFFIX
    try:
        return json.loads(path.read_text())["suffix"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a prompt file written by vppo ({e})") from e


def set_pixel_bounds(processor, min_pixels: int | None = None, max_pixels: int | None = None):
    """Set the image processor's pixel bounds in place (None keeps the current value); returns it.

    Set on the image processor itself rather than passed per call (a deprecated path in transformers
    5), so generation and the scoring passes, which share the processor, resize images identically.
    """
    from transformers.image_utils import SizeDict  # heavy: ~1 s

    ip = processor.image_processor
    lo = ip.size["shortest_edge"] if min_pixels is None else min_pixels
    hi = ip.size["longest_edge"] if max_pixels is None else max_pixels
    for name, v in (("min_pixels", lo), ("max_pixels", hi)):
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if lo > hi:
        raise ValueError(f"min_pixels ({lo}) must not exceed max_pixels ({hi})")
    ip.size = SizeDict(shortest_edge=lo, longest_edge=hi)
    return processor


def load_processor(path: str | os.PathLike, min_pixels: int | None = None, max_pixels: int | None = None):
    """AutoProcessor from a local path (never downloads), pixel bounds set, left padding.

    `min_pixels` / `max_pixels` default to the values saved with the processor; the released 7B recipe
    uses DEFAULT_MIN_PIXELS / DEFAULT_MAX_PIXELS.
    """
    from transformers import AutoProcessor  # heavy: ~1.4 s

    processor = AutoProcessor.from_pretrained(str(path), local_files_only=True)
    set_pixel_bounds(processor, min_pixels, max_pixels)
    processor.tokenizer.padding_side = "left"
    return processor


def vision_token_ids(processor_or_tokenizer) -> list[int]:
    """Ids of the vision special tokens present in the vocabulary (pass as `suppress_tokens`)."""
    tok = getattr(processor_or_tokenizer, "tokenizer", processor_or_tokenizer)
    vocab = tok.get_vocab()
    return sorted(vocab[t] for t in VISION_SPECIAL_TOKENS if t in vocab)


def mm_token_type_ids(input_ids: torch.Tensor, processor) -> torch.Tensor:
    """(B, T) modality ids for the 3-D rope index: 0 text, 1 image pad, 2 video pad.

    For a prompt + response sequence, compute this on the prompt and append zeros for the response,
    so a sampled pad token cannot be mistaken for an image slot.
    """
    types = torch.zeros_like(input_ids)
    types[input_ids == processor.image_token_id] = 1
    types[input_ids == processor.video_token_id] = 2
    return types


# ----------------------------------------------------------------------------------------------------
# sources


@contextlib.contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """Make `datasets` / `huggingface_hub` read only the local cache for the duration."""
    if not offline:
        yield
        return
    import datasets.config  # heavy: ~0.4 s
    import huggingface_hub.constants as hub_constants  # with datasets: HF env read at first use

    saved = (datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE)
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def _split_files(folder: Path, split: str | None) -> list[Path]:
    """The parquet files of `split` under `folder`; all of them when none is named by a split."""
    files = sorted(folder.rglob("*.parquet"))
    if not files:
        raise ValueError(f"source folder {folder} holds no parquet files")

    def split_of(f: Path) -> str | None:
        rel = f.relative_to(folder)
        for name in (rel.stem, *rel.parts[:-1]):
            for s in SPLIT_NAMES:
                if name == s or name.startswith((f"{s}-", f"{s}_", f"{s}.")):
                    return s
        return None

    named = {f: split_of(f) for f in files}
    if split is None or all(s is None for s in named.values()):
        return files
    split = _pick_split(sorted({s for s in named.values() if s}), split, str(folder))
    return [f for f, s in named.items() if s == split]


def _pick_split(found: list[str], split: str, where: str) -> str:
    """`split` when `where` has it; `train` for a held-out split asked of a set whose only split is
    `train` (the released trainer reads its validation set, chamber111/VPPO_MMK12_validation, as
    `split="train"`), with a note in the log; else a ValueError naming the splits there."""
    if split in found:
        return split
    if found == ["train"] and split in HELD_OUT_SPLITS:
        logger.warning(
            "%s names only the split 'train'; reading it for the %r split asked for (as the released "
            "recipe reads its validation set, chamber111/VPPO_MMK12_validation)",
            where, split,
        )  # fmt: skip
        return "train"
    raise ValueError(f"split {split!r} not found in {where} (splits there: {found})")


def _hub_snapshot(name: str) -> Path | None:
    """The newest snapshot folder of dataset repo `name` in the hub file cache when it holds parquet
    files (what `hf download` leaves; `datasets` itself reads those offline only after an online
    load_dataset has filled its own cache), else None."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        return None
    try:
        path = Path(snapshot_download(name, repo_type="dataset", local_files_only=True))
    except (LocalEntryNotFoundError, ValueError, OSError):
        return None
    return path if next(path.rglob("*.parquet"), None) is not None else None


def _arrow_batches(
    source: Any, split: str | None, allow_download: bool, files: list[str] | None = None
) -> tuple[Iterator[list[dict]], str]:
    """Row batches (lists of dicts) from any supported source, and a short name for messages; the
    files it reads are appended to `files`."""
    files = [] if files is None else files
    if isinstance(source, Sequence) and not isinstance(source, (str, bytes)):
        rows = list(source)
        if rows and not all(isinstance(r, dict) for r in rows):
            raise ValueError("source, when a list, must hold row dicts")
        return iter([rows]), "rows"
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"source must be a path, a dataset name, or a list of row dicts, got {type(source)}")

    def from_parquet(paths: list[Path]) -> Iterator[list[dict]]:
        files.extend(str(f) for f in paths)
        for f in paths:
            for rb in pq.ParquetFile(f).iter_batches(batch_size=256):
                yield rb.to_pylist()

    def from_dataset(ds) -> Iterator[list[dict]]:
        # Arrow format keeps Image features undecoded ({"bytes", "path"} structs).
        ds = ds.with_format("arrow")
        for i in range(0, len(ds), 256):
            yield ds[i : i + 256].to_pylist()

    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix != ".parquet":
            raise ValueError(f"source file {path} is not a .parquet file")
        return from_parquet([path]), path.name
    if path.is_dir():
        import datasets  # heavy: ~0.4 s, folder sources only

        if (path / "dataset_dict.json").exists():
            dd = datasets.load_from_disk(str(path))
            split = _pick_split(sorted(dd), split, str(path))
            files.append(str(path / split))
            return from_dataset(dd[split]), f"{path.name}/{split}"
        if (path / "state.json").exists():
            files.append(str(path))
            return from_dataset(datasets.load_from_disk(str(path))), path.name
        return from_parquet(_split_files(path, split)), path.name
    text = str(source)
    if text.endswith(".parquet") or text.startswith((".", "/", "~")):
        raise ValueError(f"source {text!r} does not exist")
    # A hub dataset name, optionally `name@split` as in EasyR1 configs.
    name, _, at_split = text.partition("@")
    split = at_split or split or "train"
    snapshot = _hub_snapshot(name)
    if snapshot is not None:  # `hf download <name> --repo-type dataset` put its files in the hub cache
        return from_parquet(_split_files(snapshot, split)), f"{name}@{split}"
    import datasets  # heavy: ~0.4 s, hub sources only

    try:
        with _hub_offline(not allow_download):
            try:
                ds = datasets.load_dataset(name, split=split)
            except ValueError as e:  # an unknown split: see which there are
                if at_split or "split" not in str(e).lower():
                    raise
                dd = datasets.load_dataset(name)
                split = _pick_split(sorted(dd), split, name)
                ds = dd[split]
    except (ConnectionError, FileNotFoundError) as e:
        raise ValueError(
            f"source {text!r} is neither a local path nor a dataset in the local Hugging Face cache "
            f"(nothing is downloaded unless allow_download=True): {e}"
        ) from e
    return from_dataset(ds), f"{name}@{split}"


# ----------------------------------------------------------------------------------------------------
# loading


def source_formats() -> dict[str, SourceFormat]:
    """The presets of data.format, one module of vppo/datasets/ each."""
    from vppo.datasets import virl39k, vppo_release  # each cites the schema it reads

    return {f.name: f for f in (vppo_release.FORMAT, virl39k.FORMAT)}


def resolve_format(
    columns: Sequence[str],
    format: str = "auto",
    *,
    problem_key: str = "problem",
    answer_key: str = "answer",
    image_key: str | None = "images",
    id_key: str | None = None,
    name: str = "the source",
) -> SourceFormat:
    """The SourceFormat that reads a source with these columns; a ValueError naming the source, the
    columns found and the presets otherwise.

    `columns` uses the keys given; a preset its own keys; `auto` the keys given when they are all
    columns (their defaults are the vppo preset's), else the one preset whose columns are all there.
    """
    presets = source_formats()
    cols = set(columns)
    given = SourceFormat("columns", problem_key, answer_key, image_key, id_key, "the keys given")
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if format == "columns" or (format == "auto" and set(given.columns) <= cols):
        vppo = presets["vppo"]
        same = given.columns == vppo.columns and id_key is None
        chosen = vppo if same and format == "auto" else given
    elif format == "auto":
        hits = [f for f in presets.values() if set(f.columns) <= cols]
        if len(hits) != 1:
            listing = "; ".join(f"{f.name} ({', '.join(f.columns)}: {f.schema})" for f in presets.values())
            why = (
                f"it matches {len(hits)} presets"
                if hits
                else f"problem_key={problem_key!r}, answer_key={answer_key!r}, image_key={image_key!r} "
                "are not all columns and no preset matches"
            )
            raise ValueError(
                f"cannot tell the format of {name} from its columns {sorted(cols)}: {why}. Presets: "
                f"{listing}. Set data.format to a preset, or data.format=columns with data.problem_key, "
                "data.answer_key and data.image_key"
            )
        chosen = hits[0]
    else:
        chosen = presets[format]
    for arg, key in (
        ("problem_key", chosen.problem_key),
        ("answer_key", chosen.answer_key),
        ("image_key", chosen.image_key),
    ):
        if key is not None and key not in cols:
            raise ValueError(
                f"{arg}={key!r} (format {chosen.name}) is not a column of {name} (columns: {sorted(cols)})"
            )
    return chosen


def source_columns(source: str | os.PathLike, split: str | None = "train") -> list[str] | None:
    """The column names of a parquet source, local or in the hub file cache (its schema only, no
    rows), or None when that cannot be told without loading it (a save_to_disk folder, a hub name
    only `datasets` has cached, a missing path)."""
    path = Path(source).expanduser()
    if not path.exists() and not str(source).startswith((".", "/", "~")):
        name, _, at_split = str(source).partition("@")
        path = _hub_snapshot(name) or path
        split = at_split or split
    if path.is_file() and path.suffix == ".parquet":
        return pq.read_schema(path).names
    if path.is_dir() and not (path / "dataset_dict.json").exists() and not (path / "state.json").exists():
        files = _split_files(path, split)
        return pq.read_schema(files[0]).names
    return None


class _ImageRowError(ValueError):
    """A row broken by one of its images (counted towards the lost-modality check)."""


def _row_problem(
    row: dict,
    index: int,
    name: str,
    fmt: SourceFormat,
    id_key: str | None,
    image_dir: Path | None,
    full_check: bool,
) -> Problem:
    """One row as a Problem; raises ValueError (message without the row name) when it is broken."""
    problem_key, answer_key, image_key = fmt.problem_key, fmt.answer_key, fmt.image_key
    text = row.get(problem_key)
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"missing or empty {problem_key!r}")
    answer = row.get(answer_key)
    if answer is None or not _answer_text(answer):
        raise ValueError(f"missing or empty {answer_key!r}")
    answer_text = _answer_text(answer)
    if isinstance(answer, str):
        answer_text = unwrap_boxed(answer_text)
        if not answer_text:
            raise ValueError(f"empty \\boxed{{}} in {answer_key!r}")
    raw = row.get(image_key) if image_key else None
    if raw is None:
        raw = []
    elif not isinstance(raw, (list, tuple)):
        raw = [raw]  # a single-image column
    n_slots = text.count(IMAGE_PLACEHOLDER)
    if n_slots != len(raw):
        raise ValueError(f"{n_slots} {IMAGE_PLACEHOLDER} placeholders but {len(raw)} images")
    sources, sizes = [], []
    for j, r in enumerate(raw):
        try:
            src = image_source(r, image_dir)
        except MissingImageError as e:
            raise _ImageRowError(f"image {j}: {e}") from e
        try:
            sizes.append(check_image(src, full_check))
        except Exception as e:  # any decoder error means the same thing here
            raise _ImageRowError(f"image {j} does not decode ({type(e).__name__}: {e})") from e
        sources.append(src)
    uid = f"{name}[{index}]"
    if id_key and row.get(id_key) is not None:
        uid = f"{uid} ({id_key}={row[id_key]})"
    meta = {k: v for k, v in row.items() if k not in (problem_key, answer_key, image_key)}
    if isinstance(answer, str) and answer_text != answer.strip():
        meta["answer_as_stored"] = answer
    return Problem(uid, text, answer_text, tuple(sources), tuple(sizes), meta)


def _answer_text(answer: Any) -> str:
    """The answer as text: a string stripped, an integral float as an integer (3.0 -> "3"), anything
    else by str() ([1, 2] -> "[1, 2]"). load_problems() counts the non-string ones in its stats."""
    if isinstance(answer, float) and answer.is_integer():
        return str(int(answer))
    return str(answer).strip()


def load_problems(
    source: str | os.PathLike | Sequence[dict],
    split: str | None = "train",
    *,
    format: str = "auto",
    problem_key: str = "problem",
    answer_key: str = "answer",
    image_key: str | None = "images",
    id_key: str | None = None,
    image_dir: str | os.PathLike | None = None,
    processor=None,
    max_prompt_length: int | None = None,
    suffix: str | None = PROMPT_SUFFIX,
    strict: bool = False,
    limit: int | None = None,
    check_images: str = "full",
    allow_download: bool = False,
) -> ProblemSet:
    """Load problems from a parquet file or folder, a save_to_disk folder, a hub name, or row dicts.

    Args:
        split: which split of a folder / DatasetDict / hub dataset (ignored for single files); a
            held-out split asked of a set whose only split is `train` reads `train` (logged).
        format: auto | vppo | virl39k | columns (see the module docstring and resolve_format).
        problem_key, answer_key, image_key: column names for format columns / auto
            (`image_key=None`: a text-only set).
        id_key: column naming rows in messages; default the format's, else the first of
            id / qid / uid / pid present.
        image_dir: folder for relative image paths and zip archives (default: the source's folder).
        processor, max_prompt_length: when both are set, prompts longer than max_prompt_length tokens
            (after image expansion, with `suffix`) are dropped and counted in `stats.overlong`.
        strict: raise ValueError at the first broken row instead of skipping it.
        limit: stop after this many kept problems.
        check_images: "full" decodes every image once; "header" only opens it (faster on big sets).
        allow_download: let a hub name download; otherwise only the local cache is read.

    Raises ValueError, whatever `strict`, when every row that names an image is broken by it.
    """
    if check_images not in ("full", "header"):
        raise ValueError(f"check_images must be 'full' or 'header', got {check_images!r}")
    if max_prompt_length is not None and (processor is None or max_prompt_length <= 0):
        raise ValueError("max_prompt_length needs a processor and must be positive")
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    stats, problems = LoadStats(), []
    batches, name = _arrow_batches(source, split, allow_download, stats.files)
    if image_dir is None and isinstance(source, (str, os.PathLike)):
        p = Path(source).expanduser()
        if p.exists():
            image_dir = p.resolve() if p.is_dir() else p.resolve().parent
        else:  # a hub name: its snapshot folder, when the hub cache holds one
            image_dir = _hub_snapshot(str(source).partition("@")[0])
    image_dir = Path(image_dir) if image_dir is not None else None

    fmt = None
    for batch in batches:
        for row in batch:
            if fmt is None:
                fmt = resolve_format(
                    list(row), format, problem_key=problem_key, answer_key=answer_key,
                    image_key=image_key, id_key=id_key, name=name,
                )  # fmt: skip
                stats.format = fmt.name
                row_id = fmt.id_key or next((k for k in ID_KEYS if k in row), None)
            index = stats.rows
            stats.rows += 1
            if fmt.image_key and row.get(fmt.image_key) not in (None, [], ()):
                stats.image_rows += 1
            try:
                p = _row_problem(row, index, name, fmt, row_id, image_dir, check_images == "full")
                if max_prompt_length is not None:
                    try:
                        n_tokens = prompt_length(p, processor, suffix)
                    except ValueError as e:  # e.g. an aspect ratio the image processor refuses
                        raise ValueError(f"the processor rejects its images ({e})") from e
            except ValueError as e:
                rid = f"{name}[{index}]" + (f" ({row_id}={row.get(row_id)})" if row_id else "")
                msg = f"broken row {rid}: {e}"
                if strict:
                    raise ValueError(msg) from e
                stats.broken += 1
                stats.image_failures += isinstance(e, _ImageRowError)
                stats.first_broken = stats.first_broken or msg
                stats.broken_rows.append(msg)
                continue
            if max_prompt_length is not None and n_tokens > max_prompt_length:
                stats.overlong += 1
                continue
            if not isinstance(row.get(fmt.answer_key), str):
                stats.non_string_answers += 1
                stats.first_non_string = stats.first_non_string or f"{p.uid}: {row.get(fmt.answer_key)!r}"
            stats.boxed_answers += "answer_as_stored" in p.meta
            problems.append(p)
            if limit is not None and len(problems) >= limit:
                break
        if limit is not None and len(problems) >= limit:
            break
    stats.kept = len(problems)
    if stats.image_rows and stats.image_failures == stats.image_rows:
        raise ValueError(
            f"every image of {name} failed to load ({stats.image_rows} row(s) name images; the first: "
            f"{stats.first_broken}): training would go on without the images. Check data.image_dir "
            "(relative paths are taken from the source's folder, then from a .zip archive there)"
        )
    if stats.broken:
        warnings.warn(
            f"skipped {stats.broken} broken row(s) of {stats.rows} in {name}; "
            f"the first: {stats.first_broken}",
            BrokenRowWarning,
            stacklevel=2,
        )
    if stats.non_string_answers:
        warnings.warn(
            f"{stats.non_string_answers} answer(s) in {name} are not strings and were converted to text "
            f"(integral floats as integers, others by str()); the first: {stats.first_non_string}",
            stacklevel=2,
        )
    if stats.overlong:
        logger.info(
            "dropped %d prompt(s) longer than %d tokens from %s", stats.overlong, max_prompt_length, name
        )
    return ProblemSet(problems, stats)


# ----------------------------------------------------------------------------------------------------
# python -m vppo.data check SOURCE


_NUMBER = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?%?|[-+]?\d+/\d+")
_LETTERS = re.compile(r"\(?[A-Z]\)?\.?(?:\s*,\s*\(?[A-Z]\)?)*")


def answer_kind(answer: str) -> str:
    """letter (`B`, `(B)`, `B.`, several as `A, C`), number (`12`, `-0.5`, `3/4`, `1,000`, `25%`) or
    expression (anything else): what `check` reports, for training sources and benchmarks alike."""
    t = answer.strip()
    if _LETTERS.fullmatch(t):
        return "letter"
    return "number" if _NUMBER.fullmatch(t.replace(",", "")) else "expression"


def check_source(
    source: str,
    split: str | None = "train",
    *,
    processor_path: str | None = None,
    suffix: str | None = PROMPT_SUFFIX,
    out=None,
    **load_kw,
) -> ProblemSet:
    """Load `source` as training does, without a model, and print what came out of it: the format,
    the files, rows, every broken row and why, images, answer kinds, one rendered prompt (the chat
    template of `processor_path` when given, else the user turn as text). Raises ValueError when the
    source cannot be read or yields no problem."""
    out = out or sys.stdout
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BrokenRowWarning)  # every broken row is printed below
        ps = load_problems(source, split, suffix=suffix, **load_kw)
    st = ps.stats
    fmt = source_formats().get(st.format or "")
    print(f"source: {source}" + (f" (split {split})" if split else ""), file=out)
    print(f"format: {st.format}" + (f" ({fmt.schema})" if fmt else ""), file=out)
    print(f"files: {', '.join(st.files) or '(rows in memory / hub cache)'}", file=out)
    archives = sorted({s.archive for p in ps for s in p.images if isinstance(s, ZipMember)})
    if archives:
        print(f"images read from: {', '.join(archives)} (not extracted)", file=out)
    print(f"rows: {st.rows} read, {st.kept} usable, {st.broken} broken", file=out)
    for msg in st.broken_rows:
        print(f"  {msg}", file=out)
    n_images = sum(len(p.images) for p in ps)
    text_only = sum(1 for p in ps if not p.images)
    print(
        f"images: {n_images} in {len(ps) - text_only} problem(s); {text_only} text-only problem(s)", file=out
    )
    kinds = {k: 0 for k in ("letter", "number", "expression")}
    for p in ps:
        kinds[answer_kind(p.answer)] += 1
    print(
        "answers: " + ", ".join(f"{k} {v}" for k, v in kinds.items())
        + f" ({st.boxed_answers} unwrapped from \\boxed{{}}, {st.non_string_answers} not strings)",
        file=out,
    )  # fmt: skip
    if not len(ps):
        raise ValueError(f"{source}: no usable problem ({st.rows} row(s) read, {st.broken} broken)")
    first = ps[0]
    if processor_path:
        prompt = render_prompt(first, load_processor(processor_path), suffix)
    else:
        parts = build_messages(first, suffix)[0]["content"]
        prompt = "".join(c["text"] if c["type"] == "text" else IMAGE_PLACEHOLDER for c in parts)
    print(f"prompt of {first.uid} (answer {first.answer!r}):\n{prompt}", file=out)
    return ps


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m vppo.data", description="Training data tools (no model).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser(
        "check",
        help="load a source as training does and report format, files, rows, broken rows, images, "
        "answer kinds and one prompt; exit 1 when it cannot be read or yields no problem",
    )
    c.add_argument("source", help="parquet file or folder, save_to_disk folder, or hub name (cache only)")
    c.add_argument("--split", default="train", help="split of a folder / hub set (default train)")
    c.add_argument("--format", default="auto", choices=FORMATS, help="data.format (default auto)")
    c.add_argument("--problem-key", default="problem", help="format columns / auto: the problem column")
    c.add_argument("--answer-key", default="answer", help="format columns / auto: the answer column")
    c.add_argument("--image-key", default="images", help="format columns / auto: the image column")
    c.add_argument(
        "--image-dir", default=None, help="folder for relative image paths (default: the source's)"
    )
    c.add_argument("--processor", default=None, help="model folder whose chat template renders the prompt")
    c.add_argument("--prompt-suffix", default=PROMPT_SUFFIX, help="appended to the problem ('' for none)")
    args = ap.parse_args(argv)
    try:
        check_source(
            args.source, args.split, processor_path=args.processor, suffix=args.prompt_suffix or None,
            format=args.format, problem_key=args.problem_key, answer_key=args.answer_key,
            image_key=args.image_key, image_dir=args.image_dir,
        )  # fmt: skip
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
