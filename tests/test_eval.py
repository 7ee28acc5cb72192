import dataclasses
import hashlib
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from vppo import eval as ev
from vppo import evaluate, provenance, report
from vppo.benchmarks import PAPER_BENCHMARKS, load_benchmark
from vppo.data import PROMPT_SUFFIX, Problem
from vppo.rollout import GenSettings

SUFFIX = (
    "You first think through the reasoning process as an internal monologue, enclosed within "
    "<think> </think> tags. Then, provide your final answer enclosed within \\boxed{}."
)
REPO = Path(__file__).resolve().parents[1]
# Short generations keep the CLI runs to seconds on a CPU.
FAST = ["--samples", "2", "--max-new-tokens", "5", "--no-progress"]


def _png_bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (24, 36, 3), dtype=np.uint8)).save(
        buf, "PNG"
    )
    return buf.getvalue()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The micro model's matmuls are tiny: with 2 OpenMP threads on a loaded 2-core machine each one
    waits for the other thread (~25x slower here), so this module runs torch single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def micro(tmp_path_factory) -> Path:
    """A random Qwen2.5-VL of ~0.1 M parameters with the tiny tokenizer/processor, saved like a real one."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from vppo.tiny import build_processor, build_tokenizer

    out = tmp_path_factory.mktemp("micro") / "micro-model"
    tok = build_tokenizer(["What is x? \\boxed{1/2} 0.5", SUFFIX] * 10, vocab_size=300)
    proc = build_processor(tok, min_pixels=28 * 28, max_pixels=56 * 56)
    tid = tok.convert_tokens_to_ids
    text = dict(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=1024, rope_theta=10000.0,
        rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]},
        eos_token_id=tid("<|im_end|>"), bos_token_id=None, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                  fullatt_block_indexes=[0], window_size=56)  # fmt: skip
    cfg = Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=tid("<|image_pad|>"),
        video_token_id=tid("<|video_pad|>"), vision_start_token_id=tid("<|vision_start|>"),
        vision_end_token_id=tid("<|vision_end|>"),
    )  # fmt: skip
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    gc = model.generation_config
    gc.eos_token_id, gc.bos_token_id, gc.pad_token_id = tid("<|im_end|>"), None, tok.pad_token_id
    # Hidden defaults like Qwen2.5-VL-7B-Instruct's generation_config.json: the evaluation must ignore them.
    gc.do_sample, gc.repetition_penalty, gc.top_k, gc.top_p, gc.temperature = True, 1.5, 1, 0.001, 0.1
    model.save_pretrained(out)
    proc.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Geo3k in the authors' ShareGPT layout (4 problems) and We-Math as training-schema parquet (3)."""
    d = tmp_path_factory.mktemp("evaldata")
    (d / "img").mkdir()
    for i in range(4):
        (d / "img" / f"{i}.png").write_bytes(_png_bytes(i))
    answers = ["\\frac{1}{2}", "3", "B", "7"]
    recs = [
        {
            "messages": [{"role": "user", "content": f"<image>Problem {i}: what is x?"},
                         {"role": "assistant", "content": a}],
            "images": [f"img/{i}.png"],
        }
        for i, a in enumerate(answers)
    ]  # fmt: skip
    (d / "geo3k_test.json").write_text(json.dumps(recs))
    tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}
    cols = {"messages": "messages", "images": "images"}
    info = {
        "geo3k_test": {
            "file_name": "geo3k_test.json",
            "formatting": "sharegpt",
            "columns": cols,
            "tags": tags,
        }
    }
    (d / "dataset_info.json").write_text(json.dumps(info))
    rows = [
        {
            "problem": f"<image>How many shapes ({i})?",
            "answer": str(i),
            "images": [{"bytes": _png_bytes(10 + i)}],
        }
        for i in range(3)
    ]
    pq.write_table(pa.Table.from_pylist(rows), d / "wemath.parquet")
    return d


@pytest.fixture(scope="module")
def loaded(micro):
    """The micro model and processor as the CLI loads them (fp32 on the CPU)."""
    return ev.load_model(str(micro)), ev.load_eval_processor(str(micro), None, None)


