import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vppo import benchmarks as bm
from vppo.benchmarks import PAPER_BENCHMARKS, canonical, load_benchmark, resolve_names, unbox

SUFFIX = (
    "You first think through the reasoning process as an internal monologue, enclosed within "
    "<think> </think> tags. Then, provide your final answer enclosed within \\boxed{}."
)
OPENAI_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}


def _save_png(path, seed, w=30, h=20):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def _png_bytes(seed):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(
        buf, "PNG"
    )
    return buf.getvalue()


def _msg(q, a):
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


@pytest.fixture
def sharegpt_dir(tmp_path):
    """The authors' layout: dataset_info.json, one ShareGPT JSON per benchmark, images under a folder."""
    for i in range(4):
        _save_png(tmp_path / "images" / "geo3k" / f"{i}.png", i)
    geo = [
        {"messages": _msg("<image>Find x.", "\\frac{1}{2}"), "images": ["images/geo3k/0.png"]},
        {"messages": _msg("<image>Find y.", "\\boxed{12}"), "images": ["images/geo3k/1.png"]},
        # broken: its image does not exist (skipped, the rows after it keep their index)
        {"messages": _msg("<image>Find z.", "3"), "images": ["images/geo3k/missing.png"]},
        # no placeholder: the image goes in front; the suffix already in the text is not doubled
        {"messages": _msg(f"Which angle?\n\n{SUFFIX}", "B"), "images": ["images/geo3k/3.png"]},
    ]
    (tmp_path / "geo3k.json").write_text(json.dumps(geo))
    # LLaMA-Factory's default tags (from/value/human/gpt) and JSON lines, entry named with a split suffix
    wm = [
        {"conversations": [{"from": "human", "value": "<image>How many?"}, {"from": "gpt", "value": "4"}],
         "images": ["images/geo3k/0.png"]},
    ]  # fmt: skip
    (tmp_path / "wemath.jsonl").write_text("\n".join(json.dumps(r) for r in wm))
    info = {
        "Geo3k": {"file_name": "geo3k.json", "formatting": "sharegpt", "columns": {"messages": "messages",
                  "images": "images"}, "tags": OPENAI_TAGS},
        "We-Math_test": {"file_name": "wemath.jsonl", "formatting": "sharegpt",
                         "columns": {"images": "images"}},
        "logicvista": {"file_name": "logicvista.json", "formatting": "sharegpt"},
    }  # fmt: skip
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    return tmp_path


def test_names_resolve_with_aliases_and_suggestions():
    assert canonical("We-Math") == canonical("we_math") == "wemath"
    assert canonical("MMMU-Pro") == "mmmu_pro"
    assert canonical("geometry3k") == "geo3k"
    assert resolve_names("all") == list(PAPER_BENCHMARKS) and len(PAPER_BENCHMARKS) == 8
    assert resolve_names("synth, Geo3k,geo3k") == ["synth", "geo3k"]
    with pytest.raises(ValueError, match="did you mean 'MathVision'"):
        resolve_names("mathvison")
    with pytest.raises(ValueError, match="no benchmark"):
        resolve_names(" , ")


