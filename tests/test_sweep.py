"""vppo.sweep: the aggregation by hand, and the quick mode killed with SIGKILL and resumed (issue 15)."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vppo import bases, sweep


def _raw(arm, seed, acc, tasks, curve, gen=1.0):
    return {
        "arm": arm,
        "seed": seed,
        "overrides": [],
        "steps": 2,
        "reward": [0.1, 0.3],
        "kept_frac": [1, 1],
        "curve": [{"step": s, "val_accuracy": v, "val_stderr": 0.01} for s, v in curve],
        "generated_samples": int(64 * gen),
        "trained_samples": 64,
        "test": {"accuracy": acc, "stderr": 0.01, "problems": 8, "samples": 2, "per_task": tasks},
        "spotlight": {"all": {"k3_precision": 0.1, "k3_recall": 0.9, "kl_recall": 0.8, "base_rate": 0.04}},
    }


def test_aggregate_by_hand(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    rows = [
        _raw("grpo", 1, 0.30, {"a": 0.2, "b": 0.4}, [(0, 0.2), (2, 0.3)]),
        _raw("grpo", 2, 0.34, {"a": 0.3, "b": 0.38}, [(0, 0.2), (2, 0.4)]),
        _raw("vppo", 1, 0.40, {"a": 0.5, "b": 0.3}, [(0, 0.2), (2, 0.5)], gen=2.0),
        _raw("vppo", 2, 0.36, {"a": 0.4, "b": 0.32}, [(0, 0.2), (2, 0.45)], gen=1.5),
    ]
    for r in rows:
        (raw / f"{r['arm']}_s{r['seed']}.json").write_text(json.dumps(r))
    s = sweep.aggregate(tmp_path)
    assert list(s) == ["grpo", "vppo"]  # arm order of sweep.ARMS
    assert s["grpo"]["test_mean"] == pytest.approx(0.32)
    assert s["grpo"]["test_std"] == pytest.approx(math.sqrt(2 * 0.02**2))  # sample std of 0.30, 0.34
    assert s["vppo"]["test_mean"] == pytest.approx(0.38)
    # paired by seed: +0.10 and +0.02
    assert s["vppo"]["vs_grpo_mean"] == pytest.approx(0.06)
    assert s["vppo"]["vs_grpo_std"] == pytest.approx(math.sqrt(2 * 0.04**2))
    assert "vs_grpo_mean" not in s["grpo"]
    assert s["vppo"]["per_task"]["a"][0] == pytest.approx(0.45)
    assert s["vppo"]["generated_x"] == pytest.approx(3.5 / 2)
    table = (tmp_path / "table.md").read_text()
    assert "| VPPO | 2 | 38.0 ± 2.8 | 40.0, 36.0 | 20.0 → 47.5 (+27.5 ± 3.5) |" in table
    assert "+6.0 ± 5.7" in table and "1.75x" in table
    assert "| 4 % | 90 / 80 |" in table  # visual share, top-40 % recall k3 / KL
    assert json.loads((tmp_path / "summary.json").read_text())["vppo"]["test"] == [0.40, 0.36]
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "base.json").write_text(
        json.dumps({"test": {"accuracy": 0.25, "per_task": {"a": 0.2, "b": 0.3}}})
    )
    sweep.aggregate(tmp_path, plot=False)
    assert (
        "| tiny base (no RL) | – | 25.0 (base) |  |  | 20.0 | 30.0 |" in (tmp_path / "table.md").read_text()
    )


def test_arms_are_configs_of_the_loop(tmp_path):
    from vppo.config import load_config

    for arm in sweep.ARMS:
        cfg = load_config(None, sweep.Sweep(tmp_path, tmp_path, sweep.Budget()).overrides(arm, 1))
        assert cfg.train.total_steps == sweep.Budget().steps and cfg.rollout.n == sweep.Budget().n
    c = {a: load_config(None, sweep.ARMS[a]) for a in sweep.ARMS}
    assert (c["grpo"].algo.name, c["grpo"].rollout.online_filter, c["grpo"].algo.clip_high) == (
        "grpo",
        False,
        0.2,
    )
    assert c["dapo"].rollout.online_filter and c["dapo"].algo.clip_high == 0.28
    v = c["vppo"].algo
    assert (v.name, v.shaping, v.topk_ratio, v.token_select) == ("vppo", "released", 0.4, "dependency")
    assert c["vppo"].rollout.online_filter
    assert (c["tas_only"].algo.shaping, c["tas_only"].algo.topk_ratio) == ("released", 1.0)
    assert (c["tgf_only"].algo.shaping, c["tgf_only"].algo.topk_ratio) == ("none", 0.4)
    assert c["random40"].algo.token_select == "random" and c["entropy40"].algo.token_select == "entropy"


def _metrics_steps(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["step"] for x in lines if x.strip() and "reward" in json.loads(x)]


def test_quick_mode_resumes_after_sigkill(tmp_path):
    from helpers import make_micro_model, subprocess_env

    from vppo import synth

    model = make_micro_model(tmp_path / "m")
    data = tmp_path / "d"
    synth.write_synth(synth.SynthConfig(tasks=synth.SPOTLIGHT_TASKS, n_train=12, n_val=4, n_test=4), data)
    out, res = tmp_path / "runs", tmp_path / "results"
    cmd = [
        sys.executable,
        "-m",
        "vppo.sweep",
        "--quick",
        "--model",
        str(model),
        "--data",
        str(data),
        "--out",
        str(out),
        "--results",
        str(res),
        # a random micro model solves nothing: no online filtering, short responses
        "--set",
        "rollout.online_filter=false",
        "--set",
        "rollout.max_response_len=8",
        "--set",
        "train.impl=torch",
    ]
    env = subprocess_env()
    p = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    first = out / "grpo" / "seed1"
    t0 = time.time()
    try:  # kill the whole sweep (and its training process) once the first run has saved a checkpoint
        while time.time() - t0 < 400:
            if list(first.glob("checkpoints/step-*/meta.json")):  # a complete checkpoint: mid-run
                time.sleep(0.5)
                break
            assert p.poll() is None, p.stdout.read().decode()[-3000:]
            time.sleep(0.2)
        else:
            pytest.fail("the first run never saved a checkpoint")
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    assert not (first / sweep.DONE).exists() and not (res / "raw").exists()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "resumed from" in (first / "sweep.log").read_text()
    for arm in ("grpo", "vppo"):
        rd = out / arm / "seed1"
        assert _metrics_steps(rd) == [1, 2]  # each step once, none lost or repeated
        raw = json.loads((res / "raw" / f"{arm}_s1.json").read_text())
        assert raw["steps"] == 2 and raw["test"]["problems"] == 4 and raw["test"]["samples"] == 2
        assert [c["step"] for c in raw["curve"]] == [0, 1, 2]
        assert raw["generated_samples"] == raw["trained_samples"] == 2 * 2 * 4
        assert raw["spotlight"]["all"]["responses"] == 2
        assert 0 < raw["seconds"]["train_cpu_s"] and 0 < raw["seconds"]["train_s"]
    summary = json.loads((res / "summary.json").read_text())
    grpo = json.loads((res / "raw" / "grpo_s1.json").read_text())
    assert summary["grpo"]["test_mean"] == grpo["test"]["accuracy"] and summary["grpo"]["test_std"] == 0.0
    table = (res / "table.md").read_text()
    assert f"| GRPO | 1 | {100 * grpo['test']['accuracy']:.1f} |" in table and (res / "curves.png").exists()
    assert f"--regroup-after {sweep.REGROUP_AFTER}" in (out / "vppo" / "seed1" / "sweep.log").read_text()
    # a third call finds everything done: nothing retrained; the result keeps the commit that trained it
    times = out / "vppo" / "seed1" / "sweep_times.json"
    vppo_raw = json.loads((res / "raw" / "vppo_s1.json").read_text())
    assert json.loads(times.read_text())["code"] == vppo_raw["code"]
    times.write_text(json.dumps({**json.loads(times.read_text()), "code": "trained-here"}))
    stamp = (out / "vppo" / "seed1" / sweep.DONE).stat().st_mtime_ns
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and (out / "vppo" / "seed1" / sweep.DONE).stat().st_mtime_ns == stamp
    assert json.loads((res / "raw" / "vppo_s1.json").read_text())["code"] == "trained-here"
    assert "$ " not in (out / "vppo" / "seed1" / "sweep.log").read_text().split("vppo.spotlight")[-1]
    # a later sitting without the run folders: the committed raw results stand, nothing retrained
    before = {p.name: p.read_text() for p in (res / "raw").glob("*.json")}
    out2 = tmp_path / "runs2"
    r = subprocess.run([*cmd[: cmd.index("--out") + 1], str(out2), *cmd[cmd.index("--out") + 2 :]],
                       env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert r.stdout.count("finished in an earlier sitting") == 2
    assert not (out2 / "grpo" / "seed1" / "metrics.jsonl").exists()
    assert {p.name: p.read_text() for p in (res / "raw").glob("*.json")} == before
    # every result names the base it started from; one from another base stops the sweep, clearly
    sha = bases.weights_fingerprint(model)
    assert json.loads((res / "base.json").read_text())["base_sha"] == sha
    assert {json.loads(t)["base_sha"] for t in before.values()} == {sha}
    tampered = {**json.loads(before["grpo_s1.json"]), "base_sha": "0" * 16}
    (res / "raw" / "grpo_s1.json").write_text(json.dumps(tampered))
    out3 = tmp_path / "runs3"
    r = subprocess.run([*cmd[: cmd.index("--out") + 1], str(out3), *cmd[cmd.index("--out") + 2 :]],
                       env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 2 and "different bases are not one sweep" in r.stderr, r.stderr[-2000:]
    assert not (out3 / "grpo" / "seed1" / "metrics.jsonl").exists()
    with pytest.raises(ValueError, match="2 different bases"):
        sweep.aggregate(res, plot=False)
    # a truncated raw result is named, in a sweep and in --aggregate-only, without a traceback
    (res / "raw" / "grpo_s1.json").write_text(before["grpo_s1.json"][:40])
    for extra in ([], ["--aggregate-only"]):
        r = subprocess.run([*cmd, *extra], env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and "grpo_s1.json: not valid JSON" in r.stderr, r.stderr[-2000:]
        assert "Traceback" not in r.stderr


def test_quick_as_documented_fits_its_batch(tmp_path):
    """`python -m vppo.sweep --quick`, exactly as documented, gives every arm a loadable config (issue 26
    item 3: the default train.micro_batch=32 did not divide the quick mini-batch of 2 x 4 samples)."""
    from vppo.config import batch_numbers, load_config

    sw = sweep.Sweep(tmp_path, tmp_path, sweep.QUICK)
    for arm in ("grpo", "vppo"):
        batch_numbers(load_config(None, sw.overrides(arm, 1)), 1)  # raises when a size does not divide


@pytest.mark.parametrize(
    "args, message",
    [
        (["--seeds", "abc"], "comma-separated non-negative integers"),
        (["--seeds", "1,,2"], "comma-separated non-negative integers"),
        (["--seeds", "1.5"], "comma-separated non-negative integers"),
        (["--seeds", "1,1"], "a seed is repeated"),
        (["--steps", "0"], "a positive integer"),
        (["--arms", "grpo,nope"], "unknown arms ['nope']"),
    ],
)
def test_bad_arguments_are_named(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        sweep.main([*args, "--out", str(tmp_path / "o"), "--results", str(tmp_path / "r")])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_failed_run_makes_the_sweep_fail(tmp_path):
    """Every run failing (here: a training config the loop rejects) ends in a non-zero exit naming the
    runs, after the others ran; before issue 26 such a sweep exited 0."""
    from helpers import make_micro_model, subprocess_env

    from vppo import synth

    model = make_micro_model(tmp_path / "m")
    data = tmp_path / "d"
    synth.write_synth(synth.SynthConfig(tasks=synth.SPOTLIGHT_TASKS, n_train=12, n_val=4, n_test=4), data)
    out, res = str(tmp_path / "o"), str(tmp_path / "r")
    cmd = [sys.executable, "-m", "vppo.sweep", "--quick", "--model", str(model), "--data", str(data),
           "--out", out, "--results", res, "--set", "algo.clip_low=-1"]  # fmt: skip
    r = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 1, (r.stdout + r.stderr)[-3000:]
    assert "2 run(s) failed: [('grpo', 1), ('vppo', 1)]" in r.stderr


def test_paired_differences_by_hand():
    by_arm = {
        "grpo": [{"seed": s, "test": {"accuracy": a}} for s, a in [(1, 0.30), (2, 0.34), (3, 0.40)]],
        "vppo": [{"seed": s, "test": {"accuracy": a}} for s, a in [(1, 0.40), (2, 0.36), (4, 0.9)]],
    }
    p = sweep.paired(by_arm, "vppo", "grpo")
    assert p["seeds"] == [1, 2] and p["diffs"] == pytest.approx([0.10, 0.02]) and p["higher"] == 2
    half = 12.706 * math.sqrt(2 * 0.04**2) / math.sqrt(2)  # t(0.975, 1 df) * sd / sqrt(n)
    assert p["ci95"] == pytest.approx([0.06 - half, 0.06 + half])
    one = sweep.paired({"a": by_arm["grpo"][:1], "b": by_arm["vppo"][:1]}, "a", "b")
    assert one["ci95"] is None and one["std"] == 0.0
    table = sweep.paired_table({"VPPO - GRPO": p})
    assert "| VPPO - GRPO | 2 | +10.0, +2.0 | +6.0 ± 5.7 | [-44.8, +56.8] | 2 of 2 |" in table


def test_testbeds_plan_the_issue_seeds():
    """The spotlight sweep: GRPO, VPPO, TGF only and random 40 % on seeds 1-5, the rest on 1-3; the
    default testbed runs the README's two commands (the tiny default and its GRPO baseline)."""
    from vppo.config import CONFIG_DIR, Config, load_config

    tb = sweep.TESTBEDS["spotlight"]
    assert {a for a, s in tb.seeds.items() if s == (1, 2, 3, 4, 5)} == set(sweep.KEY_ARMS)
    assert {a for a, s in tb.seeds.items() if s == (1, 2, 3)} == set(sweep.ARMS) - set(sweep.KEY_ARMS)
    m = sweep.TESTBEDS["multiread"]
    assert set(m.arms) == set(sweep.KEY_ARMS) and m.results != tb.results and m.spotlight
    d = sweep.TESTBEDS["default"]
    assert load_config(None, d.arms["vppo"]) == Config()
    sw = sweep.Sweep(Path("o"), Path("r"), d.budget, testbed=d)
    cfg = load_config(None, sw.overrides("vppo", 1))
    base = Config()
    for section in ("model", "data", "rollout", "algo"):
        assert getattr(cfg, section) == getattr(base, section), section
    assert (cfg.train.total_steps, cfg.run.val_every, cfg.run.val_samples) == (100, 25, 128)
    # the Qwen3-VL default is configs/tiny_qwen3_vl.yaml on its shipped base
    q = sweep.TESTBEDS["default_qwen3_vl"]
    sw = sweep.Sweep(Path("o"), Path("r"), q.budget, testbed=q)
    cfg = load_config(None, sw.overrides("vppo", 1))
    yaml = load_config(CONFIG_DIR / "tiny_qwen3_vl.yaml")
    for section in ("model", "data", "rollout", "algo"):
        assert getattr(cfg, section) == getattr(yaml, section), section
    assert sw.base_model().endswith("bases/tiny_qwen3_vl")
    # the LoRA default is the embedded default on its shipped base with adapters r=8 and 5x the lr
    lo = sweep.TESTBEDS["default_lora"]
    sw = sweep.Sweep(Path("o"), Path("r"), lo.budget, testbed=lo)
    cfg = load_config(None, sw.overrides("vppo", 1))
    for section in ("data", "rollout", "algo"):
        assert getattr(cfg, section) == getattr(base, section), section
    assert (cfg.model.lora_rank, cfg.train.lr) == (8, 5 * base.train.lr)
    assert sw.base_model().endswith("bases/tiny")