def _run(micro, data_dir, out, *extra, sample_fn=None):
    argv = [
        "--model",
        str(micro),
        "--benchmarks",
        "geo3k,We-Math",
        "--data-dir",
        str(data_dir),
        "--out",
        str(out),
    ]
    return ev.main(argv + FAST + list(extra), sample_fn=sample_fn)


def _responses(out: Path) -> dict:
    samples = json.loads((out / "samples.json").read_text())
    return {b: [[s["response"] for s in p["samples"]] for p in probs] for b, probs in samples.items()}


# ----------------------------------------------------------------------------------------------------
# sampling


def test_seeded_sampler_follows_the_warped_distribution():
    torch.manual_seed(1)
    logits = torch.randn(1, 7) * 2
    gen = GenSettings(temperature=0.7, top_p=0.8, top_k=4)
    # The target written out: softmax(l / T), keep the top 4, then the smallest nucleus with mass >= 0.8.
    p = torch.softmax(logits[0] / 0.7, -1)
    order = p.argsort(descending=True)
    keep = order[:4]
    mass = p[keep] / p[keep].sum()
    n_keep = int((mass.cumsum(0) < 0.8).sum()) + 1
    target = torch.zeros(7)
    target[keep[:n_keep]] = p[keep[:n_keep]] / p[keep[:n_keep]].sum()

    n = 4000
    sampler = evaluate.SeededSampler(list(range(n)), gen)
    out = sampler(torch.zeros(n, 1, dtype=torch.long), logits.expand(n, 7).clone())
    assert torch.isfinite(out).sum(-1).eq(1).all()  # one token per row, 0 there and -inf elsewhere
    tok = out.argmax(-1)
    freq = torch.bincount(tok, minlength=7).double() / n
    assert freq[target == 0].sum() == 0
    assert (freq - target.double()).abs().max() < 4 * math.sqrt(0.25 / n)


def test_seeded_sampler_rows_do_not_depend_on_their_batch():
    torch.manual_seed(2)
    gen = GenSettings(temperature=1.0, top_p=1.0, top_k=0)
    alone, batched = evaluate.SeededSampler([42], gen), evaluate.SeededSampler([1, 2, 42, 3], gen)
    for _ in range(20):
        logits = torch.randn(4, 50)
        a = alone(None, logits[2:3].clone()).argmax(-1)
        b = batched(None, logits.clone()).argmax(-1)
        assert a.item() == b[2].item()
    with pytest.raises(ValueError, match="generators"):
        alone(None, torch.randn(2, 50))
    with pytest.raises(ValueError, match="temperature"):
        evaluate.SeededSampler([0], GenSettings(temperature=0.0))


def test_seeds_depend_on_seed_benchmark_and_row_only():
    s = evaluate.problem_seed(0, "geo3k", 3)
    assert s == evaluate.problem_seed(0, "geo3k", 3)
    assert (
        len(
            {
                s,
                evaluate.problem_seed(1, "geo3k", 3),
                evaluate.problem_seed(0, "wemath", 3),
                evaluate.problem_seed(0, "geo3k", 4),
            }
        )
        == 4
    )
    assert evaluate.sample_seeds(s, 8)[:2] == evaluate.sample_seeds(s, 2)


# ----------------------------------------------------------------------------------------------------
# grading and averaging (scripted responses: the grader, not the model, is under test)


