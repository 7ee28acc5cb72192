"""Problems in the VPPO training schema, their prompts, and the processor inputs built from them.

The schema (ViRL39K as converted for EasyR1 / VPPO): a `problem` text with one `<image>` placeholder
per image, an `answer`, and `images` (a list of {"bytes", "path"} structs, paths, or PIL images).
Keys are configurable. One API serves the training loop and the evaluation:

    problems = load_problems("data/virl39k.parquet", processor=processor, max_prompt_length=4096)
    batch = encode_prompts(problems[:8], processor)     # left-padded, ready for generate()
    suppress = vision_token_ids(processor)              # keep these out of sampling

Sources: a parquet file or a folder of them, a `datasets.save_to_disk` folder, a hub dataset name
(`name` or `name@split`, read from the local cache only unless `allow_download=True`), or an
in-memory list of row dicts. A broken row (missing problem or answer, an image that does not decode,
placeholders that do not match the images, an image the processor refuses when prompt lengths are
checked) is skipped and counted, with one warning per load naming
the first one; `strict=True` raises instead.

The prompt follows the released recipe (docs/algorithm.md section 5): the problem text, trimmed, then a blank
line and PROMPT_SUFFIX (the `math_perception` format prompt of the EasyR1 / PAPO code VPPO builds on),
split at the placeholders into the Qwen2.5-VL chat content list. The chat template adds its default
system message, as in the released training code.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
from PIL import Image

from vppo.config import VPPO_PROMPT_SUFFIX

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

ImageSource = Image.Image | bytes | str


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


# ----------------------------------------------------------------------------------------------------
# images


def open_image(
    src: ImageSource | dict | os.PathLike, image_dir: str | os.PathLike | None = None
) -> Image.Image:
    """Decode one image source to an RGB PIL image.

    `src`: a PIL image, encoded bytes, a path (relative paths are taken from `image_dir`), or a
    {"bytes", "path"} dict as written by `datasets` (bytes win when both are set).
    """
    if isinstance(src, Image.Image):
        img = src
    else:
        src = _image_source(src, image_dir)
        img = Image.open(io.BytesIO(src) if isinstance(src, bytes) else src)
        img.load()
    return img if img.mode == "RGB" else img.convert("RGB")


def _image_source(src: Any, image_dir: str | os.PathLike | None) -> ImageSource:
    """Normalise one stored image to encoded bytes, an absolute path string, or a PIL image."""
    if isinstance(src, dict):
        if src.get("bytes") is not None:
            src = src["bytes"]
        elif src.get("path"):
            src = src["path"]
        else:
            raise ValueError("image dict has neither 'bytes' nor 'path'")
    if isinstance(src, (bytes, bytearray, memoryview)):
        return bytes(src)
    if isinstance(src, Image.Image):
        return src
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        if not path.is_absolute() and image_dir is not None:
            path = Path(image_dir) / path
        return str(path)
    raise ValueError(f"unsupported image type {type(src).__name__}")


def _check_image(src: ImageSource, full: bool) -> tuple[int, int]:
    """(width, height) of one image; raises if it does not decode (`full`) or open (header only)."""
    if isinstance(src, Image.Image):
        return src.size
    with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as img:
        if full:
            img.load()
        return img.size


# ----------------------------------------------------------------------------------------------------
# prompts and processor inputs


def build_messages(problem: Problem | str, suffix: str | None = PROMPT_SUFFIX) -> list[dict]:
    """Chat messages for the Qwen2.5-VL template: one user turn, images where the placeholders are.

    The text is `problem.strip() + "\\n\\n" + suffix` (no suffix when `suffix` is None or empty), split
    at `<image>`; the image entries carry no data (the processor gets the images in order).
    """
    text = problem.problem if isinstance(problem, Problem) else problem
    text = text.strip()
    if suffix:
        text = f"{text}\n\n{suffix}"
    content: list[dict] = []
    for i, part in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if i > 0:
            content.append({"type": "image"})
        if part:
            content.append({"type": "text", "text": part})
    return [{"role": "user", "content": content}]


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
    chosen = [f for f, s in named.items() if s == split]
    if not chosen:
        found = sorted({s for s in named.values() if s})
        raise ValueError(f"split {split!r} not found in {folder} (splits there: {found})")
    return chosen


def _arrow_batches(source: Any, split: str | None, allow_download: bool) -> tuple[Iterator[list[dict]], str]:
    """Row batches (lists of dicts) from any supported source, and a short name for messages."""
    if isinstance(source, Sequence) and not isinstance(source, (str, bytes)):
        rows = list(source)
        if rows and not all(isinstance(r, dict) for r in rows):
            raise ValueError("source, when a list, must hold row dicts")
        return iter([rows]), "rows"
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"source must be a path, a dataset name, or a list of row dicts, got {type(source)}")

    def from_parquet(files: list[Path]) -> Iterator[list[dict]]:
        for f in files:
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
            if split not in dd:
                raise ValueError(f"split {split!r} not in {path} (splits there: {sorted(dd)})")
            return from_dataset(dd[split]), f"{path.name}/{split}"
        if (path / "state.json").exists():
            return from_dataset(datasets.load_from_disk(str(path))), path.name
        return from_parquet(_split_files(path, split)), path.name
    text = str(source)
    if text.endswith(".parquet") or text.startswith((".", "/", "~")):
        raise ValueError(f"source {text!r} does not exist")
    # A hub dataset name, optionally `name@split` as in EasyR1 configs.
    name, _, at_split = text.partition("@")
    split = at_split or split or "train"
    import datasets  # heavy: ~0.4 s, hub sources only

    try:
        with _hub_offline(not allow_download):
            ds = datasets.load_dataset(name, split=split)
    except (ConnectionError, FileNotFoundError) as e:
        raise ValueError(
            f"source {text!r} is neither a local path nor a dataset in the local Hugging Face cache "
            f"(nothing is downloaded unless allow_download=True): {e}"
        ) from e
    return from_dataset(ds), f"{name}@{split}"


# ----------------------------------------------------------------------------------------------------
# loading


def _row_problem(
    row: dict,
    index: int,
    name: str,
    keys: tuple[str, str, str | None],
    id_key: str | None,
    image_dir: Path | None,
    full_check: bool,
) -> Problem:
    """One row as a Problem; raises ValueError (message without the row name) when it is broken."""
    problem_key, answer_key, image_key = keys
    text = row.get(problem_key)
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"missing or empty {problem_key!r}")
    answer = row.get(answer_key)
    if answer is None or not _answer_text(answer):
        raise ValueError(f"missing or empty {answer_key!r}")
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
            src = _image_source(r, image_dir)
            sizes.append(_check_image(src, full_check))
        except Exception as e:  # any decoder error means the same thing here
            raise ValueError(f"image {j} does not decode ({type(e).__name__}: {e})") from e
        sources.append(src)
    uid = f"{name}[{index}]"
    if id_key and row.get(id_key) is not None:
        uid = f"{uid} ({id_key}={row[id_key]})"
    meta = {k: v for k, v in row.items() if k not in (problem_key, answer_key, image_key)}
    return Problem(uid, text, _answer_text(answer), tuple(sources), tuple(sizes), meta)


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
        split: which split of a folder / DatasetDict / hub dataset (ignored for single files).
        problem_key, answer_key, image_key: column names (`image_key=None`: a text-only set).
        id_key: column naming rows in messages; default the first of id / qid / uid / pid present.
        image_dir: folder for relative image paths (default: the source's folder).
        processor, max_prompt_length: when both are set, prompts longer than max_prompt_length tokens
            (after image expansion, with `suffix`) are dropped and counted in `stats.overlong`.
        strict: raise ValueError at the first broken row instead of skipping it.
        limit: stop after this many kept problems.
        check_images: "full" decodes every image once; "header" only opens it (faster on big sets).
        allow_download: let a hub name download; otherwise only the local cache is read.
    """
    if check_images not in ("full", "header"):
        raise ValueError(f"check_images must be 'full' or 'header', got {check_images!r}")
    if max_prompt_length is not None and (processor is None or max_prompt_length <= 0):
        raise ValueError("max_prompt_length needs a processor and must be positive")
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    batches, name = _arrow_batches(source, split, allow_download)
    if image_dir is None and isinstance(source, (str, os.PathLike)) and Path(source).exists():
        p = Path(source).expanduser().resolve()
        image_dir = p if p.is_dir() else p.parent
    image_dir = Path(image_dir) if image_dir is not None else None

    stats, problems = LoadStats(), []
    keys_checked = False
    for batch in batches:
        for row in batch:
            if not keys_checked:
                for arg, key in (
                    ("problem_key", problem_key),
                    ("answer_key", answer_key),
                    ("image_key", image_key),
                ):
                    if key is not None and key not in row:
                        raise ValueError(f"{arg}={key!r} is not a column of {name} (columns: {sorted(row)})")
                if id_key is None:
                    id_key = next((k for k in ID_KEYS if k in row), None)
                keys_checked = True
            index = stats.rows
            stats.rows += 1
            try:
                p = _row_problem(
                    row,
                    index,
                    name,
                    (problem_key, answer_key, image_key),
                    id_key,
                    image_dir,
                    check_images == "full",
                )
                if max_prompt_length is not None:
                    try:
                        n_tokens = prompt_length(p, processor, suffix)
                    except ValueError as e:  # e.g. an aspect ratio the image processor refuses
                        raise ValueError(f"the processor rejects its images ({e})") from e
            except ValueError as e:
                rid = f"{name}[{index}]" + (f" ({id_key}={row.get(id_key)})" if id_key else "")
                msg = f"broken row {rid}: {e}"
                if strict:
                    raise ValueError(msg) from e
                stats.broken += 1
                stats.first_broken = stats.first_broken or msg
                continue
            if max_prompt_length is not None and n_tokens > max_prompt_length:
                stats.overlong += 1
                continue
            if not isinstance(row.get(answer_key), str):
                stats.non_string_answers += 1
                stats.first_non_string = stats.first_non_string or f"{p.uid}: {row.get(answer_key)!r}"
            problems.append(p)
            if limit is not None and len(problems) >= limit:
                break
        if limit is not None and len(problems) >= limit:
            break
    stats.kept = len(problems)
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