def test_unbox():
    assert unbox(" \\boxed{12} ") == "12"
    assert unbox("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert unbox("\\boxed{1} and \\boxed{2}") == "\\boxed{1} and \\boxed{2}"  # not one box
    assert unbox("x^{2}") == "x^{2}"


def test_sharegpt_layout(sharegpt_dir):
    with pytest.warns(UserWarning, match="1 broken"):
        geo = load_benchmark("geo3k", sharegpt_dir)
    assert geo.layout == "sharegpt" and geo.title == "Geo3k"
    assert [p.meta["row"] for p in geo.problems] == [0, 1, 3]
    assert [p.uid for p in geo.problems] == ["geo3k[0]", "geo3k[1]", "geo3k[3]"]
    assert [p.answer for p in geo.problems] == ["\\frac{1}{2}", "12", "B"]  # \boxed{12} unwrapped
    assert geo.problems[0].problem == "<image>Find x."
    assert geo.problems[2].problem == "<image>Which angle?"  # placeholder added, suffix dropped
    assert geo.stats.broken == 1
    img = geo.problems[1].pil_images()[0]
    assert img.size == (30, 20) and np.array_equal(
        np.asarray(img), np.asarray(Image.open(sharegpt_dir / "images/geo3k/1.png"))
    )
    assert {f.name for f in geo.files} == {"dataset_info.json", "geo3k.json"}

    wm = load_benchmark("We-Math", sharegpt_dir, limit=5)
    assert [(p.problem, p.answer) for p in wm.problems] == [("<image>How many?", "4")]


def test_sharegpt_strict_raises_on_broken_row(sharegpt_dir):
    with pytest.raises(ValueError, match="broken row"):
        load_benchmark("geo3k", sharegpt_dir, strict=True)


def test_missing_files_and_unknown_entries(sharegpt_dir, tmp_path_factory):
    with pytest.raises(ValueError, match="logicvista.json, which does not exist"):
        load_benchmark("LogicVista", sharegpt_dir)
    with pytest.raises(ValueError, match=r"MathVerse not found.*entries: \['Geo3k'"):
        load_benchmark("mathverse", sharegpt_dir)
    with pytest.raises(ValueError, match="not a folder"):
        load_benchmark("geo3k", sharegpt_dir / "nope")
    with pytest.raises(ValueError, match="unknown benchmark"):
        load_benchmark("geo4k", sharegpt_dir)
    info = json.loads((sharegpt_dir / "dataset_info.json").read_text())
    info["geo3k_testmini"] = info["Geo3k"]
    del info["Geo3k"]
    info["geo3k_test"] = info["geo3k_testmini"]
    (sharegpt_dir / "dataset_info.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="matches several entries"):
        load_benchmark("geo3k", sharegpt_dir)
    (sharegpt_dir / "dataset_info.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_benchmark("geo3k", sharegpt_dir)


def test_alpaca_formatting(tmp_path):
    _save_png(tmp_path / "img" / "a.png", 1)
    recs = [{"instruction": "<image>What is", "input": "2+2?", "output": "4", "images": ["img/a.png"]}]
    (tmp_path / "mmk12.json").write_text(json.dumps(recs))
    (tmp_path / "dataset_info.json").write_text(json.dumps({"MMK12": {"file_name": "mmk12.json"}}))
    b = load_benchmark("mmk12", tmp_path)
    assert b.layout == "alpaca"
    assert [(p.problem, p.answer) for p in b.problems] == [("<image>What is\n2+2?", "4")]


def test_parquet_layout_file_and_split_folder(tmp_path):
    rows = [
        {"problem": "<image>What is x?", "answer": "0.5", "images": [{"bytes": _png_bytes(0), "path": None}]},
        {"problem": "No image here: 1+1?", "answer": "2", "images": []},
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "mathvision.parquet")
    b = load_benchmark("MathVision", tmp_path)
    assert b.layout == "parquet" and [p.answer for p in b.problems] == ["0.5", "2"]
    assert [p.meta["row"] for p in b.problems] == [0, 1] and b.problems[0].uid == "mathvision[0]"

    folder = tmp_path / "dynamath"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:1]), folder / "train-00000.parquet")
    pq.write_table(pa.Table.from_pylist(rows[1:]), folder / "test-00000.parquet")
    d = load_benchmark("dynamath", tmp_path)
    assert [p.answer for p in d.problems] == ["2"]  # the test split only


def test_synth_is_the_ninth_benchmark(tmp_path, monkeypatch):
    rows = [{"problem": "<image>How many red shapes?", "answer": str(i), "images": [{"bytes": _png_bytes(i)}]}
            for i in range(3)]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "test.parquet")
    import vppo.synth

    monkeypatch.setattr(vppo.synth, "ensure_synth_data", lambda *a, **k: tmp_path)
    b = load_benchmark("synth", None, limit=2)
    assert b.layout == "synth" and [p.answer for p in b.problems] == ["0", "1"]
    assert [p.uid for p in b.problems] == ["synth[0]", "synth[1]"]
    with pytest.raises(ValueError, match="no data_dir"):
        load_benchmark("geo3k", None)
    assert bm.describe([b])[0]["problems"] == 2


def test_entry_names_with_splits_and_subsets():
    assert bm._entry_matches("MathVerse-testmini-vision-only", "mathverse")
    assert bm._entry_matches("geometry3k_test", "geo3k") and bm._entry_matches(
        "MMMU_Pro_standard", "mmmu_pro"
    )
    assert not bm._entry_matches("mathverse_test", "mathvision")
    assert not bm._entry_matches("mmk", "mmk12")
    info = {"mathverse_testmini": {}, "MathVerse": {}, "geo3k": {}}
    assert bm.find_entry(info, "mathverse", None) == "MathVerse"  # an exact name wins over name+split