def test_avg_at_n_grades_equivalent_answers_and_missing_boxes():
    problems = [
        Problem("p0", "<image>x?", "\\frac{1}{2}", meta={"row": 0}),
        Problem("p1", "y?", "0.5", meta={"row": 5}),
        Problem("p2", "z?", "7", meta={"row": 2}),
    ]
    script = {
        "p0": ["so \\boxed{0.5}", "I do not know", "\\boxed{1/2}", "\\boxed{2}"],  # 1, 0 (no box), 1, 0
        "p1": ["\\boxed{\\frac{1}{2}}", "\\boxed{\\dfrac{2}{4}}", "\\boxed{0.50}", "\\boxed{.5}"],
        "p2": ["\\boxed{8}", "none", "\\boxed{}", "7"],  # all wrong; three without an answer
    }
    seen = []

    def sample_fn(batch, seeds):
        seen.append(([p.uid for p in batch], seeds))
        return [r for p in batch for r in script[p.uid]]

    res = evaluate.evaluate_problems(
        None, None, problems, samples=4, batch_size=2, benchmark="t", seed=3, sample_fn=sample_fn
    )
    s0 = [s["score"] for s in res.results[0].samples]
    assert s0 == [1.0, 0.0, 1.0, 0.0]
    assert res.results[0].samples[1]["extracted"] is None and res.results[0].samples[0]["extracted"] == "0.5"
    assert [s["extracted"] for s in res.results[2].samples][1] is None
    p1 = res.per_problem[1]
    assert p1 >= 0.75  # \frac{1}{2}, 0.50, .5 are 0.5 (2/4 unreduced is mathruler's call)
    assert res.per_problem[2] == 0.0
    expect = [0.5, p1, 0.0]
    mean = sum(expect) / 3
    se = math.sqrt(sum((v - mean) ** 2 for v in expect) / 2 / 3)
    assert res.accuracy == pytest.approx(mean) and res.stderr == pytest.approx(se)
    assert res.no_box_rate == pytest.approx(
        4 / 12
    )  # "I do not know", "none", "\boxed{}", "7" (as the grader)
    assert res.grader["grader/no_box"] == 4 and res.results[2].samples[2]["extracted"] == ""
    # seeds come from the row index in meta, not the position; batches of 2 problems
    assert [u for u, _ in seen] == [["p0", "p1"], ["p2"]]
    assert seen[0][1][1] == evaluate.sample_seeds(evaluate.problem_seed(3, "t", 5), 4)
    assert res.grader.get("grader/n") == 12


def test_mean_and_stderr():
    assert evaluate.mean_and_stderr([1.0]) == (1.0, 0.0)
    m, se = evaluate.mean_and_stderr([0.0, 1.0, 1.0, 0.5])
    assert m == pytest.approx(0.625) and se == pytest.approx(np.std([0, 1, 1, 0.5], ddof=1) / 2)
    with pytest.raises(ValueError):
        evaluate.mean_and_stderr([])


def test_report_sits_beside_the_paper_numbers():
    assert report.paper_model("/models/Qwen2.5-VL-7B-Instruct") == "Qwen2.5-VL-7B"
    assert report.paper_model("ckpts/VPPO-7B") == "VPPO-7B"
    assert report.paper_model("runs/tiny/export") is None
    summary = {
        k: {
            "accuracy": 0.5,
            "stderr": 0.01,
            "samples": 8,
            "problems": 10,
            "no_box_rate": 0.0,
            "generated": 10,
        }
        for k in (*PAPER_BENCHMARKS, "synth")
    }
    md = report.markdown_report(summary, "Qwen2.5-VL-7B-Instruct", "Qwen2.5-VL-7B")
    lines = md.splitlines()
    ours = next(ln for ln in lines if ln.startswith("| Qwen2.5-VL-7B-Instruct |"))
    paper = next(ln for ln in lines if ln.startswith("| Qwen2.5-VL-7B (paper"))
    assert ours.endswith(f"| 50.0 ± {100 * math.sqrt(8 * 0.01**2) / 8:.1f} |")  # synth not in Avg
    assert paper.startswith(
        "| Qwen2.5-VL-7B (paper, Table 1) | 39.0 | 55.7 | 42.5 | 37.1 | 18.4 | 46.4 | 42.4 | 25.1 |"
    )
    assert paper.endswith("| 38.3 |")
    sub = report.markdown_report(
        {"geo3k": summary["geo3k"], "mathverse": summary["mathverse"]}, "x", "VPPO-7B"
    )
    assert "| 71.6 | 46.5 | 59.0 |" in sub and "2 paper benchmarks" in sub


# ----------------------------------------------------------------------------------------------------
# the command line on the micro model


