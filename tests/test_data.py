import io
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from vppo import data
from vppo.data import (
    BrokenRowWarning,
    Problem,
    build_messages,
    encode_prompts,
    load_problems,
    mm_token_type_ids,
    prompt_length,
    vision_token_ids,
)

# Written out independently of vppo/data.py: the released recipe's suffix (docs/algorithm.md section 5).
SUFFIX = (
    "You first think through the reasoning process as an internal monologue, enclosed within "
    "<think> </think> tags. Then, provide your final answer enclosed within \\boxed{}."
)


def _array(seed: int, w: int = 30, h: int = 20) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def processor():
    from vppo.tiny import build_processor, build_tokenizer

    texts = ["How many red shapes are there? What number is written?", SUFFIX] * 20
    return build_processor(build_tokenizer(texts, vocab_size=300), min_pixels=28 * 28, max_pixels=56 * 56)


def _virl_rows(n: int = 3) -> list[dict]:
    return [
        {
            "qid": f"q{i}",
            "problem": "<image>Look at the figure. What is x?" if i != 1 else "Compare <image> with <image>.",
            "answer": str(i),
            "images": [{"bytes": _png(_array(10 * i + j)), "path": None} for j in range(2 if i == 1 else 1)],
            "category": "geometry",
        }
        for i in range(n)
    ]


def test_build_messages_places_images_and_suffix():
    msgs = build_messages(Problem("u", "  A <image> B <image>  ", "1"))
    assert msgs == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "A "},
                {"type": "image"},
                {"type": "text", "text": " B "},
                {"type": "image"},
                {"type": "text", "text": "\n\n" + SUFFIX},
            ],
        }
    ]
    first = build_messages("<image>Q?", suffix=None)[0]["content"]
    assert first == [{"type": "image"}, {"type": "text", "text": "Q?"}]


@pytest.mark.parametrize("writer", ["pyarrow", "datasets"])
def test_virl39k_parquet_with_embedded_bytes_round_trips(tmp_path, writer):
    rows = _virl_rows()
    path = tmp_path / "virl39k.parquet"
    if writer == "pyarrow":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        import datasets

        feats = datasets.Features(
            {
                "qid": datasets.Value("string"),
                "problem": datasets.Value("string"),
                "answer": datasets.Value("string"),
                "images": datasets.List(datasets.Image()),
                "category": datasets.Value("string"),
            }
        )
        datasets.Dataset.from_list(rows, features=feats).to_parquet(str(path))
    ps = load_problems(path)
    assert ps.stats.rows == 3 and ps.stats.kept == 3 and ps.stats.broken == 0
    for i, p in enumerate(ps):
        assert p.problem == rows[i]["problem"] and p.answer == rows[i]["answer"]
        assert f"qid=q{i}" in p.uid
        assert p.meta["category"] == "geometry"
        imgs = p.pil_images()
        assert len(imgs) == len(rows[i]["images"])
        for j, img in enumerate(imgs):
            np.testing.assert_array_equal(np.asarray(img), _array(10 * i + j))
            assert p.image_sizes[j] == (30, 20)


def test_parquet_folder_picks_the_split(tmp_path):
    rows = _virl_rows()
    (tmp_path / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:2]), tmp_path / "data" / "train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(rows[2:]), tmp_path / "data" / "test-00000-of-00001.parquet")
    assert [p.answer for p in load_problems(tmp_path, "train")] == ["0", "1"]
    assert [p.answer for p in load_problems(tmp_path, "test")] == ["2"]
    with pytest.raises(ValueError, match="split 'val'"):
        load_problems(tmp_path, "val")
    # Unnamed shards: the folder is one split.
    other = tmp_path / "shards"
    other.mkdir()
    for k in range(2):
        pq.write_table(pa.Table.from_pylist(rows[k : k + 1]), other / f"part-{k}.parquet")
    assert [p.answer for p in load_problems(other, "train")] == ["0", "1"]


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    import datasets

    pil_rows = [
        {"problem": "<image>How many?", "answer": str(i), "images": [Image.fromarray(_array(i))]}
        for i in range(3)
    ]
    feats = datasets.Features(
        {
            "problem": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "images": datasets.List(datasets.Image()),
        }
    )
    ds = datasets.Dataset.from_list(pil_rows, features=feats)
    ds.save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": ds.select([0, 1]), "test": ds.select([2])}).save_to_disk(
        str(tmp_path / "dd")
    )
    for ps in (load_problems(tmp_path / "one"), load_problems(tmp_path / "dd", "train")):
        assert [p.answer for p in ps][:2] == ["0", "1"]
        for i, p in enumerate(ps):
            np.testing.assert_array_equal(np.asarray(p.pil_images()[0]), _array(i))
    assert [p.answer for p in load_problems(tmp_path / "dd", "test")] == ["2"]
    with pytest.raises(ValueError, match="split 'val'"):
        load_problems(tmp_path / "dd", "val")


