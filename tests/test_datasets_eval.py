"""The eight benchmarks as their authors publish them (issue 22, evaluation side; issue 26 item 6).

Every fixture is built here, small, in the published schema it names (no download): the authors'
layout (PAPO-Eval's data/dataset_info.json with chamber111/VPPO-Eval's files) and each benchmark's
own Hub / GitHub release as `hf download <repo> --local-dir <name>` leaves it. Loaded through the
CLI (`python -m vppo.eval --check-data`, and scoring runs on a micro model).
"""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from vppo import eval as ev
from vppo import evaluate
from vppo.benchmarks import load_benchmark

REPO = Path(__file__).resolve().parents[1]
FAST = ["--samples", "2", "--max-new-tokens", "4", "--no-progress"]
MC_QUESTION = "Which is larger?\nChoices:\nA. 3\nB. 5"


def _png(seed: int, size=(36, 24)) -> bytes:
    w, h = size
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _struct(seed: int) -> dict:
    """An image as `datasets` stores an Image feature in parquet."""
    return {"bytes": _png(seed), "path": f"{seed}.png"}


def _pixels(src) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(src) if isinstance(src, bytes) else src).convert("RGB"))


def _parquet(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


# ----------------------------------------------------------------------------------------------------
# the authors' layout


# Source: xhguo7/PAPO-Eval data/dataset_info.json (entry names, file names, sharegpt columns and
# tags) and the VPPO README (chamber111/VPPO-Eval's data/ adds PAPO_MMK12 under papo/ and the two
# filtered sets under vppo/); images are ./data/images/<entry>/<file> (PAPO-Eval prepare_data.py
# unzips <entry>_images.zip into data/images/).
AUTHORS = {
    "hiyouga_geometry3k": "papo/hiyouga_geometry3k.json",
    "AI4Math_MathVerse": "papo/AI4Math_MathVerse.json",
    "AI4Math_MathVerse_vision_dependent": "papo/AI4Math_MathVerse-vision-dependent.json",
    "We-Math_We-Math": "papo/We-Math_We-Math.json",
    "lscpku_LogicVista": "papo/lscpku_LogicVista.json",
    "MMMU_MMMU_Pro": "papo/MMMU_MMMU_Pro.json",
    "PAPO_MMK12": "papo/PAPO_MMK12.json",
    "DynaMath_DynaMath_Sample": "vppo/DynaMath_DynaMath_Sample.json",
    "MathLLMs_MathVision": "vppo/MathLLMs_MathVision.json",
}
TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}
QA = [(MC_QUESTION, "B"), ("What is x?", "12"), ("Find the ratio.", "\\frac{1}{2}")]


def _record(question: str, label: str, image: str) -> dict:
    return {
        "messages": [
            {"role": "user", "content": f"<image>{question}"},
            {"role": "assistant", "content": label},
        ],
        "images": [image],
    }


def make_authors(root: Path) -> Path:
    """A PAPO-Eval checkout at `root` with the VPPO-Eval data/ folder: three records per entry."""
    data = root / "data"
    info = {
        "identity": {"file_name": "identity.json"},  # LLaMA-Factory's own entries stay in the file
        "alpaca_en": {"hf_hub_url": "llamafactory/alpaca_en"},
    }
    for k, (entry, file_name) in enumerate(AUTHORS.items()):
        info[entry] = {
            "file_name": file_name,
            "formatting": "sharegpt",
            "columns": {"messages": "messages", "images": "images"},
            "tags": TAGS,
        }
        recs = []
        for i, (q, a) in enumerate(QA):
            img = data / "images" / entry / f"{i}.png"
            img.parent.mkdir(parents=True, exist_ok=True)
            img.write_bytes(_png(100 * k + i))
            recs.append(_record(f"{q} ({entry} {i})", a, f"./data/images/{entry}/{i}.png"))
        (data / file_name).parent.mkdir(parents=True, exist_ok=True)
        (data / file_name).write_text(json.dumps(recs, indent=2))
    (data / "dataset_info.json").write_text(json.dumps(info, indent=2))
    return root


