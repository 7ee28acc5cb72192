"""Training data as its authors publish it (issue 22, training side; issue 26 item 5).

Each fixture is a small file written here in one published schema (nothing is downloaded):

- TIGER-Lab/ViRL39K: `39Krelease.parquet` (`question`, `answer` as `\\boxed{...}`, `image` a list of
  `images/<qid>-<k>.jpg` paths, `qid`, `category`, `source`, `PassRate_32BTrained`,
  `PassRate_7BBase`) beside `images.zip`, not extracted (dataset card, "Dataset Keys").
- chamber111/VPPO_ViRL39K_train: a snapshot folder `data/train-00000-of-00001.parquet` with `id`,
  `problem`, `answer`, `images` (a list of {"bytes", "path"}), the schema of its source
  PAPOGalaxy/PAPO_ViRL39K_train (dataset card), read with the released config's keys
  (huaixuheqing/VPPO-RL examples/configs/config.yaml: problem / answer / images).
- chamber111/VPPO_MMK12_validation: a snapshot folder whose only split is `train`, in the same keys,
  written with `datasets` image features; the released trainer reads it as `split="train"`.
"""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import ROOT, make_micro_model, subprocess_env, train_overrides
from PIL import Image

from vppo.data import (
    BrokenRowWarning,
    build_messages,
    load_problems,
    open_image,
    resolve_format,
)

# Written out independently of vppo: the released recipe's suffix (docs/algorithm.md section 5).
SUFFIX = (
    "You first think through the reasoning process as an internal monologue, enclosed within "
    "<think> </think> tags. Then, provide your final answer enclosed within \\boxed{}."
)


def _rgb(seed: int, w: int = 40, h: int = 30) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _encode(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------
# fixtures in the published schemas

# (qid, question, boxed answer, number of images, category): a multiple-choice, a number, a
# two-image problem with an expression answer, a number with a unit.
VIRL_ROWS = [
    ("Processed-mc-1", "<image>Which shape is shaded?\nA. first\nB. second", "\\boxed{B}", 1, "Spatial"),
    ("Processed-num-2", "<image>\nHow many bars are taller than 5?", "\\boxed{12}", 1, "Chart"),
    (
        "Processed-two-3",
        "<image><image>What fraction of the area is red?",
        "\\boxed{\\frac{1}{2}}",
        2,
        "Geometry",
    ),
    ("Processed-deg-4", "<image>Find the angle x.", "\\boxed{40^\\circ}", 1, "Geometry"),
]


def write_virl39k(root: Path, *, drop_members: tuple[str, ...] = (), with_zip: bool = True) -> dict:
    """TIGER-Lab/ViRL39K as released: 39Krelease.parquet + images.zip (members `images/<qid>-<k>.jpg`).
    Returns {path in the `image` column: the JPEG bytes stored}."""
    root.mkdir(parents=True, exist_ok=True)
    stored, rows = {}, []
    for i, (qid, question, answer, n_img, category) in enumerate(VIRL_ROWS):
        paths = [f"images/{qid}-{k}.jpg" for k in range(n_img)]
        for k, p in enumerate(paths):
            stored[p] = _encode(_rgb(10 * i + k), "JPEG")
        rows.append(
            {
                "question": question,
                "answer": answer,
                "PassRate_32BTrained": 0.5,
                "PassRate_7BBase": 0.25 if i % 2 else None,  # the card: only part of the rows labelled
                "category": category,
                "source": "fixture",
                "qid": qid,
                "image": paths,
            }
        )
    pq.write_table(pa.Table.from_pylist(rows), root / "39Krelease.parquet")
    if with_zip:
        with zipfile.ZipFile(root / "images.zip", "w") as zf:
            zf.writestr("images/", "")  # the folder entry a zip of a folder carries
            for p, b in stored.items():
                if p not in drop_members:
                    zf.writestr(p, b)
    return stored


def _image_struct(arr: np.ndarray) -> dict:
    return {"bytes": _encode(arr, "PNG"), "path": None}


def write_vppo_train(root: Path) -> list[dict]:
    """chamber111/VPPO_ViRL39K_train as `hf download --local-dir` leaves it (schema: PAPO's card)."""
    rows = [
        {
            "id": f"virl-{i}",
            "problem": f"<image>Question {i}: how many red shapes are there?",
            "answer": str(i + 2),
            "images": [_image_struct(_rgb(100 + i))],
        }
        for i in range(4)
    ]
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.null())])
    schema = pa.schema(
        [("id", pa.string()), ("problem", pa.string()), ("answer", pa.string()), ("images", pa.list_(struct))]
    )
    (root / "data").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), root / "data" / "train-00000-of-00001.parquet")
    (root / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
    )
    return rows