def test_relative_image_paths(tmp_path):
    (tmp_path / "imgs").mkdir()
    for i in range(2):
        Image.fromarray(_array(i)).save(tmp_path / "imgs" / f"{i}.png")
    rows = [{"problem": "<image>Q", "answer": "a", "images": [f"imgs/{i}.png"]} for i in range(2)]
    path = tmp_path / "set.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    # Default image folder: the parquet file's folder.
    for ps in (load_problems(path), load_problems(rows, image_dir=tmp_path)):
        assert len(ps) == 2
        for i, p in enumerate(ps):
            np.testing.assert_array_equal(np.asarray(p.pil_images()[0]), _array(i))


def test_records_with_pil_images_and_custom_keys():
    rows = [{"question": "<image> colour?", "gt": 7, "image": Image.fromarray(_array(5)).convert("L")}]
    ps = load_problems(rows, problem_key="question", answer_key="gt", image_key="image")
    assert ps[0].answer == "7"
    img = ps[0].pil_images()[0]
    assert img.mode == "RGB" and img.size == (30, 20)
    with pytest.raises(ValueError, match="problem_key='problem'"):
        load_problems(rows)


def test_hub_name_reads_only_the_cache(monkeypatch):
    with pytest.raises(ValueError, match="local Hugging Face cache"):
        load_problems("someorg/surely-not-a-cached-dataset-4242")
    with pytest.raises(ValueError, match="does not exist"):
        load_problems("./missing/file.parquet")

    import datasets
    import datasets.config

    seen = {}

    def fake_load_dataset(name, split):
        seen.update(name=name, split=split, offline=datasets.config.HF_HUB_OFFLINE)
        return datasets.Dataset.from_list(_virl_rows(2))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    ps = load_problems("org/virl@test")
    assert seen == {"name": "org/virl", "split": "test", "offline": True}
    assert datasets.config.HF_HUB_OFFLINE is False  # restored
    assert [p.answer for p in ps] == ["0", "1"] and len(ps[1].images) == 2
    load_problems("org/virl", "val", allow_download=True)
    assert seen["offline"] is False and seen["split"] == "val"