@pytest.fixture
def authors(tmp_path) -> Path:
    return make_authors(tmp_path / "PAPO-Eval")


def _check(*args) -> dict:
    return ev.main(["--check-data", *args])


ALL = "all,AI4Math_MathVerse_vision_dependent"


def test_authors_layout_loads_all_eight_from_the_checkout_root_and_from_data(authors):
    for d in (authors, authors / "data"):
        r = _check("--data-dir", str(d), "--benchmarks", ALL)
        assert r["ok"] and not r["errors"]
        checks = {c["name"]: c for c in r["check"]}
        assert len(checks) == 9
        by_entry = {c["source"]["entry"]: c for c in checks.values()}
        assert set(by_entry) == set(AUTHORS)  # each benchmark read its real entry, none another's
        for entry, c in by_entry.items():
            assert c["layout"] == "sharegpt" and (c["rows"], c["problems"], c["broken"]) == (3, 3, [])
            assert c["images"] == 3 and c["answer_kinds"] == {"expression": 1, "letter": 1, "number": 1}
            assert c["prompt"]["text"].startswith(f"<image>{MC_QUESTION} ({entry} 0)\n\nYou first think")
            assert c["prompt"]["answer"] == "B"
    assert "mathverse_vision_dependent" in r["report"] and "hiyouga_geometry3k" in r["report"]
    # images resolve as LLaMA-Factory resolves ./data/images/... from the checkout root
    geo = load_benchmark("hiyouga_geometry3k", authors / "data")
    assert geo.name == "geo3k" and [p.answer for p in geo.problems] == ["B", "12", "\\frac{1}{2}"]
    src = authors / "data/images/hiyouga_geometry3k/1.png"
    assert geo.problems[1].images == (str(src.resolve()),)
    assert np.array_equal(np.asarray(geo.problems[1].pil_images()[0]), _pixels(src))
    # the instruction already in the file, spaced otherwise, is not asked twice
    f = authors / "data/papo/hiyouga_geometry3k.json"
    recs = json.loads(f.read_text())
    suffix = ev.PROMPT_SUFFIX.replace(" ", "  ").replace(". Then", ".\nThen")
    recs[1]["messages"][0]["content"] += "\n" + suffix
    f.write_text(json.dumps(recs))
    geo = load_benchmark("geo3k", authors)
    assert geo.problems[1].problem == "<image>What is x? (hiyouga_geometry3k 1)"
    assert geo.source["suffix_in_file"] == 1
    vd = load_benchmark("MathVerse-VD", authors)
    mv = load_benchmark("MathVerse", authors)
    assert (
        vd.source["entry"] == "AI4Math_MathVerse_vision_dependent"
        and mv.source["entry"] == "AI4Math_MathVerse"
    )