def write_mmk12_val(root: Path) -> list[dict]:
    """chamber111/VPPO_MMK12_validation as `hf download --local-dir` leaves it: one `train` split."""
    import datasets

    rows = [
        {
            "problem": "<image>Which option is the area?\nA. 3\nB. 4\nC. 5\nD. 6",
            "answer": "C",
            "images": [Image.fromarray(_rgb(200))],
        },
        {"problem": "<image>Find the perimeter.", "answer": "24", "images": [Image.fromarray(_rgb(201))]},
    ]
    feats = datasets.Features(
        {"problem": datasets.Value("string"), "answer": datasets.Value("string"),
         "images": datasets.Sequence(datasets.Image())}
    )  # fmt: skip
    (root / "data").mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows, features=feats).to_parquet(
        root / "data" / "train-00000-of-00001.parquet"
    )
    return rows


# ----------------------------------------------------------------------------------------------------
# ViRL39K's raw release


def test_virl39k_release_loads_from_the_zip_with_answers_unwrapped(tmp_path):
    stored = write_virl39k(tmp_path / "ViRL39K")
    assert not (tmp_path / "ViRL39K" / "images").exists()  # nothing extracted, before or after
    ps = load_problems(tmp_path / "ViRL39K")
    assert not (tmp_path / "ViRL39K" / "images").exists()
    assert ps.stats.format == "virl39k" and ps.stats.broken == 0 and len(ps) == 4
    assert [p.answer for p in ps] == ["B", "12", "\\frac{1}{2}", "40^\\circ"]
    assert ps.stats.boxed_answers == 4 and ps[0].meta["answer_as_stored"] == "\\boxed{B}"
    assert [p.problem for p in ps] == [r[1] for r in VIRL_ROWS]
    assert "(qid=Processed-mc-1)" in ps[0].uid and ps[2].meta["category"] == "Geometry"
    assert [len(p.images) for p in ps] == [1, 1, 2, 1]
    for p, row in zip(ps, VIRL_ROWS, strict=True):
        for k, img in enumerate(p.pil_images()):
            want = Image.open(io.BytesIO(stored[f"images/{row[0]}-{k}.jpg"])).convert("RGB")
            np.testing.assert_array_equal(np.asarray(img), np.asarray(want))
    # the same file given by itself, and the format named
    assert len(load_problems(tmp_path / "ViRL39K" / "39Krelease.parquet", format="virl39k")) == 4


def test_unwrapped_answers_grade_as_the_multiple_choice_and_unit_rules_intend(tmp_path):
    from vppo.reward import grade

    write_virl39k(tmp_path)
    ps = load_problems(tmp_path)
    responses = ["<think>x</think> \\boxed{B. second}", "\\boxed{12}", "\\boxed{0.5}", "\\boxed{40}"]
    scores, _ = grade(responses, [p.answer for p in ps])
    assert scores == [1.0, 1.0, 1.0, 1.0]
    # the boxed ground truth as stored defeats the multiple-choice rule: why it is unwrapped
    assert grade(responses[:1], ["\\boxed{B}"])[0] == [0.0]


