import io
import json
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from vppo import synth
from vppo.data import load_problems
from vppo.synth import COLOURS, SynthConfig, ensure_synth_data, make_split, text_only_baseline, write_synth

SMALL = SynthConfig(seed=3, n_train=60, n_val=25, n_test=25)


def _pixels(row: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(row["images"][0]["bytes"])).convert("RGB"))


def _mask(arr: np.ndarray, colour: str) -> np.ndarray:
    return (arr == np.array(COLOURS[colour], dtype=np.uint8)).all(-1)


def _components(mask: np.ndarray) -> int:
    """4-connected components of a boolean mask (a small flood fill)."""
    seen = np.zeros_like(mask)
    n = 0
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        n += 1
        stack = [(y, x)]
        seen[y, x] = True
        while stack:
            cy, cx = stack.pop()
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
    return n


def test_deterministic_by_seed():
    a, b = make_split(SMALL, "val"), make_split(SMALL, "val")
    assert a == b
    other = make_split(SynthConfig(seed=4, n_train=60, n_val=25, n_test=25), "val")
    assert [r["images"] for r in other] != [r["images"] for r in a]
    test = make_split(SMALL, "test")
    assert [r["images"] for r in test] != [r["images"] for r in a]
    assert Counter(r["task"] for r in make_split(SMALL, "train")) == {t: 12 for t in synth.TASKS}


def test_answers_match_the_drawings():
    rows = make_split(SynthConfig(seed=0, n_train=200, n_val=1, n_test=1), "train")
    checked = Counter()
    for r in rows:
        arr = _pixels(r)
        assert arr.shape == (84, 84, 3)
        assert r["response"].endswith(f"\\boxed{{{r['answer']}}}") and r["response"].startswith("<think> ")
        if r["task"] == "count":
            colour = re.search(r"How many (\w+) shapes", r["problem"]).group(1)
            assert _components(_mask(arr, colour)) == int(r["answer"])
        elif r["task"] == "bars":
            heights = {c: int(_mask(arr, c).any(1).sum()) for c in COLOURS if _mask(arr, c).any()}
            assert max(heights, key=heights.get) == r["answer"]
            assert sorted(heights.values())[-1] - sorted(heights.values())[-2] >= 3
        elif r["task"] == "colour":
            assert _mask(arr, r["answer"]).sum() > 10
        elif r["task"] == "angle":
            left, right = map(int, re.search(r"180 - (\d+) - (\d+) =", r["response"]).groups())
            assert int(r["answer"]) == 180 - left - right >= 30
        elif r["task"] == "number":
            assert (np.abs(arr.astype(int) - 128).max(-1) > 60).sum() > 20  # text drawn on the grey
        checked[r["task"]] += 1
    assert set(checked) == set(synth.TASKS)


def test_written_splits_load_and_baseline_is_low(tmp_path):
    meta = write_synth(SMALL, tmp_path)
    assert meta["rows"] == {"train": 60, "val": 25, "test": 25}
    assert json.loads((tmp_path / "meta.json").read_text()) == json.loads(json.dumps(meta))
    train = make_split(SMALL, "train")
    for split in ("train", "val", "test"):
        ps = load_problems(tmp_path, split)
        assert ps.stats.kept == ps.stats.rows == meta["rows"][split] and ps.stats.broken == 0
        assert ps[0].image_sizes == ((84, 84),) and ps[0].meta["task"] == "colour"
    val = make_split(SMALL, "val")
    assert meta["text_only_baseline"]["val"] == text_only_baseline(train, val)
    assert meta["text_only_baseline"]["val"]["all"] < 0.3


def test_text_only_baseline_by_hand():
    train = [{"task": "a", "answer": x} for x in "xxy"] + [{"task": "b", "answer": "1"}]
    evaluated = [{"task": "a", "answer": x} for x in "xyy"] + [{"task": "b", "answer": "2"}]
    assert text_only_baseline(train, evaluated) == {"a": 1 / 3, "b": 0.0, "all": 0.25}


def test_ensure_synth_data_builds_once_per_config(tmp_path):
    cfg = SynthConfig(seed=1, n_train=10, n_val=5, n_test=5)
    first = ensure_synth_data(cfg, tmp_path)
    stamp = (first / "meta.json").stat().st_mtime_ns
    assert ensure_synth_data(cfg, tmp_path) == first
    assert (first / "meta.json").stat().st_mtime_ns == stamp
    second = ensure_synth_data(SynthConfig(seed=2, n_train=10, n_val=5, n_test=5), tmp_path)
    assert second != first and (second / "train.parquet").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == sorted(
        [first.name, second.name]
    )


def test_config_is_checked():
    with pytest.raises(ValueError, match="size"):
        SynthConfig(size=90)
    with pytest.raises(ValueError, match="tasks"):
        SynthConfig(tasks=("colour", "juggling"))
    with pytest.raises(ValueError, match="n_val"):
        SynthConfig(n_val=0)
    with pytest.raises(ValueError, match="split"):
        make_split(SMALL, "dev")


# ----------------------------------------------------------------------------------------------------
# the spotlight family: the ground-truth visual spans


def test_spotlight_spans_are_the_values_read_off_the_image():
    cfg = synth.VARIANTS["spotlight"]
    rows = make_split(SynthConfig(tasks=cfg.tasks, n_train=150, n_val=1, n_test=1), "train")
    assert Counter(r["task"] for r in rows) == {t: 50 for t in synth.SPOTLIGHT_TASKS}
    for r in rows:
        arr, resp = _pixels(r), r["response"]
        spans = json.loads(r["visual_spans"])
        assert len(spans) == 1 and spans == [list(s) for s in synth.visual_spans(r["task"], resp)]
        ((a, b),) = spans
        read = resp[a:b]
        assert resp.endswith(f"\\boxed{{{r['answer']}}}") and resp.startswith("<think> ")
        # the value read occurs again later (copied) but only the first occurrence is visual
        assert resp.index(read) == a and resp.count(read) >= 2
        if r["task"] == "count_add":
            colour, k = re.search(r"How many (\w+) shapes are there\? Add (\d+)", r["problem"]).groups()
            assert _components(_mask(arr, colour)) == int(read)
            assert int(r["answer"]) == int(read) + int(k)
        elif r["task"] == "colour_letters":
            assert read in synth.LETTER_COLOURS and _mask(arr, read).sum() > 10
            assert int(r["answer"]) == len(read)
        else:
            colour = re.search(r"tall is the (\w+) bar", r["problem"]).group(1)
            rows_px = int(_mask(arr, colour).any(1).sum())
            assert rows_px == int(read) * synth.UNIT
            assert int(r["answer"]) == 2 * int(read)


def test_visual_spans_on_free_text():
    assert synth.visual_spans("count_add", "<think> there are 12 red shapes . 12 + 1") == [(18, 20)]
    assert synth.visual_spans("count_add", "<think> 3 red </think>") is None  # off format
    assert synth.visual_spans("colour", "<think> the circle is red") is None  # no ground truth
    assert synth.visual_spans("colour_letters", "the square is blue . blue has 4") == [(14, 18)]


def test_default_family_unchanged():
    # the default set keeps its tasks, columns and bytes (its cache key and rows do not move)
    assert SynthConfig().tasks == synth.TASKS and synth.VARIANTS["default"] == SynthConfig()
    rows = make_split(SMALL, "val")
    assert all("visual_spans" not in r for r in rows)
    assert synth.synth_key(SynthConfig()) == synth.synth_key(SynthConfig(tasks=synth.TASKS))