def test_authors_layout_names_what_is_wrong(authors):
    data = authors / "data"
    (data / "images/We-Math_We-Math/1.png").unlink()
    with pytest.warns(UserWarning, match="1 broken"):
        wm = load_benchmark("wemath", authors)
    assert [p.meta["row"] for p in wm.problems] == [0, 2]
    assert len(wm.broken) == 1 and wm.broken[0].startswith(
        "row 1: image file './data/images/We-Math_We-Math/1.png'"
    )
    with pytest.raises(ValueError, match="broken row 1"):
        load_benchmark("wemath", authors, strict=True)
    for i in (0, 2):  # every image of the benchmark gone: an error, not a text-only evaluation
        (data / f"images/We-Math_We-Math/{i}.png").unlink()
    with pytest.raises(ValueError, match="We-Math: every image is missing"):
        load_benchmark("wemath", authors)
    r = _check("--data-dir", str(authors), "--benchmarks", "wemath,geo3k")
    assert not r["ok"] and "every image is missing" in r["errors"]["wemath"] and len(r["check"]) == 1

    info = json.loads((data / "dataset_info.json").read_text())
    entry = info.pop("lscpku_LogicVista")
    info["LogicVista_test"], info["LogicVista-testmini"] = entry, entry
    (data / "dataset_info.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"several entries.*\['LogicVista_test', 'LogicVista-testmini'\]"):
        load_benchmark("logicvista", authors)


def test_check_data_exits_non_zero_on_a_missing_benchmark(authors):
    info = json.loads((authors / "data/dataset_info.json").read_text())
    del info["PAPO_MMK12"]
    (authors / "data/dataset_info.json").write_text(json.dumps(info))
    cmd = [
        sys.executable,
        "-m",
        "vppo.eval",
        "--check-data",
        "--data-dir",
        str(authors),
        "--benchmarks",
        "geo3k,mmk12",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stderr[-2000:]
    assert "== Geo3k (geo3k): sharegpt layout" in p.stdout and "MMK12 (mmk12): ERROR" in p.stdout
    assert "'PAPO_MMK12'" in p.stdout  # the entry it looked for
    (authors / "data/papo/hiyouga_geometry3k.json").write_text("[]")  # an empty benchmark
    r = _check("--data-dir", str(authors), "--benchmarks", "geo3k,wemath")
    assert not r["ok"] and "Geo3k: no usable problems" in r["errors"]["geo3k"] and len(r["check"]) == 1


# ----------------------------------------------------------------------------------------------------
# the benchmarks' own releases, as `hf download <repo> --local-dir <FOLDER>` leaves them


def make_releases(d: Path) -> Path:
    # hiyouga/geometry3k card: data/{train,validation,test}-*.parquet; images (list of Image), problem, answer
    geo = [
        {"images": [_struct(i)], "problem": f"<image>Find x ({i}).", "answer": str(3 + i)} for i in range(3)
    ]
    _parquet(d / "geometry3k/data/test-00000-of-00001.parquet", geo)
    _parquet(d / "geometry3k/data/train-00000-of-00001.parquet", geo[:1] * 5)
    # AI4Math/MathVerse card, config testmini: testmini.parquet (choices inside `question`)
    versions = ["Text Dominant", "Text Lite", "Vision Intensive", "Vision Dominant", "Vision Only"]
    mv = [
        {
            "sample_index": str(i),
            "problem_index": "1",
            "problem_version": v,
            "question": f"{MC_QUESTION} [{v}]" if v != "Vision Only" else "",
            "image": _struct(10 + i),
            "answer": "B",
            "question_type": "multi-choice",
            "metadata": {"split": "testmini"},
            "query_wo": "According to the question shown in the image, answer it.",
            "query_cot": "...",
            "question_for_eval": MC_QUESTION,
        }
        for i, v in enumerate(versions)
    ]
    _parquet(d / "MathVerse/testmini.parquet", mv)
    # MathLLMs/MathVision card: data/{test,testmini}-*.parquet; options a list (empty: free-form)
    mvis = [
        {
            "id": str(i),
            "question": q,
            "options": o,
            "image": f"images/{i}.jpg",
            "decoded_image": _struct(20 + i),
            "answer": a,
            "solution": None,
            "level": 2,
            "subject": "metric geometry",
        }
        for i, (q, o, a) in enumerate([("Which is larger?", ["3", "5"], "B"), ("How long is AB?", [], "2.5")])
    ]
    _parquet(d / "MathVision/data/test-00000-of-00001.parquet", mvis)
    _parquet(d / "MathVision/data/testmini-00000-of-00001.parquet", mvis[1:])
    # DynaMath/DynaMath_Sample card: splits sample_variant1..10 in data/sample<N>-*.parquet
    for v in range(1, 11):
        dm = [
            {
                "id": str(i),
                "question": f"What is y at x={v}?",
                "image": f"images/{i}.png",
                "decoded_image": _struct(30 + v),
                "ground_truth": str(v * (i + 1)),
                "answer_type": "float",
                "subject": "algebra",
                "knowledge_level": "high school",
            }
            for i in range(2)
        ]
        _parquet(d / f"DynaMath_Sample/data/sample{v}-00000-of-00001.parquet", dm)
    # FanqingM/MMK12: <split>-*.parquet with question (options inline), answer, image
    mk = [
        {"id": str(i), "subject": "math", "question": q, "answer": a, "image": _struct(50 + i)}
        for i, (q, a) in enumerate([(MC_QUESTION, "B"), ("What is x?", "7")])
    ]
    _parquet(d / "MMK12/data/test-00000-of-00001.parquet", mk)
    _parquet(d / "MMK12/data/train-00000-of-00001.parquet", mk * 3)
    # We-Math/We-Math: testmini.json with ID, key, question, ONE option string, image_path (a file
    # under images/), answer
    (d / "We-Math/images").mkdir(parents=True)
    wm = []
    for i in range(2):
        (d / f"We-Math/images/{i}.png").write_bytes(_png(60 + i))
        wm.append(
            {
                "ID": f"{i + 1}@1",
                "question": f"How many sides ({i})?",
                "option": "A. 3; B. 4; C. 5",
                "image_path": f"{i}.png",
                "key": "2steps_1",
                "answer": "B",
                "knowledge concept": "polygons",
            }
        )
    (d / "We-Math/testmini.json").write_text(json.dumps(wm))
    # LogicVista release: dataset.json keyed by id (imagename, question, answer) + images/
    (d / "LogicVista/images").mkdir(parents=True)
    lv = {}
    for i in range(2):
        (d / f"LogicVista/images/{i}.jpg").write_bytes(_png(70 + i))
        lv[str(i)] = {
            "imagename": f"{i}.jpg",
            "question": f"Which comes next? A. x B. y ({i})",
            "answer": "A" if i == 0 else "A, B",
            "reasoning": "...",
            "skill": ["inductive"],
        }
    (d / "LogicVista/dataset.json").write_text(json.dumps(lv))
    # MMMU/MMMU_Pro card: configs as folders; options a string holding a Python list, <image N> markers
    std = [
        {
            "id": "test_Art_1",
            "question": "Compare <image 1> and <image 2>. Which is older?",
            "options": "['the first', 'the second', '<image 3>']",
            "explanation": "",
            "answer": "B",
            "subject": "Art",
            "img_type": "['Paintings']",
            "topic_difficulty": "Easy",
            **{f"image_{n}": (_struct(80 + n) if n <= 3 else None) for n in range(1, 8)},
        }
    ]
    _parquet(d / "MMMU_Pro/standard (10 options)/test-00000-of-00001.parquet", std)
    vis = [
        {"id": "test_Art_1", "image": _struct(90), "options": "['a', 'b']", "answer": "A", "subject": "Art"}
    ]
    _parquet(d / "MMMU_Pro/vision/test-00000-of-00001.parquet", vis)
    return d


@pytest.fixture
def releases(tmp_path) -> Path:
    return make_releases(tmp_path / "hub")


def test_raw_releases_load_all_eight(releases):
    r = _check("--data-dir", str(releases), "--benchmarks", ALL)
    assert r["ok"], r["errors"]
    c = {x["name"]: x for x in r["check"]}
    assert {k: (v["layout"], v["problems"]) for k, v in c.items()} == {
        "geo3k": ("release", 3),
        "mathverse": ("release", 5),
        "mathverse_vision_dependent": ("release", 3),
        "mathvision": ("release", 2),
        "dynamath": ("release", 20),
        "mmk12": ("release", 2),
        "wemath": ("release", 2),
        "logicvista": ("release", 2),
        "mmmu_pro": ("release", 1),
    }
    assert all(not v["broken"] for v in c.values())
    assert c["geo3k"]["source"]["split"] == "test" and c["mmk12"]["source"]["split"] == "test"
    assert c["mmmu_pro"]["source"]["config"] == "standard (10 options)"
    assert c["dynamath"]["source"]["variants"] == list(range(1, 11)) and c["dynamath"]["images"] == 20
    assert c["mathvision"]["answer_kinds"] == {"letter": 1, "number": 1}
    assert c["logicvista"]["answer_kinds"] == {"letter": 2}

    def problems(name, **kw):
        return load_benchmark(name, releases, **kw).problems

    mvis = problems("mathvision")
    assert mvis[0].problem == "<image>Which is larger?\nChoices:\nA. 3\nB. 5" and mvis[0].answer == "B"
    assert mvis[1].problem == "<image>How long is AB?" and mvis[1].answer == "2.5"
    assert np.array_equal(np.asarray(mvis[0].pil_images()[0]), _pixels(_png(20)))
    mv = problems("mathverse")
    assert mv[0].problem == f"<image>{MC_QUESTION} [Text Dominant]"
    assert mv[4].problem == "<image>According to the question shown in the image, answer it."  # Vision Only
    assert [p.meta["problem_version"] for p in problems("mathverse_vision_dependent")] == [
        "Vision Intensive",
        "Vision Dominant",
        "Vision Only",
    ]
    wm = problems("wemath")[1]
    assert wm.problem == "<image>How many sides (1)?\nChoices: A. 3; B. 4; C. 5" and wm.answer == "B"
    assert np.array_equal(np.asarray(wm.pil_images()[0]), _pixels(releases / "We-Math/images/1.png"))
    mmmu = problems("mmmu_pro")[0]
    assert mmmu.problem == (
        "Compare <image> and <image>. Which is older?\nChoices:\nA. the first\nB. the second\nC. <image>"
    )
    assert [_pixels(s).tolist() for s in mmmu.images] == [_pixels(_png(80 + n)).tolist() for n in (1, 2, 3)]
    dm = problems("dynamath")
    assert [(p.meta["variant"], p.answer) for p in dm[:4]] == [(1, "1"), (1, "2"), (2, "2"), (2, "4")]
    assert problems("logicvista")[1].answer == "A, B"
    assert problems("mmk12")[0].problem == f"<image>{MC_QUESTION}"


def test_raw_releases_one_by_one_with_their_splits(releases, tmp_path):
    r = _check(
        "--benchmarks",
        "mathvision,mmmu_pro,dynamath,geometry3k",
        "--benchmark-path",
        f"MathVision={releases / 'MathVision'}",
        "--split",
        "mathvision=testmini",
        "--benchmark-path",
        f"mmmu_pro={releases / 'MMMU_Pro'}",
        "--split",
        "mmmu_pro=vision",
        "--benchmark-path",
        f"dynamath={releases / 'DynaMath_Sample'}",
        "--split",
        "dynamath=1,2",
        "--benchmark-path",
        f"hiyouga/geometry3k={releases / 'geometry3k/data/train-00000-of-00001.parquet'}",
    )
    assert r["ok"], r["errors"]
    c = {x["name"]: x for x in r["check"]}
    assert c["mathvision"]["problems"] == 1 and c["mathvision"]["source"]["split"] == "testmini"
    assert (
        c["mmmu_pro"]["prompt"]["text"].startswith("<image>\n\n") and c["mmmu_pro"]["prompt"]["answer"] == "A"
    )
    assert c["dynamath"]["problems"] == 4 and c["geo3k"]["problems"] == 5


def test_raw_releases_name_what_is_wrong(releases):
    # an unknown column set: named with the file, the columns found and the schema expected
    rows = pq.read_table(releases / "MathVerse/testmini.parquet").to_pylist()
    _parquet(
        releases / "MathVerse/testmini.parquet",
        [{k: v for k, v in r.items() if k != "problem_version"} for r in rows],
    )
    with pytest.raises(
        ValueError, match=r"testmini.parquet: unknown column set .*missing \['problem_version'\]"
    ):
        load_benchmark("mathverse", releases)
    # a benchmark folder with no test split
    (releases / "MMK12/data/test-00000-of-00001.parquet").unlink()
    with pytest.raises(ValueError, match=r"MMK12.*no file of split 'test'.*train-00000-of-00001.parquet"):
        load_benchmark("mmk12", releases)
    # an image file the table names but the folder lacks: the row is broken and named
    (releases / "We-Math/images/1.png").unlink()
    with pytest.warns(UserWarning, match="1 broken"):
        wm = load_benchmark("wemath", releases)
    assert len(wm.problems) == 1 and wm.broken == [
        f"row 1: image file '1.png' not found (looked at ['{releases / 'We-Math/images/1.png'}', "
        f"'{releases / 'We-Math/1.png'}'])"
    ]
    # a split asked of files that hold one, and a release asked of a benchmark that has none
    with pytest.raises(ValueError, match="--split geo3k=train: a split of the benchmark's own release"):
        load_benchmark("geo3k", make_authors(releases / "authors"), splits={"geo3k": "train"})
    with pytest.raises(ValueError, match="synth has no release of its own"):
        load_benchmark("geo3k", None, paths={"synth": releases})
    r = _check("--data-dir", str(releases), "--benchmarks", "wemath,mmk12,geo3k")
    assert not r["ok"] and set(r["errors"]) == {"mmk12"}
    assert "broken row 1: image file '1.png' not found" in r["report"]


# ----------------------------------------------------------------------------------------------------
# scoring: both graders, and an image the processor refuses (issue 26 item 6)


@pytest.fixture(scope="module")
def micro(tmp_path_factory) -> Path:
    from helpers import make_micro_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the micro model's matmuls are tiny (see tests/test_eval.py)
    yield make_micro_model(tmp_path_factory.mktemp("micro") / "micro-model")
    torch.set_num_threads(threads)


def test_released_grader_is_mathruler_on_the_last_box():
    from mathruler.grader import extract_boxed_content, grade_answer

    responses = [
        "so \\boxed{B}",
        "\\boxed{A} no, \\boxed{B. 5}",
        "B",
        "\\boxed{40}",
        "\\boxed{x<3}",
        "\\boxed{0.5}",
    ]
    answers = ["B", "B", "B", "40^\\circ", "x < 3", "\\frac{1}{2}"]
    scores, extracted, counters = evaluate.grade_responses(responses, answers, "released")
    want = [
        float(grade_answer(extract_boxed_content(ev_r.replace(" < ", "<")), a))
        for ev_r, a in zip(responses, answers)
    ]
    assert scores == want == [1.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    assert extracted == ["B", "B. 5", None, "40", "x<3", "0.5"] and counters["grader/no_box"] == 1
    project, _, _ = evaluate.grade_responses(responses, answers, "project")
    assert project == [1.0, 1.0, 0.0, 1.0, 1.0, 1.0]  # `B. 5` is choice B to the project's grader
    with pytest.raises(ValueError, match="grader must be one of"):
        evaluate.grade_responses(responses, answers, "lenient")


def test_scoring_with_both_graders_on_the_authors_layout(micro, authors, tmp_path):
    def scripted(batch, seeds):  # the multiple-choice problem answered `B` and `B. 5`
        return [
            r
            for p in batch
            for r in (["\\boxed{B}", "\\boxed{B. 5}"] if p.answer == "B" else ["\\boxed{1}"] * 2)
        ]

    base = [
        "--model",
        str(micro),
        "--data-dir",
        str(authors),
        "--benchmarks",
        "hiyouga_geometry3k,MMMU_MMMU_Pro",
        *FAST,
    ]
    proj = ev.main([*base, "--out", str(tmp_path / "p")], sample_fn=scripted)
    rel = ev.main([*base, "--out", str(tmp_path / "r"), "--grader", "released"], sample_fn=scripted)
    for name in ("geo3k", "mmmu_pro"):
        mc = json.loads((tmp_path / "p/samples.json").read_text())[name][0]
        assert mc["answer"] == "B" and mc["score"] == 1.0
        mc = json.loads((tmp_path / "r/samples.json").read_text())[name][0]
        assert [s["score"] for s in mc["samples"]] == [1.0, 0.0]
    assert proj["summary"]["geo3k"]["accuracy"] == pytest.approx(1 / 3)
    assert rel["summary"]["geo3k"]["accuracy"] == pytest.approx(0.5 / 3)
    m = json.loads((tmp_path / "r/manifest.json").read_text())
    assert m["grader"]["name"] == "released" and proj["manifest"]["grader"]["name"] == "project"
    assert m["data"]["geo3k"]["source"]["entry"] == "hiyouga_geometry3k"
    assert m["data"]["mmmu_pro"]["source"]["layout"] == "sharegpt"
    assert "Graded exactly as the authors' harness" in (tmp_path / "r/results.md").read_text()
    assert "Graded by the project's grader" in (tmp_path / "p/results.md").read_text()
    # the cached responses are re-graded, not regenerated, when only the grader changes
    calls = []
    again = ev.main(
        [*base, "--out", str(tmp_path / "r")], sample_fn=lambda b, s: calls.append(b) or scripted(b, s)
    )
    assert calls == [] and again["summary"]["geo3k"]["accuracy"] == pytest.approx(1 / 3)


def test_generation_run_on_raw_releases_and_a_refused_image_is_skipped(micro, releases, tmp_path):
    """Issue 26 item 6: one image with an aspect ratio over 200 (2000 x 8) in a benchmark is counted
    as a broken row, named, and the evaluation goes on (it aborted the whole run before)."""
    data = tmp_path / "train-schema"
    rows = [
        {
            "problem": f"<image>What is x ({i})?",
            "answer": str(i),
            "images": [{"bytes": _png(i, (2000, 8) if i == 1 else (36, 24))}],
        }
        for i in range(3)
    ]
    _parquet(data / "mmk12.parquet", rows)
    r = _check("--data-dir", str(data), "--benchmarks", "mmk12")
    assert r["check"][0]["aspect_ratio_over_200"] == ["mmk12[1]: image 0 is 2000x8"]
    out = tmp_path / "run"
    res = ev.main(
        ["--model", str(micro), "--data-dir", str(data), "--benchmarks", "mmk12", "--out", str(out), *FAST]
    )
    assert res["summary"]["mmk12"]["problems"] == 2
    m = json.loads((out / "manifest.json").read_text())
    assert m["data"]["mmk12"]["broken"] == 1
    assert m["data"]["mmk12"]["broken_rows"][0].startswith("row 1: the processor refuses its image")
    assert [p["uid"] for p in json.loads((out / "samples.json").read_text())["mmk12"]] == [
        "mmk12[0]",
        "mmk12[2]",
    ]
    with pytest.raises(ValueError, match="MMK12: broken row 1: the processor refuses its image"):
        strict = ["--data-dir", str(data), "--benchmarks", "mmk12", "--strict", "--out", str(tmp_path / "s")]
        ev.main(["--model", str(micro), *strict, *FAST])

    # the real sampler, a raw release, the authors' grader
    out = tmp_path / "raw"
    res = ev.main(
        [
            "--model",
            str(micro),
            "--data-dir",
            str(releases),
            "--benchmarks",
            "MMK12,geo3k",
            "--out",
            str(out),
            "--grader",
            "released",
            *FAST,
        ]
    )
    assert {k: v["problems"] for k, v in res["summary"].items()} == {"mmk12": 2, "geo3k": 3}
    samples = json.loads((out / "samples.json").read_text())
    assert all(
        len(p["samples"]) == 2 and isinstance(s["response"], str)
        for p in samples["mmk12"]
        for s in p["samples"]
    )
    assert res["manifest"]["data"]["mmk12"]["source"] == {
        "layout": "release",
        "source": "FanqingM/MMK12",
        "split": "test",
        "schema": "FanqingM/MMK12: <split>-*.parquet with question (options inline), answer, image",
    }