def test_spotlight_yaml_is_the_sweeps_vppo_arm(tmp_path):
    from vppo.config import CONFIG_DIR, load_config

    c = load_config(CONFIG_DIR / "spotlight.yaml")
    o = load_config(None, sweep.Sweep(tmp_path, tmp_path, sweep.Budget()).overrides("vppo", 1))
    o.run.output_dir = c.run.output_dir
    # the one addition: the diagnostic at every validation, which leaves the training as it is
    # (tests/test_spotlight.py); the sweep measures it on each final policy instead
    assert c.run.spotlight_problems == 8 and o.run.spotlight_problems == 0
    o.run.spotlight_problems = c.run.spotlight_problems
    assert c == o
    # the testbed of the diagnostic during training runs exactly that config, over seeds
    d = sweep.TESTBEDS["spotlight_diag"]
    o = load_config(None, sweep.Sweep(tmp_path, tmp_path, d.budget, testbed=d).overrides("vppo", 1))
    o.run.output_dir = c.run.output_dir
    assert c == o and d.results != sweep.TESTBEDS["spotlight"].results


def test_spot_curve_table_by_hand():
    """Per validation step, mean ± std over the seeds that have it; runs without the diagnostic and
    keys a step lacks are left out."""

    def point(step, val, rprec, **kw):
        return {"step": step, "val_accuracy": val, "spot_k3_rprec": rprec, "spot_parsed_frac": 1.0, **kw}

    runs = {
        "vppo": [
            {"seed": 1, "curve": [point(0, 0.3, 0.8, spot_kl_rprec=0.5), point(10, 0.4, 0.6)]},
            {"seed": 2, "curve": [point(0, 0.5, 0.6)]},
        ],
        "grpo": [{"seed": 1, "curve": [{"step": 0, "val_accuracy": 0.3}]}],
    }
    rows = sweep.spot_curve_table(runs).splitlines()
    assert rows[0] == "VPPO, seeds 1, 2 (mean ± std over seeds):" and not any("GRPO" in r for r in rows)
    assert rows[4] == "| 0 | 2 | 40.0 ± 14.1 | 100.0 ± 0.0 |  | 70.0 ± 14.1 / 50.0 /  /  |  |"
    assert rows[5] == "| 10 | 1 | 40.0 | 100.0 |  | 60.0 /  /  /  |  |"
    assert sweep.spot_curve_table({"grpo": runs["grpo"]}) == ""


