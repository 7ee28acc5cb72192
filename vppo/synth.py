"""A synthetic visual-reasoning set: drawn images, short-answer questions that need the image.

    python -m vppo.synth                 # build (or find in the cache) the default set, print a summary
    python -m vppo.synth --out DIR --seed 1

Five task types, drawn with PIL on small grey RGB images (84 x 84: a 6 x 6 grid of 14-pixel patches, 9
image tokens after the 2 x 2 merge), each with difficulty mixed inside it:
- colour: 1 shape (half the time) or 2-3 of different kinds and colours, "what colour is the <kind>?";
- count:  1-5 shapes of one colour, half the time among 1-3 of other colours, "how many <colour> shapes?";
- bars:   3-4 bars of different colours, "which bar is the tallest?" (margins down to 3 pixels);
- number: a 1- or 2-digit number written at a random place, size and colour;
- angle:  a triangle drawn with its true angles, two of them written at their corners, "the third
          angle?" (read two numbers, then subtract: meant to stay hard for a tiny model).
The spotlight family (`--variant spotlight`, `data.synth=spotlight`; not part of the default set):
- count_add:      count the shapes of one colour, then add a number given in the question;
- colour_letters: the colour of one shape (red / blue / green / yellow), answered as its letter count;
- bars_height:    the height of one bar in grid units (one 14-pixel patch row each), doubled.
The multiread family (`--variant multiread`, `data.synth=multiread`): each response reads several
values off the image, about a fifth of its tokens (bars_sum: colour and height of every bar, summed;
bars_max: the same, the greatest height; count_most: each colour and its count, the colour with the
most shapes); every word and number of the reading segment before the first " . " is visual.
Each spotlight reference response reads one value off the image and then computes in text ("there are 4 red
shapes . 4 + 3 = 7"); only the first occurrence of the value depends on the image, and its character
span is recorded as `visual_spans` (JSON [[start, end]]); `visual_spans(task, text)` finds it in any
response that follows the format (the policy's own), the ground truth of vppo.spotlight.
Rows follow the VPPO training schema (`problem` with one `<image>`, `answer`, `images` as embedded
PNG bytes) plus `id`, `task` and `response`, a target in the `<think> ... </think> \\boxed{...}` format
for the supervised warm start. Everything is deterministic in the seed. The best text-only guess
(the most common train answer of each task type) is measured on val and test, so the set's visual
dependency is known.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont

from vppo import paths

SYNTH_VERSION = 5  # bump when the drawing or the questions change: the cache key includes it
TASKS = ("colour", "count", "bars", "number", "angle")
SPLITS = ("train", "val", "test")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
}
KINDS = ("circle", "square", "triangle")
# Mid grey normalises to about 0 under the CLIP mean / std the processor uses, so the drawn marks,
# not the background, dominate the image features: a tiny model starts using the image within ~60
# steps instead of ~200 on white (measured on the colour task).
BACKGROUND = (128, 128, 128)
META_FILE = "meta.json"


@dataclass(frozen=True)
class SynthConfig:
    seed: int = 0
    n_train: int = 6000
    n_val: int = 256
    n_test: int = 512
    size: int = 84  # pixels, a multiple of 28 so no resize happens in the processor
    tasks: tuple[str, ...] = TASKS

    def __post_init__(self):
        if self.size % 28 or self.size < 56:
            raise ValueError(f"size must be a multiple of 28 and at least 56, got {self.size}")
        known = TASKS + SPOTLIGHT_TASKS + MULTIREAD_TASKS
        if not self.tasks or set(self.tasks) - set(known):
            raise ValueError(f"tasks must be a non-empty subset of {known}, got {self.tasks}")
        for name in ("n_train", "n_val", "n_test"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")


def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _shape(draw: ImageDraw.ImageDraw, kind: str, box: tuple[int, int, int, int], colour) -> None:
    x0, y0, x1, y1 = box
    if kind == "circle":
        draw.ellipse(box, fill=colour)
    elif kind == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=colour)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1 - 1), (x0, y1 - 1)], fill=colour)


def _cells(rng: np.random.Generator, size: int, n: int, cell: int) -> list[tuple[int, int]]:
    """Top-left corners of n distinct grid cells, so shapes never touch."""
    per_side = size // cell
    picks = rng.choice(per_side * per_side, size=n, replace=False)
    return [(int(p % per_side) * cell, int(p // per_side) * cell) for p in picks]


def _colour_task(rng, size):
    n = 1 if rng.random() < 0.5 else int(rng.integers(2, 4))  # one shape: the easy half
    kinds = [str(k) for k in rng.choice(KINDS, size=n, replace=False)]
    names = [str(c) for c in rng.choice(list(COLOURS), size=n, replace=False)]
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    cell = size // 2
    for (x, y), kind, name in zip(_cells(rng, size, n, cell), kinds, names):
        s = int(rng.integers(cell // 2, cell - 3))
        dx, dy = (int(v) for v in rng.integers(1, cell - s, size=2))
        _shape(draw, kind, (x + dx, y + dy, x + dx + s, y + dy + s), COLOURS[name])
    target = int(rng.integers(n))
    kind, answer = kinds[target], names[target]
    question = f"What colour is the {kind}?"
    response = f"<think> the {kind} is {answer} </think> \\boxed{{{answer}}}"
    return img, question, answer, response


def _count_task(rng, size):
    name = str(rng.choice(list(COLOURS)))
    n = int(rng.integers(1, 6))
    others = [c for c in COLOURS if c != name]
    # No distractors in the easy half; 1-3 shapes of other colours in the rest.
    n_distract = 0 if rng.random() < 0.5 else int(rng.integers(1, 4))
    distract = [str(c) for c in rng.choice(others, size=n_distract)]
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    cell = size // 3
    spots = _cells(rng, size, n + len(distract), cell)
    for (x, y), c in zip(spots, [name] * n + distract):
        s = int(rng.integers(cell // 2, cell - 4))
        dx, dy = (int(v) for v in rng.integers(1, cell - s, size=2))
        _shape(draw, str(rng.choice(KINDS)), (x + dx, y + dy, x + dx + s, y + dy + s), COLOURS[c])
    question = f"How many {name} shapes are there?"
    response = f"<think> {n} {name} shapes </think> \\boxed{{{n}}}"
    return img, question, str(n), response


def _bars_task(rng, size):
    k = int(rng.integers(3, 5))
    names = [str(c) for c in rng.choice(list(COLOURS), size=k, replace=False)]
    top = size - 8
    margin = int(rng.choice([3, 6, 12, 20]))  # small margins make some questions hard
    tallest = int(rng.integers(30 + margin, top))
    heights = [int(h) for h in rng.integers(10, tallest - margin + 1, size=k)]
    winner = int(rng.integers(k))
    heights[winner] = tallest
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    width = (size - 8) // k
    for i, (name, h) in enumerate(zip(names, heights)):
        x0 = 4 + i * width
        draw.rectangle((x0 + 2, size - 4 - h, x0 + width - 3, size - 5), fill=COLOURS[name])
    answer = names[winner]
    question = "Which bar is the tallest? Answer with its colour."
    response = f"<think> the {answer} bar is tallest </think> \\boxed{{{answer}}}"
    return img, question, answer, response


def _number_task(rng, size):
    value = int(rng.integers(0, 10)) if rng.random() < 0.5 else int(rng.integers(10, 100))
    text = str(value)
    font = _font(int(rng.integers(24, 36)))
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    x = int(rng.integers(2 - x0, size - 2 - x1 + 1))
    y = int(rng.integers(2 - y0, size - 2 - y1 + 1))
    base = 0 if rng.random() < 0.5 else 200  # dark or light text, never close to the grey background
    colour = tuple(int(v) for v in rng.integers(base, base + 56, size=3))
    draw.text((x, y), text, fill=colour, font=font)
    question = "What number is written in the image?"
    response = f"<think> it reads {text} </think> \\boxed{{{text}}}"
    return img, question, text, response


def _angle_task(rng, size):
    while True:
        a, b = (int(v) for v in rng.integers(6, 21, size=2) * 5)  # 30..100 degrees
        if a + b <= 150:
            break
    # Base A-B on the x axis, C where the rays at angles a (at A) and b (at B) meet.
    ta, tb = math.tan(math.radians(a)), math.tan(math.radians(b))
    cx = tb / (ta + tb)
    pts = np.array([[0.0, 0.0], [1.0, 0.0], [cx, cx * ta]])
    pts -= pts.min(0)
    label_h = 16  # a strip under the base for the two written angles
    scale = min((size - 12) / pts[:, 0].max(), (size - 12 - label_h) / pts[:, 1].max())
    pts = pts * scale + 6
    pts[:, 1] = size - label_h - pts[:, 1]  # image y grows downwards
    left, right = a, b
    if rng.random() < 0.5:
        pts[:, 0] = size - pts[:, 0]  # mirror: the marked corners swap sides
        left, right = b, a
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    draw.polygon([tuple(p) for p in pts], outline=(0, 0, 0), width=2)
    font = _font(12)
    for p, v in ((pts[0], a), (pts[1], b)):
        x0, y0, x1, y1 = draw.textbbox((0, 0), str(v), font=font)
        x = min(max(p[0] - (x0 + x1) / 2, 1 - x0), size - 1 - x1)
        draw.text((x, p[1] + 3 - y0), str(v), fill=(30, 30, 200), font=font)
    answer = str(180 - a - b)
    question = (
        "Two angles of the triangle are written under its corners, in degrees. What is the third angle?"
    )
    response = f"<think> 180 - {left} - {right} = {answer} </think> \\boxed{{{answer}}}"
    return img, question, answer, response


# ----------------------------------------------------------------------------------------------------
# The spotlight family: read one value off the image, then compute with it in text. Only the tokens
# of the value read (the first time it is written) depend on the image; the rest of the chain
# (copying the value, the arithmetic, the answer) follows from the question and the response so far.
# Each maker returns a fifth item, the character spans of the reference response read off the image.

LETTER_COLOURS = ("red", "blue", "green", "yellow")  # 3, 4, 5, 6 letters: the answer names the colour
UNIT = 14  # bars_height: one unit of height = one 14-pixel patch row, marked by grid lines


def _count_add_task(rng, size):
    name = str(rng.choice(list(COLOURS)))
    n = int(rng.integers(1, 6))
    k = int(rng.integers(1, 5))
    others = [c for c in COLOURS if c != name]
    n_distract = 0 if rng.random() < 0.5 else int(rng.integers(1, 4))
    distract = [str(c) for c in rng.choice(others, size=n_distract)]
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    cell = size // 3
    for (x, y), c in zip(_cells(rng, size, n + len(distract), cell), [name] * n + distract):
        s = int(rng.integers(cell // 2, cell - 4))
        dx, dy = (int(v) for v in rng.integers(1, cell - s, size=2))
        _shape(draw, str(rng.choice(KINDS)), (x + dx, y + dy, x + dx + s, y + dy + s), COLOURS[c])
    question = f"How many {name} shapes are there? Add {k} to that count."
    head = "<think> there are "
    response = f"{head}{n} {name} shapes . {n} + {k} = {n + k} </think> \\boxed{{{n + k}}}"
    return img, question, str(n + k), response, [(len(head), len(head) + len(str(n)))]


def _colour_letters_task(rng, size):
    n = 1 if rng.random() < 0.5 else int(rng.integers(2, 4))
    kinds = [str(k) for k in rng.choice(KINDS, size=n, replace=False)]
    names = [str(c) for c in rng.choice(LETTER_COLOURS, size=n, replace=False)]
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    cell = size // 2
    for (x, y), kind, name in zip(_cells(rng, size, n, cell), kinds, names):
        s = int(rng.integers(cell // 2, cell - 3))
        dx, dy = (int(v) for v in rng.integers(1, cell - s, size=2))
        _shape(draw, kind, (x + dx, y + dy, x + dx + s, y + dy + s), COLOURS[name])
    target = int(rng.integers(n))
    kind, colour = kinds[target], names[target]
    answer = str(len(colour))
    question = f"What colour is the {kind}? Answer with the number of letters of that colour."
    head = f"<think> the {kind} is "
    response = f"{head}{colour} . {colour} has {answer} letters </think> \\boxed{{{answer}}}"
    return img, question, answer, response, [(len(head), len(head) + len(colour))]


def _grid_bars(size: int, names: list[str], heights: list[int]) -> Image.Image:
    """Bars of the given colours and heights (in UNIT pixels) side by side over faint grid lines at
    every unit (the bars_height and multiread bar tasks)."""
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    bottom = size - 4
    for u in range(1, 6):
        draw.line((0, bottom - u * UNIT, size - 1, bottom - u * UNIT), fill=(100, 100, 100), width=1)
    width = (size - 8) // len(names)
    for i, (name, h) in enumerate(zip(names, heights)):
        x0 = 4 + i * width
        draw.rectangle((x0 + 3, bottom - h * UNIT, x0 + width - 4, bottom - 1), fill=COLOURS[name])
    return img


def _bars_height_task(rng, size):
    k = int(rng.integers(2, 4))
    names = [str(c) for c in rng.choice(list(COLOURS), size=k, replace=False)]
    heights = [int(h) for h in rng.integers(1, 6, size=k)]  # units of UNIT pixels
    img = _grid_bars(size, names, heights)
    target = int(rng.integers(k))
    name, h = names[target], heights[target]
    question = f"How many grid units tall is the {name} bar? Double it."
    head = f"<think> the {name} bar is "
    response = f"{head}{h} units . {h} * 2 = {2 * h} </think> \\boxed{{{2 * h}}}"
    return img, question, str(2 * h), response, [(len(head), len(head) + len(str(h)))]


# The multiread family: each response reads several values off the image (the colour and height of each
# bar, or each colour and its count), then computes; about a fifth of its tokens depend on the image,
# where the spotlight family has one such token a response. Shapes and bars are listed in the reading segment
# `<think> <read> . <compute> </think>`; every word and number of <read> was read off the image.
def _bars_sum_task(rng, size):
    k = int(rng.integers(2, 4))
    names = [str(c) for c in rng.choice(list(COLOURS), size=k, replace=False)]
    heights = [int(h) for h in rng.integers(1, 5, size=k)]  # units of UNIT pixels
    img = _grid_bars(size, names, heights)
    read = " , ".join(f"{n} {h}" for n, h in zip(names, heights))
    total = sum(heights)
    question = "Add up the heights of all the bars, in grid units."
    response = f"<think> {read} . {' + '.join(map(str, heights))} = {total} </think> \\boxed{{{total}}}"
    return img, question, str(total), response


def _bars_max_task(rng, size):
    k = int(rng.integers(2, 4))
    names = [str(c) for c in rng.choice(list(COLOURS), size=k, replace=False)]
    heights = [int(h) for h in rng.choice(np.arange(1, 6), size=k, replace=False)]  # one tallest
    img = _grid_bars(size, names, heights)
    read = " , ".join(f"{n} {h}" for n, h in zip(names, heights))
    top = max(heights)
    question = "How many grid units tall is the tallest bar?"
    response = f"<think> {read} . {top} </think> \\boxed{{{top}}}"
    return img, question, str(top), response


def _count_most_task(rng, size):
    k = int(rng.integers(2, 4))
    names = sorted(str(c) for c in rng.choice(list(COLOURS), size=k, replace=False))
    counts = [int(c) for c in rng.choice(np.arange(1, 4), size=k, replace=False)]  # one most
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    cell = size // 3
    colours = [n for n, c in zip(names, counts) for _ in range(c)]
    for (x, y), c in zip(_cells(rng, size, len(colours), cell), colours):
        s = int(rng.integers(cell // 2, cell - 4))
        dx, dy = (int(v) for v in rng.integers(1, cell - s, size=2))
        _shape(draw, str(rng.choice(KINDS)), (x + dx, y + dy, x + dx + s, y + dy + s), COLOURS[c])
    answer = names[counts.index(max(counts))]
    question = "Which colour has the most shapes?"
    read = " , ".join(f"{n} {c}" for n, c in zip(names, counts))
    response = f"<think> {read} . {answer} </think> \\boxed{{{answer}}}"
    return img, question, answer, response


MAKERS = {
    "colour": _colour_task,
    "count": _count_task,
    "bars": _bars_task,
    "number": _number_task,
    "angle": _angle_task,
    "count_add": _count_add_task,
    "colour_letters": _colour_letters_task,
    "bars_height": _bars_height_task,
    "bars_sum": _bars_sum_task,
    "bars_max": _bars_max_task,
    "count_most": _count_most_task,
}
SPOTLIGHT_TASKS = ("count_add", "colour_letters", "bars_height")
MULTIREAD_TASKS = ("bars_sum", "bars_max", "count_most")
READ_SEGMENT = re.compile(r"<think> (.+?) \. ")  # the multiread tasks' reading segment (group 1)
# How a response written in the reference format shows the value read off the image (group 1): finds
# the ground-truth visual span in the policy's own responses, which need not match the reference.
VISUAL_PATTERNS = {
    "count_add": re.compile(r"there are (\d+) "),
    "colour_letters": re.compile(r"the \w+ is (\w+)"),
    "bars_height": re.compile(r"bar is (\d+) "),
    **{t: READ_SEGMENT for t in MULTIREAD_TASKS},
}
VARIANTS = {
    "default": SynthConfig(),
    "spotlight": SynthConfig(tasks=SPOTLIGHT_TASKS),
    "multiread": SynthConfig(tasks=MULTIREAD_TASKS),
}


def visual_spans(task: str, text: str) -> list[tuple[int, int]] | None:
    """Character spans of `text` (a response to a `task` problem) that were read off the image: the
    first value written in the reasoning. None when the task has no known spans or the response does
    not follow the format (then nothing in it is known to be visual)."""
    pattern = VISUAL_PATTERNS.get(task)
    m = pattern.search(text) if pattern is not None else None
    if m is None:
        return None
    if task in MULTIREAD_TASKS:  # every word and number of the reading segment
        a = m.start(1)
        return [(a + w.start(), a + w.end()) for w in re.finditer(r"[A-Za-z]+|\d+", m.group(1))] or None
    return [m.span(1)]


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def make_split(cfg: SynthConfig, split: str) -> list[dict]:
    """The rows of one split, deterministic in (cfg.seed, split); tasks cycle so each is equally frequent."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    n = {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test}[split]
    rng = np.random.default_rng([cfg.seed, SPLITS.index(split)])
    rows = []
    for i in range(n):
        task = cfg.tasks[i % len(cfg.tasks)]
        img, question, answer, response, *spans = MAKERS[task](rng, cfg.size)
        if task in MULTIREAD_TASKS:
            spans = [visual_spans(task, response)]
        row = {
            "id": f"{split}-{i}",
            "problem": f"<image>{question}",
            "answer": answer,
            "images": [{"bytes": _png(img), "path": None}],
            "task": task,
            "response": response,
        }
        if spans:  # the spotlight family: [[start, end], ...] of `response` read off the image
            row["visual_spans"] = json.dumps([list(s) for s in spans[0]])
        rows.append(row)
    return rows