def test_cli_asks_with_the_suffix_the_model_folder_records(micro, data_dir, tmp_path, monkeypatch):
    import shutil

    from vppo.data import PROMPT_FILE, save_prompt_suffix

    model = tmp_path / "tiny-like"
    shutil.copytree(micro, model)
    save_prompt_suffix(model, "Answer in \\boxed{}.")
    real, seen = evaluate.encode_prompts, []

    def encode(problems, processor, suffix=PROMPT_SUFFIX, **kw):  # what generation is given
        seen.append(suffix)
        return real(problems, processor, suffix, **kw)

    monkeypatch.setattr(evaluate, "encode_prompts", encode)
    for name, extra, want in (
        ("recorded", (), "Answer in \\boxed{}."),
        ("explicit", ("--prompt-suffix", ""), ""),
        ("unrecorded", (), SUFFIX),  # no prompt file: the released suffix
    ):
        if name == "unrecorded":
            (model / PROMPT_FILE).unlink()
        seen.clear()
        m = _run(model, data_dir, tmp_path / name, "--benchmarks", "geo3k", *extra)["manifest"]
        assert seen and set(seen) == {want}, (name, seen)
        assert m["prompt"]["suffix"] == want and (want in m["prompt"]["example"])
        assert (SUFFIX in m["prompt"]["example"]) == (want == SUFFIX)


def test_cli_writes_tables_samples_and_manifest(micro, data_dir, tmp_path):
    out = tmp_path / "run"
    r = _run(micro, data_dir, out, "--seed", "5", "--batch-size", "3")
    summary = r["summary"]
    assert set(summary) == {"geo3k", "wemath"} and summary["geo3k"]["problems"] == 4
    md = (out / "results.md").read_text()
    assert "| model | Geo3k | We-Math | Avg |" in md and "| micro-model |" in md
    assert "(paper, Table 1)" not in md

    samples = json.loads((out / "samples.json").read_text())
    for b, n in (("geo3k", 4), ("wemath", 3)):
        assert len(samples[b]) == n
        for p in samples[b]:
            assert len(p["samples"]) == 2
            assert all(set(s) == {"response", "extracted", "score"} for s in p["samples"])
            assert p["score"] == sum(s["score"] for s in p["samples"]) / 2
        acc = sum(p["score"] for p in samples[b]) / n
        assert summary[b]["accuracy"] == pytest.approx(acc)

    m = json.loads((out / "manifest.json").read_text())
    weights = hashlib.sha256((micro / "model.safetensors").read_bytes()).hexdigest()
    assert m["model"]["files"]["model.safetensors"] == weights
    assert (
        m["model"]["files"]["config.json"] == hashlib.sha256((micro / "config.json").read_bytes()).hexdigest()
    )
    assert len(m["model"]["sha256"]) == 64
    geo_file = str(data_dir / "geo3k_test.json")
    assert (
        m["data"]["geo3k"]["files_sha256"][geo_file]
        == hashlib.sha256(Path(geo_file).read_bytes()).hexdigest()
    )
    assert len(m["data"]["wemath"]["problems_sha256"]) == 64
    assert m["prompt"]["suffix"] == SUFFIX and SUFFIX in m["prompt"]["example"]
    assert m["prompt"]["example"].count("<|image_pad|>") == 1
    assert m["sampling"] == {"temperature": 1.0, "top_p": 1.0, "top_k": 50, "max_new_tokens": 5, "samples": 2,
                             "repetition_penalty": 1.0}  # fmt: skip
    assert m["seed"] == 5 and m["dtype"] == "torch.float32" and m["device"] == "cpu"
    assert m["grader"]["source_sha256"] == hashlib.sha256((REPO / "vppo/reward.py").read_bytes()).hexdigest()
    assert m["packages"]["torch"] and m["packages"]["transformers"] and m["packages"]["python"]
    assert m["results"]["avg"]["accuracy"] == pytest.approx(
        (summary["geo3k"]["accuracy"] + summary["wemath"]["accuracy"]) / 2
    )


def test_same_seed_twice_gives_identical_scores_and_batching_does_not_matter(micro, data_dir, tmp_path):
    a = _run(micro, data_dir, tmp_path / "a", "--seed", "1", "--batch-size", "1")
    b = _run(micro, data_dir, tmp_path / "b", "--seed", "1", "--batch-size", "4")
    _run(micro, data_dir, tmp_path / "c", "--seed", "2", "--batch-size", "4")
    ra, rb, rc = (_responses(tmp_path / x) for x in "abc")
    assert ra == rb and a["summary"]["geo3k"]["accuracy"] == b["summary"]["geo3k"]["accuracy"]
    assert ra != rc
    assert len({r for p in ra["geo3k"] for r in p}) > 1  # the responses are sampled, not all alike