def test_a_zip_member_that_is_missing_is_a_named_broken_row(tmp_path):
    write_virl39k(tmp_path, drop_members=("images/Processed-num-2-0.jpg",))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ps = load_problems(tmp_path)
    assert len(ps) == 3 and ps.stats.broken == 1 and ps.stats.image_failures == 1
    (msg,) = ps.stats.broken_rows
    assert "(qid=Processed-num-2)" in msg and "'images/Processed-num-2-0.jpg' not found" in msg
    assert "nor a member of images.zip" in msg
    assert any(
        issubclass(w.category, BrokenRowWarning) and "Processed-num-2" in str(w.message) for w in caught
    )
    with pytest.raises(ValueError, match=r"broken row .*Processed-num-2.*not found"):
        load_problems(tmp_path, strict=True)


def test_every_image_missing_is_an_error_not_a_warning(tmp_path):
    write_virl39k(tmp_path, with_zip=False)  # the zip was never downloaded: a whole modality lost
    with pytest.raises(ValueError, match=r"every image of .* failed to load \(4 row\(s\) name images"):
        load_problems(tmp_path)


def test_a_zip_with_one_more_folder_level_still_resolves(tmp_path):
    stored = write_virl39k(tmp_path, with_zip=False)
    with zipfile.ZipFile(tmp_path / "images.zip", "w") as zf:  # members under ViRL39K/images/...
        for p, b in stored.items():
            zf.writestr(f"ViRL39K/{p}", b)
    ps = load_problems(tmp_path)
    assert len(ps) == 4 and ps[2].images[1].name == "ViRL39K/images/Processed-two-3-1.jpg"


def test_unknown_columns_are_an_error_listing_the_presets_and_the_columns(tmp_path):
    pq.write_table(
        pa.Table.from_pylist([{"prompt": "<image>Q", "solution": "1", "img": []}]), tmp_path / "x.parquet"
    )
    with pytest.raises(ValueError) as err:
        load_problems(tmp_path / "x.parquet")
    msg = str(err.value)
    assert "cannot tell the format" in msg and "['img', 'prompt', 'solution']" in msg
    assert "vppo (problem, answer, images" in msg and "virl39k (question, answer, image" in msg
    # explicit keys still work, with format auto or columns
    rows = [{"prompt": "Q", "solution": "\\boxed{1}"}]
    for fmt in ("auto", "columns"):
        ps = load_problems(rows, format=fmt, problem_key="prompt", answer_key="solution", image_key=None)
        assert ps.stats.format == "columns" and ps[0].answer == "1"
    # a named preset whose columns are not there names the missing key
    with pytest.raises(ValueError, match=r"problem_key='question' \(format virl39k\) is not a column"):
        load_problems(rows, format="virl39k")
    # two presets' columns at once: ambiguous
    both = ["question", "image", "problem", "images", "answer"]
    assert resolve_format(both).name == "vppo"  # the keys given (the defaults) are all there
    with pytest.raises(ValueError, match="it matches 2 presets"):
        resolve_format(both, problem_key="stem")