BROKEN = {
    "answer_none": ({"answer": None}, "missing or empty 'answer'"),
    "answer_empty": ({"answer": "  "}, "missing or empty 'answer'"),
    "problem_none": ({"problem": None}, "missing or empty 'problem'"),
    "bad_bytes": ({"images": [{"bytes": b"not an image", "path": None}]}, "image 0 does not decode"),
    "missing_file": ({"images": ["no/such/file.png"]}, "image 0: 'no/such/file.png' not found: no file "),
    "truncated_png": ({"images": [{"bytes": _png(_array(3))[:60], "path": None}]}, "image 0 does not decode"),
    "extra_placeholder": ({"problem": "<image><image> Q"}, "2 <image> placeholders but 1 images"),
    "missing_placeholder": ({"problem": "Q"}, "0 <image> placeholders but 1 images"),
    "no_images": ({"images": None}, "1 <image> placeholders but 0 images"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_row_is_skipped_with_one_warning_or_raises_when_strict(tmp_path, case):
    change, reason = BROKEN[case]
    good = {
        "id": "x",
        "problem": "<image> Q",
        "answer": "1",
        "images": [{"bytes": _png(_array(0)), "path": None}],
    }
    rows = [dict(good, id=f"r{i}") for i in range(4)]
    rows[1].update(change)
    rows[3].update(change)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ps = load_problems(rows, image_dir=tmp_path)
    ours = [w for w in caught if issubclass(w.category, BrokenRowWarning)]
    assert len(ours) == 1
    msg = str(ours[0].message)
    assert "skipped 2 broken row(s) of 4" in msg and "rows[1] (id=r1)" in msg and reason in msg
    assert (
        ps.stats.broken == 2
        and ps.stats.kept == 2
        and [p.uid for p in ps] == ["rows[0] (id=r0)", "rows[2] (id=r2)"]
    )
    with pytest.raises(ValueError, match=r"broken row rows\[1\] \(id=r1\)") as err:
        load_problems(rows, image_dir=tmp_path, strict=True)
    assert reason in str(err.value)


def test_limit_stops_early():
    ps = load_problems(_virl_rows(3), limit=2)
    assert len(ps) == 2 and ps.stats.rows == 2


def _problems() -> list[Problem]:
    sizes = [(56, 56), (100, 40)]
    rows = [
        {
            "problem": "<image>How many red shapes?",
            "answer": "3",
            "images": [Image.fromarray(_array(1, *sizes[0]))],
        },
        {
            "problem": "Compare <image> and <image>. What number is written in the first one?",
            "answer": "7",
            "images": [Image.fromarray(_array(2, *sizes[1])), Image.fromarray(_array(3, *sizes[0]))],
        },
    ]
    return list(load_problems(rows))


def test_encode_prompts_left_pads_and_matches_the_image_grid(processor):
    problems = _problems()
    batch = encode_prompts(problems, processor)
    ids, mask, grid = batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"]
    pad = processor.tokenizer.pad_token_id
    lengths = [prompt_length(p, processor) for p in problems]
    assert mask.sum(1).tolist() == lengths and lengths[0] < lengths[1]
    assert mask[0, 0] == 0 and mask[:, -1].all()  # left padding
    assert (ids[0, : ids.shape[1] - lengths[0]] == pad).all()
    assert grid.shape == (3, 3) and batch["pixel_values"].shape[0] == int(grid.prod(-1).sum())
    per_image = (grid.prod(-1) // processor.image_processor.merge_size**2).tolist()
    n_pad = (ids == processor.image_token_id).sum(1).tolist()
    assert n_pad == [per_image[0], per_image[1] + per_image[2]]
    assert torch.equal(batch["mm_token_type_ids"], mm_token_type_ids(ids, processor))
    # 56x56 fits the bounds (4 tokens); 100x40 is scaled into [28*28, 56*56] pixels.
    assert per_image[0] == 4 and per_image[1] * 28 * 28 <= 56 * 56
    # The rendered prompt ends with the assistant turn, after the suffix.
    text = processor.tokenizer.decode(ids[0][mask[0].bool()])
    assert text.endswith(SUFFIX + "<|im_end|>\n<|im_start|>assistant\n")


def test_overlong_prompts_are_dropped_and_counted(processor):
    problems = _problems()
    lengths = [prompt_length(p, processor) for p in problems]
    rows = [{"problem": p.problem, "answer": p.answer, "images": list(p.images)} for p in problems]
    ps = load_problems(rows, processor=processor, max_prompt_length=lengths[0])
    assert [p.answer for p in ps] == ["3"] and ps.stats.overlong == 1 and ps.stats.kept == 1
    assert load_problems(rows, processor=processor, max_prompt_length=lengths[1]).stats.overlong == 0
    with pytest.raises(ValueError, match="max_prompt_length"):
        load_problems(rows, max_prompt_length=10)


def test_load_processor_pixel_bounds_and_vision_ids(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    big = data.load_processor(tmp_path, min_pixels=112 * 112, max_pixels=112 * 112)
    assert big.tokenizer.padding_side == "left"
    grid = encode_prompts(_problems()[:1], big)["image_grid_thw"]
    assert grid.tolist() == [[1, 8, 8]]
    with pytest.raises(ValueError, match="min_pixels"):
        data.load_processor(tmp_path, min_pixels=100, max_pixels=10)
    ids = vision_token_ids(processor)
    assert len(ids) == 5 and processor.image_token_id in ids
    assert sorted(processor.tokenizer.convert_ids_to_tokens(ids)) == sorted(data.VISION_SPECIAL_TOKENS)


def test_prompt_file_round_trip_default_and_bad_file(tmp_path):
    from vppo.data import PROMPT_FILE, PROMPT_SUFFIX, load_prompt_suffix, save_prompt_suffix

    assert load_prompt_suffix(tmp_path) == PROMPT_SUFFIX  # nothing recorded: the released suffix
    for suffix in ("Answer in \\boxed{}.", "", None):
        save_prompt_suffix(tmp_path, suffix)
        assert load_prompt_suffix(tmp_path) == suffix
    (tmp_path / PROMPT_FILE).write_text("[1, 2]")
    with pytest.raises(ValueError, match=PROMPT_FILE):
        load_prompt_suffix(tmp_path)


def test_extreme_aspect_ratio_is_a_broken_row(tmp_path):
    import io

    from PIL import Image

    from vppo.data import load_problems

    class IP:
        merge_size = 2

        def get_number_of_image_patches(self, h, w, _):
            if max(h, w) / min(h, w) > 200:
                raise ValueError(
                    f"absolute aspect ratio must be smaller than 200, got {max(h, w) / min(h, w)}"
                )
            return 4

    class Proc:
        image_processor = IP()

        def apply_chat_template(self, *a, **k):
            return "x"

        def tokenizer(self, text, add_special_tokens=False):
            return {"input_ids": [0]}

    def png(w, h):
        buf = io.BytesIO()
        Image.new("RGB", (w, h)).save(buf, "PNG")
        return {"bytes": buf.getvalue(), "path": None}

    rows = [
        {"problem": "<image>a", "answer": "1", "images": [png(4000, 2)]},
        {"problem": "<image>b", "answer": "1", "images": [png(4, 4)]},
    ]
    with pytest.warns(UserWarning, match="aspect ratio"):
        ps = load_problems(rows, processor=Proc(), max_prompt_length=100)
    assert len(ps) == 1 and ps.stats.broken == 1
    with pytest.raises(ValueError, match=r"rows\[0\].*aspect ratio"):
        load_problems(rows, processor=Proc(), max_prompt_length=100, strict=True)