def test_killed_evaluation_resumes_without_regenerating(micro, loaded, data_dir, tmp_path):
    inner = evaluate.rollout_sampler(*loaded, GenSettings(1.0, 1.0, 50, 5))
    calls = []

    def counting(batch, seeds):
        calls.append([p.uid for p in batch])
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed while the third batch generates
        return inner(batch, seeds)

    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        _run(micro, data_dir, out, "--batch-size", "1", sample_fn=counting)
    cached = (out / "cache" / "geo3k.jsonl").read_text().splitlines()
    assert len(cached) == 1 + 2  # header + the two finished problems
    with open(out / "cache" / "geo3k.jsonl", "a") as f:
        f.write('{"index": 2, "uid": "geo3k[2]", "ans')  # a torn line, as a SIGKILL mid-write leaves

    calls.clear()
    _run(micro, data_dir, out, "--batch-size", "1", sample_fn=_count(inner, calls))
    assert calls == [["geo3k[2]"], ["geo3k[3]"], ["wemath[0]"], ["wemath[1]"], ["wemath[2]"]]
    _run(micro, data_dir, tmp_path / "fresh", "--batch-size", "2")
    assert _responses(out) == _responses(tmp_path / "fresh")

    calls.clear()
    limited = _run(micro, data_dir, tmp_path / "limited", "--limit", "2", sample_fn=_count(inner, calls))
    assert limited["summary"]["geo3k"]["problems"] == 2 and len(calls) == 2
    grown = _run(micro, data_dir, tmp_path / "limited", "--batch-size", "1", sample_fn=_count(inner, calls))
    assert calls[2:] == [["geo3k[2]"], ["geo3k[3]"], ["wemath[2]"]]  # a larger --limit reuses the cache
    assert grown["summary"]["geo3k"]["generated"] == 2

    calls.clear()
    again = _run(micro, data_dir, out, "--batch-size", "1", sample_fn=_count(inner, calls))
    assert calls == [] and again["summary"]["geo3k"]["generated"] == 0
    with pytest.raises(ValueError, match="other settings.*sampling"):
        _run(micro, data_dir, out, "--temperature", "0.5", sample_fn=_count(inner, calls))
    _run(micro, data_dir, out, "--temperature", "0.5", "--fresh", sample_fn=_count(inner, calls))
    assert len(calls) == 2  # --fresh regenerated both benchmarks (batch size 8)


def _count(inner, calls):
    def sample_fn(batch, seeds):
        calls.append([p.uid for p in batch])
        return inner(batch, seeds)

    return sample_fn


def test_sigkilled_subprocess_resumes(micro, loaded, tmp_path):
    """A real kill -9 of `python -m vppo.eval` after some problems are cached; the rerun only
    generates the rest and the final numbers equal an uninterrupted run."""
    n = 16  # enough problems that the kill lands long before the run could finish
    data = tmp_path / "data"
    data.mkdir()
    rows = [
        {"problem": f"<image>Count ({i})?", "answer": str(i), "images": [{"bytes": _png_bytes(i)}]}
        for i in range(n)
    ]
    pq.write_table(pa.Table.from_pylist(rows), data / "mmk12.parquet")
    out = tmp_path / "killed"
    argv = ["--model", str(micro), "--benchmarks", "mmk12", "--data-dir", str(data), "--out", str(out),
            "--batch-size", "1", "--samples", "2", "--max-new-tokens", "16", "--no-progress"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "vppo.eval", *argv]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    cache = out / "cache" / "mmk12.jsonl"
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if cache.exists() and len(cache.read_text().splitlines()) >= 2:  # header + one problem
                break
            time.sleep(0.01)
        assert proc.poll() is None, (
            f"finished before it could be killed: {proc.stderr.read().decode()[-2000:]}"
        )
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    n_cached = len([ln for ln in cache.read_text().splitlines()[1:] if ln.endswith("}")])
    assert 1 <= n_cached < n

    calls = []
    gen = GenSettings(1.0, 1.0, 50, 16)
    resumed = ev.main(argv, sample_fn=_count(evaluate.rollout_sampler(*loaded, gen), calls))
    assert sum(len(c) for c in calls) == n - n_cached
    # The same problems in one uninterrupted batch, through the shared function.
    problems = load_benchmark("mmk12", data).problems
    whole = evaluate.evaluate_problems(
        *loaded, problems, samples=2, gen=gen, seed=0, benchmark="mmk12", batch_size=n
    )
    assert _responses(out)["mmk12"] == [[s["response"] for s in r.samples] for r in whole.results]
    assert resumed["summary"]["mmk12"]["accuracy"] == whole.accuracy