def test_a_release_downloaded_into_the_hub_cache_loads_by_its_id(tmp_path, monkeypatch):
    """`hf download TIGER-Lab/ViRL39K --repo-type dataset` leaves a snapshot of symlinks to blobs."""
    import huggingface_hub.constants

    from vppo.config import check_sources, load_config

    repo = tmp_path / "hub" / "datasets--TIGER-Lab--ViRL39K"
    write_virl39k(tmp_path / "files")
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in ("39Krelease.parquet", "images.zip"):
        (tmp_path / "files" / f).rename(repo / "blobs" / f"blob-{f}")
        (snap / f).symlink_to(repo / "blobs" / f"blob-{f}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    ps = load_problems("TIGER-Lab/ViRL39K")
    assert ps.stats.format == "virl39k" and len(ps) == 4 and ps[2].images[1].name.endswith("two-3-1.jpg")
    check_sources(load_config(None, ["data.train=TIGER-Lab/ViRL39K", "run.val_every=0"]))
    bad = load_config(None, ["data.train=TIGER-Lab/ViRL39K", "run.val_every=0", "data.format=vppo"])
    with pytest.raises(
        ValueError, match=r"data.train='TIGER-Lab/ViRL39K': problem_key='problem' \(format vppo\)"
    ):
        check_sources(bad)


# ----------------------------------------------------------------------------------------------------
# the released recipe's sets (chamber111)


def test_chamber111_train_snapshot_loads_in_the_vppo_schema(tmp_path):
    rows = write_vppo_train(tmp_path / "VPPO_ViRL39K_train")
    ps = load_problems(tmp_path / "VPPO_ViRL39K_train")
    assert ps.stats.format == "vppo" and len(ps) == 4
    assert [p.answer for p in ps] == [r["answer"] for r in rows]
    assert "(id=virl-0)" in ps[0].uid
    np.testing.assert_array_equal(np.asarray(ps[3].pil_images()[0]), _rgb(103))


def test_mmk12_validation_folder_with_only_a_train_split_serves_as_val(tmp_path, caplog):
    write_mmk12_val(tmp_path / "MMK12")
    with caplog.at_level(logging.WARNING, logger="vppo.data"):
        ps = load_problems(tmp_path / "MMK12", "val")
    assert ps.stats.format == "vppo" and [p.answer for p in ps] == ["C", "24"]
    assert "names only the split 'train'" in caplog.text and "'val'" in caplog.text
    np.testing.assert_array_equal(np.asarray(ps[1].pil_images()[0]), _rgb(201))
    # a folder that does name other splits still refuses a missing one
    (tmp_path / "MMK12" / "data" / "test-00000-of-00001.parquet").write_bytes(
        (tmp_path / "MMK12" / "data" / "train-00000-of-00001.parquet").read_bytes()
    )
    with pytest.raises(ValueError, match=r"split 'val' not found .*\['test', 'train'\]"):
        load_problems(tmp_path / "MMK12", "val")


def test_mmk12_validation_in_the_hub_cache_serves_as_val(monkeypatch, caplog):
    import datasets

    calls = []

    def fake_load_dataset(name, split=None):
        calls.append(split)
        dd = datasets.DatasetDict(
            {"train": datasets.Dataset.from_list([{"problem": "Q", "answer": "1", "images": []}])}
        )
        if split is None:
            return dd
        if split not in dd:
            raise ValueError(f'Unknown split "{split}". Should be one of {list(dd)}.')
        return dd[split]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    with caplog.at_level(logging.WARNING, logger="vppo.data"):
        ps = load_problems("chamber111/VPPO_MMK12_validation", "val")
    assert calls == ["val", None] and len(ps) == 1 and "names only the split 'train'" in caplog.text
    with pytest.raises(ValueError, match="Unknown split"):  # an explicit @split is taken as asked
        load_problems("chamber111/VPPO_MMK12_validation@val")


# ----------------------------------------------------------------------------------------------------
# prompts


def test_an_instruction_that_differs_from_the_suffix_only_in_spacing_is_not_repeated():
    spaced = SUFFIX.replace("<think> </think>", "<think></think>").replace(". Then", ".\n Then")
    text = build_messages(f"<image>What is x?\n\n{spaced}  ")[0]["content"][-1]["text"]
    assert text == "What is x?\n\n" + SUFFIX and text.count("internal monologue") == 1
    # a text that only mentions part of it, or something else, is left alone
    other = "<image>What is x? Then, provide your final answer enclosed within \\boxed{}."
    assert build_messages(other)[0]["content"][-1]["text"].count("\\boxed{}") == 2
    assert build_messages(f"Q {SUFFIX}", suffix=None)[0]["content"][-1]["text"] == f"Q {SUFFIX}"


# ----------------------------------------------------------------------------------------------------
# odd image modes (issue 26 item 5)


def _saved(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_a_16_bit_greyscale_png_keeps_its_brightness():
    grey = np.linspace(0, 65535, 48 * 32).reshape(32, 48).astype(np.uint16)
    data = _saved(Image.fromarray(grey))
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    out = np.asarray(open_image(data))
    assert out.shape == (32, 48, 3) and abs(out.mean() - grey.mean() / 257) < 1.0  # not all white
    np.testing.assert_allclose(out[..., 0], grey / 257, atol=1.0)


@pytest.mark.parametrize(
    "mode", ["I16_as_I", "I_8bit_range", "F_unit", "F_255", "LA", "P_transparency", "RGBA", "CMYK", "L"]
)
def test_odd_modes_become_rgb_with_the_source_brightness(mode):
    base = np.linspace(20, 230, 40 * 30).reshape(30, 40)  # the image a viewer shows, 0..255
    if mode == "I16_as_I":  # older Pillow opens a 16-bit PNG as I
        img = Image.fromarray((base * 257).astype(np.int32), "I")
    elif mode == "I_8bit_range":
        img = Image.fromarray(base.astype(np.int32), "I")
    elif mode == "F_unit":
        img = Image.fromarray((base / 255).astype(np.float32), "F")
    elif mode == "F_255":
        img = Image.fromarray(base.astype(np.float32), "F")
    elif mode == "LA":  # opaque left half, transparent right half over black: a viewer shows white
        la = np.zeros((30, 40, 2), np.uint8)
        la[..., 0], la[:, :20, 1] = base.astype(np.uint8), 255
        img = Image.fromarray(la, "LA")
        base = np.where(np.arange(40) < 20, base, 255.0)
    elif mode == "P_transparency":  # palette image whose index 0 (black) is transparent
        img = Image.fromarray(np.tile(np.where(np.arange(40) < 20, 1, 0).astype(np.uint8), (30, 1)), "P")
        img.putpalette([0, 0, 0, 100, 100, 100] + [0] * 762)
        img = Image.open(io.BytesIO(_p_with_transparency(img)))
        base = np.where(np.arange(40) < 20, 100.0, 255.0) * np.ones((30, 1))
    elif mode == "RGBA":
        rgba = np.zeros((30, 40, 4), np.uint8)
        rgba[..., :3] = base.astype(np.uint8)[..., None]
        rgba[..., 3] = 255
        rgba[:, 20:, 3] = 0
        img = Image.fromarray(rgba, "RGBA")
        base = np.where(np.arange(40) < 20, base, 255.0)
    elif mode == "CMYK":
        img = Image.fromarray(np.repeat(base.astype(np.uint8)[..., None], 3, -1)).convert("CMYK")
    else:
        img = Image.fromarray(base.astype(np.uint8), "L")
    for src in (img, _saved(img, "TIFF") if mode in ("I16_as_I", "F_unit", "F_255", "CMYK") else None):
        if src is None:
            continue
        out = np.asarray(open_image(src)).astype(np.float64)
        assert out.shape == (30, 40, 3)
        assert abs(out.mean() - base.mean()) < 1.5, (mode, out.mean(), base.mean())
        np.testing.assert_allclose(out.mean(-1), base, atol=2.0)


def _p_with_transparency(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", transparency=0)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------
# python -m vppo.data check


def _check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vppo.data", "check", *args],
        capture_output=True, text=True, env=subprocess_env(), cwd=ROOT, timeout=300,
    )  # fmt: skip


def test_check_reports_the_virl39k_release_without_a_model(tmp_path):
    write_virl39k(tmp_path / "ViRL39K", drop_members=("images/Processed-deg-4-0.jpg",))
    p = _check(str(tmp_path / "ViRL39K"))
    assert p.returncode == 0, p.stderr[-2000:]
    out = p.stdout
    assert "format: virl39k (TIGER-Lab/ViRL39K" in out and "39Krelease.parquet" in out
    assert f"images read from: {tmp_path / 'ViRL39K' / 'images.zip'} (not extracted)" in out
    assert "rows: 4 read, 3 usable, 1 broken" in out
    assert "(qid=Processed-deg-4): image 0: 'images/Processed-deg-4-0.jpg' not found" in out
    assert "images: 4 in 3 problem(s); 0 text-only" in out
    assert "answers: letter 1, number 1, expression 1 (3 unwrapped from \\boxed{}" in out
    assert "prompt of ViRL39K[0] (qid=Processed-mc-1) (answer 'B'):\n<image>Which shape" in out
    assert out.count("internal monologue") == 1


def test_check_reads_the_released_sets_and_fails_on_empty_or_unreadable_sources(tmp_path):
    write_mmk12_val(tmp_path / "MMK12")
    p = _check(str(tmp_path / "MMK12"), "--split", "val")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "format: vppo" in p.stdout and "rows: 2 read, 2 usable, 0 broken" in p.stdout
    assert "answers: letter 1, number 1, expression 0" in p.stdout
    assert "names only the split 'train'" in p.stderr
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.Table.from_pylist([], schema=pa.schema([("problem", pa.string())])), empty)
    for args, needle in (
        ([str(empty)], "no usable problem (0 row(s) read"),
        ([str(tmp_path / "missing.parquet")], "does not exist"),
        ([str(tmp_path / "MMK12"), "--format", "virl39k"], "problem_key='question' (format virl39k)"),
    ):
        p = _check(*args)
        assert p.returncode == 1 and needle in p.stderr, (args, p.stdout, p.stderr)


# ----------------------------------------------------------------------------------------------------
# config: the format is checked before anything loads; a short training run on the real layouts


def test_check_sources_names_an_unknown_column_set_before_any_model_loads(tmp_path):
    from vppo.config import load_config

    write_virl39k(tmp_path / "ViRL39K")
    pq.write_table(pa.Table.from_pylist([{"prompt": "q", "gt": "1"}]), tmp_path / "other.parquet")
    ok = load_config(None, [f"data.train={tmp_path / 'ViRL39K'}", f"data.val={tmp_path / 'ViRL39K'}"])
    from vppo.config import check_sources

    check_sources(ok)
    bad = load_config(None, [f"data.train={tmp_path / 'other.parquet'}"])
    with pytest.raises(
        ValueError, match=r"data.train=.*other.parquet.*cannot tell the format.*\['gt', 'prompt'\]"
    ):
        check_sources(bad)
    p = subprocess.run(
        [sys.executable, "-m", "vppo.train", f"data.train={tmp_path / 'other.parquet'}",
         f"run.output_dir={tmp_path / 'run'}"],
        capture_output=True, text=True, env=subprocess_env(), cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert p.returncode == 2 and "cannot tell the format" in p.stderr and "Loading weights" not in p.stderr


@pytest.fixture(scope="module")
def micro_model(tmp_path_factory):
    return make_micro_model(tmp_path_factory.mktemp("model") / "model")


def test_training_runs_on_the_raw_virl39k_release_and_validates_on_mmk12(micro_model, tmp_path):
    write_virl39k(tmp_path / "ViRL39K")
    write_mmk12_val(tmp_path / "MMK12")
    out = tmp_path / "run"
    ov = train_overrides((micro_model, tmp_path), out)
    ov += [
        f"data.train={tmp_path / 'ViRL39K'}", f"data.val={tmp_path / 'MMK12'}", "train.total_steps=1",
        "run.val_every=1", "rollout.val_n=2", "run.export_hf=false",
    ]  # fmt: skip
    p = subprocess.run(
        [sys.executable, "-m", "vppo.train", *ov],
        capture_output=True, text=True, env=subprocess_env(OMP_NUM_THREADS="1"), cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "train problems: 4 (dropped: 0 broken" in p.stdout
    assert "names only the split 'train'" in p.stderr  # the validation set's note
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    vals = [r for r in recs if "val_accuracy" in r]
    assert vals and all(0.0 <= r["val_accuracy"] <= 1.0 for r in vals)
    assert any(r.get("step") == 1 for r in recs), recs