def test_readme_table_is_the_committed_sweep_table():
    """The superseded sweep's page (docs/sweep_legacy/README.md) holds docs/sweep_legacy/table.md as
    vppo.sweep --aggregate-only writes it from the committed raw results (rebuilt here into a
    temporary folder)."""
    import shutil
    import tempfile

    root = sweep.REPO_ROOT
    committed = (root / "docs" / "sweep_legacy" / "table.md").read_text()
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(root / "docs" / "sweep_legacy" / "raw", f"{tmp}/raw")
        shutil.copy(root / "docs" / "sweep_legacy" / "base.json", f"{tmp}/base.json")
        sweep.aggregate(Path(tmp), plot=False)
        assert (Path(tmp) / "table.md").read_text() == committed
    page = (root / "docs" / "sweep_legacy" / "README.md").read_text()
    section = page[page.index("<!-- sweep_legacy:start -->") : page.index("<!-- sweep_legacy:end -->")]
    assert committed.strip() in section


def test_a_result_stands_for_the_same_run_asked_with_other_logging_keys():
    """Results recorded with the deprecated run.tensorboard=false count for runs asked with
    run.loggers=[] (and another folder); a change of steps, seed or an algorithm key does not."""
    sw = sweep.Sweep(Path("o"), Path("r"), sweep.Budget())
    new = sw.overrides("vppo", 1)
    old = [("run.tensorboard=false" if x == "run.loggers=[]" else x) for x in new]
    old = [("run.output_dir=elsewhere" if x.startswith("run.output_dir=") else x) for x in old]
    assert sweep._same_run(old, new)
    for changed in ("train.total_steps=49", "train.seed=2", "algo.topk_ratio=0.5"):
        key = changed.partition("=")[0]
        assert not sweep._same_run([changed if x.startswith(key + "=") else x for x in new], new), changed