def test_checkpoint_generation_defaults_are_not_applied(loaded, data_dir):
    """The micro model's generation_config carries top_k=1 and repetition_penalty=1.5 (as Qwen's
    carries top_k=1, 1.05): sampling must follow the evaluation's settings, so responses differ."""
    model, proc = loaded
    probs = load_benchmark("geo3k", data_dir).problems[:1]
    texts = evaluate.rollout_sampler(model, proc, GenSettings(1.0, 1.0, 0, 6))(probs, [list(range(6))])
    assert len(set(texts)) > 1  # top_k=1 from the checkpoint would make all six identical


def test_regrouped_stragglers_give_the_responses_of_one_pass(loaded, data_dir, monkeypatch):
    """--regroup-after: rows still running after k tokens are generated again on their own from the same
    seeds; every response equals the one-pass response. A twelfth of the vocabulary counts as EOS here so
    that some rows stop before k, some between k and max_new_tokens, some never."""
    from vppo import tokens

    model, proc = loaded
    real = tokens.token_ids(model, proc)
    eos = [*real.eos, *range(40, 40 + len(proc.tokenizer) // 12)]
    monkeypatch.setattr(evaluate, "token_ids", lambda m, p: dataclasses.replace(real, eos=eos))
    calls = []
    inner = evaluate.generate
    monkeypatch.setattr(evaluate, "generate", lambda *a, **k: calls.append(a[1]["input_ids"].shape[0] * a[2])
                        or inner(*a, **k))  # fmt: skip
    probs = load_benchmark("geo3k", data_dir).problems
    seeds = [evaluate.sample_seeds(evaluate.problem_seed(0, "geo3k", i), 4) for i in range(len(probs))]
    gen = GenSettings(1.0, 1.0, 0, 16)
    one = evaluate.rollout_sampler(model, proc, gen)(probs, seeds)
    assert calls == [16]
    calls.clear()
    two = evaluate.rollout_sampler(model, proc, gen, regroup_after=3)(probs, seeds)
    assert two == one
    assert calls[0] == 16 and 0 < calls[1] < 16  # the stragglers only, one row each
    with pytest.raises(ValueError, match="regroup_after"):
        evaluate.rollout_sampler(model, proc, gen, regroup_after=-1)


def test_validation_api_on_loaded_problems(loaded):
    """What the training loop calls: problems without a row index are seeded by position."""
    from vppo.data import load_problems

    rows = [
        {"problem": "<image>What is x?", "answer": "1", "images": [{"bytes": _png_bytes(i)}]}
        for i in range(3)
    ]
    problems = load_problems(rows)
    model, proc = loaded
    gen = GenSettings(1.0, 1.0, 50, 4)
    a = evaluate.evaluate_problems(model, proc, problems, samples=2, gen=gen, seed=7, batch_size=3)
    b = evaluate.evaluate_problems(model, proc, problems, samples=2, gen=gen, seed=7, batch_size=2)
    assert [r.samples for r in a.results] == [r.samples for r in b.results]
    assert a.accuracy == b.accuracy and 0.0 <= a.accuracy <= 1.0 and a.generated == 3
    assert [r.index for r in a.results] == [0, 1, 2]
    with pytest.raises(ValueError, match="samples"):
        evaluate.evaluate_problems(model, proc, problems, samples=0)
    with pytest.raises(ValueError, match="problems"):
        evaluate.evaluate_problems(model, proc, [], samples=1)


def test_cli_rejects_bad_arguments_before_loading(micro, data_dir, tmp_path):
    base = ["--model", str(micro), "--data-dir", str(data_dir), "--out", str(tmp_path)]
    with pytest.raises(ValueError, match="did you mean 'We-Math'"):
        ev.main([*base, "--benchmarks", "wemth"])
    with pytest.raises(ValueError, match="MathVerse not found"):
        ev.main([*base, "--benchmarks", "mathverse"])
    with pytest.raises(ValueError, match="--samples"):
        ev.main([*base, "--benchmarks", "geo3k", "--samples", "0"])
    with pytest.raises(ValueError, match="not a local model folder"):
        ev.main(["--model", str(tmp_path / "none"), "--data-dir", str(data_dir), "--benchmarks", "geo3k"])


def test_model_hashes_are_memoised_and_track_changes(tmp_path, monkeypatch):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"\x00" * 100)
    (model / "notes.md").write_text("not hashed")
    memo = tmp_path / "memo.json"
    first = provenance.model_hashes(model, memo)
    assert set(first["files"]) == {"config.json", "model.safetensors"}
    assert first["files"]["model.safetensors"] == hashlib.sha256(b"\x00" * 100).hexdigest()
    hashed = []
    real = provenance.sha256_file
    monkeypatch.setattr(provenance, "sha256_file", lambda p: hashed.append(p.name) or real(p))
    assert provenance.model_hashes(model, memo) == first and hashed == []  # nothing re-read
    (model / "model.safetensors").write_bytes(b"\x01" * 101)
    changed = provenance.model_hashes(model, memo)
    assert hashed == ["model.safetensors"] and changed["combined"] != first["combined"]


def test_math_verify_agreement_is_reported():
    def sample(response, score):
        return {"response": response, "extracted": None, "score": score}

    results = [
        evaluate.ProblemResult(
            0, "a", "0.5", 1, [sample("\\boxed{\\frac{1}{2}}", 1.0), sample("no answer", 0.0)]
        ),
        evaluate.ProblemResult(1, "b", "3", 2, [sample("\\boxed{3}", 1.0), sample("\\boxed{4}", 0.0)]),
    ]
    a = evaluate.grader_agreement(results)
    # Both graders take 1/2 for 0.5 and 3 for 3, and neither credits "no answer" or 4.
    assert (a["n"], a["agree"], a["both_correct"], a["rate"]) == (4, 4, 2, 1.0)
    summary = {"geo3k": {"accuracy": 0.5, "stderr": 0.1, "samples": 2, "problems": 2, "no_box_rate": 0.25,
                         "generated": 2, "math_verify_agreement": a}}  # fmt: skip
    assert f"agree on {a['agree']}/4" in report.markdown_report(summary, "m", None)


def test_cache_regrades_instead_of_regenerating_when_only_the_grader_changed(tmp_path):
    key = {"model": "m", "seed": 0}
    path = tmp_path / "c.jsonl"
    cache = evaluate.ProblemCache(path, key, grader={"v": 1})
    stale = [{"response": "so \\boxed{0.5}", "extracted": "0.5", "score": 0.0}]  # graded wrong by "v1"
    cache.add(evaluate.ProblemResult(3, "b[3]", "\\frac{1}{2}", 9, stale))
    same = evaluate.ProblemCache(path, key, grader={"v": 1})
    assert same.regraded == 0 and same.done[3].samples[0]["score"] == 0.0
    fixed = evaluate.ProblemCache(path, key, grader={"v": 2})
    assert fixed.regraded == 1 and fixed.done[3].samples[0]["score"] == 1.0
    again = evaluate.ProblemCache(path, key, grader={"v": 2})
    assert again.regraded == 0 and again.done[3].samples[0]["score"] == 1.0  # rewritten on disk
    with pytest.raises(ValueError, match="differing: seed"):
        evaluate.ProblemCache(path, {"model": "m", "seed": 1}, grader={"v": 2})


def test_eval_processor_uses_the_recipe_bounds_for_stock_processors(tmp_path):
    from vppo.tiny import build_processor, build_tokenizer

    tok = build_tokenizer(["a b c"], vocab_size=300)
    stock, small = tmp_path / "stock", tmp_path / "small"
    build_processor(tok, min_pixels=3136, max_pixels=12845056).save_pretrained(
        stock
    )  # Qwen2.5-VL-7B-Instruct's
    build_processor(tok, min_pixels=784, max_pixels=3136).save_pretrained(small)
    assert ev.image_pixels(ev.load_eval_processor(str(stock), None, None)) == {"min": 200704, "max": 1003520}
    assert ev.image_pixels(ev.load_eval_processor(str(small), None, None)) == {"min": 784, "max": 3136}
    assert ev.image_pixels(ev.load_eval_processor(str(stock), 784, 6272)) == {"min": 784, "max": 6272}