def text_only_baseline(train: list[dict], evaluated: list[dict]) -> dict[str, float]:
    """Accuracy on `evaluated` of the most common `train` answer of each task type (per task and overall)."""
    best = {
        task: Counter(r["answer"] for r in train if r["task"] == task).most_common(1)[0][0]
        for task in {r["task"] for r in train}
    }
    out, hits = {}, []
    for task in sorted({r["task"] for r in evaluated}):
        h = [best.get(task) == r["answer"] for r in evaluated if r["task"] == task]
        out[task] = sum(h) / len(h)
        hits += h
    out["all"] = sum(hits) / len(hits)
    return out


def write_synth(cfg: SynthConfig, out: str | Path) -> dict:
    """Write train / val / test parquet files and meta.json (config, counts, text-only baseline) to `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows = {split: make_split(cfg, split) for split in SPLITS}
    for split, r in rows.items():
        pq.write_table(pa.Table.from_pylist(r), out / f"{split}.parquet")
    meta = {
        "config": asdict(cfg),
        "version": SYNTH_VERSION,
        "rows": {s: len(r) for s, r in rows.items()},
        "text_only_baseline": {s: text_only_baseline(rows["train"], rows[s]) for s in ("val", "test")},
        "build_seconds": round(time.perf_counter() - t0, 2),
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2))
    return meta


def synth_key(cfg: SynthConfig) -> str:
    return paths.artifact_key({"synth": asdict(cfg), "version": SYNTH_VERSION})


def ensure_synth_data(cfg: SynthConfig | None = None, root: str | Path | None = None) -> Path:
    """The folder holding the set for `cfg` (default config), built on first use under the cache."""
    cfg = cfg or SynthConfig()
    target = Path(root or paths.synth_root()) / synth_key(cfg)
    target.parent.mkdir(parents=True, exist_ok=True)
    return paths.build_once(target, lambda tmp: write_synth(cfg, tmp), META_FILE)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="write here instead of the cache folder")
    ap.add_argument("--variant", choices=sorted(VARIANTS), default="default", help="the task family")
    ap.add_argument("--seed", type=int, default=SynthConfig.seed)
    ap.add_argument("--n-train", type=int, default=SynthConfig.n_train)
    ap.add_argument("--n-val", type=int, default=SynthConfig.n_val)
    ap.add_argument("--n-test", type=int, default=SynthConfig.n_test)
    args = ap.parse_args(argv)
    cfg = SynthConfig(
        seed=args.seed, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test,
        tasks=VARIANTS[args.variant].tasks,
    )  # fmt: skip
    if args.out:
        write_synth(cfg, args.out)
        out = Path(args.out)
    else:
        out = ensure_synth_data(cfg)
    meta = json.loads((out / META_FILE).read_text())
    print(f"synthetic set in {out}: {meta['rows']}")
    for split, base in meta["text_only_baseline"].items():
        per = ", ".join(f"{t} {v:.1%}" for t, v in base.items() if t != "all")
        print(f"text-only baseline on {split}: {base['all']:.1%} ({per})")


if __name__ == "__main__":
    main()