def test_quick_mode_never_writes_into_the_committed_results(monkeypatch, tmp_path):
    """`python -m vppo.sweep --quick` as documented keeps its runs and results under runs/ (before,
    its two-step results went to docs/sweep/raw, beside and over the real sweep's)."""
    seen = {}

    def fake_run(self, plan):
        seen.update(out=self.out, results=self.results, plan=plan, budget=self.budget)
        return {}, []

    monkeypatch.setattr(sweep.Sweep, "run", fake_run)
    monkeypatch.chdir(tmp_path)
    sweep.main(["--quick"])
    assert seen["out"] == Path("runs/sweep_quick_spotlight") and seen["results"] == seen["out"] / "results"
    assert seen["plan"] == {"grpo": (1,), "vppo": (1,)} and seen["budget"] == sweep.QUICK
    sweep.main([])
    assert seen["results"] == Path("docs/sweep") and seen["plan"] == sweep.TESTBEDS["spotlight"].seeds


@pytest.mark.parametrize(
    "results, marker",
    [("default", "default"), ("sweep", "sweep"), ("default_qwen3_vl", "default_qwen3_vl"),
     ("default_lora", "default_lora"), ("sweep_multiread", "sweep_multiread"),
     ("spotlight_run", "spotlight_run")],
)  # fmt: skip
def test_readme_tables_are_rebuilt_from_the_committed_raw_results(results, marker):
    """The README's results tables and their paired differences are what `vppo.sweep --testbed T
    --aggregate-only` writes from docs/<T's results>/raw alone (a single-arm testbed has no pairs)."""
    import shutil
    import tempfile

    root = sweep.REPO_ROOT
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(root / "docs" / results / "raw", f"{tmp}/raw")
        shutil.copy(root / "docs" / results / "base.json", f"{tmp}/base.json")
        sweep.aggregate(Path(tmp), plot=False)
        table, pairs = (Path(tmp) / "table.md").read_text(), (Path(tmp) / "paired.md").read_text()
        spot = Path(tmp) / "spot_curve.md"
        spot = spot.read_text() if spot.exists() else ""
    readme = (root / "README.md").read_text()
    section = readme[readme.index(f"<!-- {marker}:start -->") : readme.index(f"<!-- {marker}:end -->")]
    assert table.strip() in section and spot.strip() in section
    assert pairs.count("\n") <= 2 or pairs.strip() in section
