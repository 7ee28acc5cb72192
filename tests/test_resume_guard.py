"""The resume guard (issue 26, items 1 and 2): a start never mixes two runs in one run folder.

A resume compares the config its checkpoint was trained with against the new one and refuses a
changed run-defining key (naming each, old -> new) before anything loads, unless
run.allow_config_change=true, which logs the change into metrics.jsonl at the resume step and keeps
the old config beside the new one; keys that cannot change results change freely; run.resume=never
into a folder that holds a run is refused unless run.overwrite=true, which starts clean. The guard's
rules run on a hand-made run folder (no model); one test drives the real loop and its command line.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT, make_micro_model, make_synth, subprocess_env, train_overrides

from vppo.checkpoint import CheckpointManager, RunFolderError, RunStart, open_run, plan_start, run_outputs
from vppo.config import RESUME_FREE, RUN_DEFINING, fields_table, load_config, save_resolved, to_yaml
from vppo.metrics import Metrics, read_metrics


def test_every_config_key_is_classified_once():
    """A new key must be put in RUN_DEFINING or RESUME_FREE (vppo/config.py) on purpose. (The sets may
    name keys a branch merged beside this one adds: a name that is no key is never compared.)"""
    keys = set(fields_table())
    assert not RUN_DEFINING & RESUME_FREE, sorted(RUN_DEFINING & RESUME_FREE)
    assert keys <= RUN_DEFINING | RESUME_FREE, f"unclassified: {sorted(keys - RUN_DEFINING - RESUME_FREE)}"


# ---------------------------------------------------------------------------------------------
# The rules, on a hand-made folder: a finished 3-step run (checkpoint step 3, records 1-3, export/).


def _cfg(out: Path, *extra: str):
    base = [f"run.output_dir={out}", "model.path=/models/a", "data.train=/data/t.parquet",
            "data.val=/data/v.parquet", "train.total_steps=3"]  # fmt: skip
    return load_config(None, [*base, *extra])


def _finished_run(out: Path, *extra: str) -> Path:
    cfg = _cfg(out, *extra)
    save_resolved(cfg, out)
    CheckpointManager(out, config=to_yaml(cfg)).save(3, model=torch.nn.Linear(2, 2), state={"data_pos": 12})
    (out / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "reward": 0.5}) + "\n" for s in (1, 2, 3))
    )
    (out / "export").mkdir()
    (out / "export" / "model.safetensors").write_bytes(b"weights")
    return out


def _snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "change, shown",
    [
        (["train.lr=1e-3"], ["train.lr: 0.0002 -> 0.001"]),
        (["model.path=/models/b"], ["model.path: '/models/a' -> '/models/b'"]),
        (["rollout.n=4"], ["rollout.n: 8 -> 4"]),
        (["algo.name=grpo", "algo.shaping=none", "algo.topk_ratio=1.0"],
         ["algo.name: 'vppo' -> 'grpo'", "algo.topk_ratio: 0.4 -> 1.0",
          "algo.shaping: 'released' -> 'none'"]),
        (["train.seed=7"], ["train.seed: 1 -> 7"]),
        (["algo.perturbation=blur"], ["algo.perturbation: 'patch_blacken' -> 'blur'"]),
        (["train.global_batch=4"], ["train.global_batch: 8 -> 4"]),
    ],
)  # fmt: skip
def test_a_changed_run_defining_key_is_refused_naming_it_and_the_folder_is_untouched(tmp_path, change, shown):
    out = _finished_run(tmp_path / "run")
    before = _snapshot(out)
    with pytest.raises(RunFolderError) as e:
        open_run(_cfg(out, "train.total_steps=5", *change), rank=0)
    msg = str(e.value)
    for line in shown:
        assert line in msg, msg
    listed = [ln.strip() for ln in msg.splitlines() if ln.startswith("  ")]
    assert listed == shown, msg  # only the changed keys, not the free total_steps
    assert "run.allow_config_change=true" in msg and "a new run.output_dir" in msg
    assert _snapshot(out) == before  # nothing changed, config.yaml included


def test_free_keys_and_a_longer_run_resume(tmp_path):
    out = _finished_run(tmp_path / "run")
    free = ["train.total_steps=5", "run.val_every=5", "run.plot_every=3", "run.watchdog_seconds=0",
            "run.keep_last=4", "run.save_every=1", "run.tensorboard=false", "run.nvtx=true",
            "run.export_hf=false", "model.gradient_checkpointing=true"]  # fmt: skip
    start = plan_start(_cfg(out, *free))
    assert start.resume == out / "checkpoints" / "step-00000003" and start.step == 3 and start.changes == {}
    with pytest.raises(RunFolderError, match=r"train.total_steps=2 is below the step .* \(.*step 3\)"):
        plan_start(_cfg(out, "train.total_steps=2"))


def test_a_legacy_value_in_the_saved_config_is_the_same_run(tmp_path):
    """A checkpoint written when train.balance_batch was a boolean holds `false`; the config loads it as
    'none' today: resuming it with the default is the same run (the spotlight sweep's TGF-only seed 1,
    checkpointed at step 5 before the change, was refused as changed), a real change is still named."""
    out = tmp_path / "run"
    cfg = _cfg(out)
    save_resolved(cfg, out)
    legacy = to_yaml(cfg)
    assert "balance_batch: none" in legacy
    legacy = legacy.replace("balance_batch: none", "balance_batch: false")
    (out / "config.yaml").write_text(legacy)
    CheckpointManager(out, config=legacy).save(3, model=torch.nn.Linear(2, 2), state={"data_pos": 12})
    start = plan_start(_cfg(out, "train.total_steps=5"))
    assert start.step == 3 and start.changes == {}
    with pytest.raises(RunFolderError, match=r"train.balance_batch: 'none' -> 'rollout'"):
        plan_start(_cfg(out, "train.total_steps=5", "train.balance_batch=rollout"))


def test_allowed_change_is_logged_at_the_resume_step_and_the_old_config_kept(tmp_path):
    out = _finished_run(tmp_path / "run")
    old_config = (out / "config.yaml").read_text()
    cfg = _cfg(out, "train.total_steps=5", "train.lr=1e-3", "run.allow_config_change=true")
    start = open_run(cfg, rank=0)
    assert (
        start.changes == {"train.lr": (2e-4, 1e-3)} and start.previous_config == "config.step-00000003.yaml"
    )
    assert (out / "config.step-00000003.yaml").read_text() == old_config
    assert load_config(out / "config.yaml").train.lr == 1e-3
    m = Metrics(out, True, False)
    for _ in range(2):  # a second try at the same resume leaves one record, not two
        m.truncate(3)
        start.log_to(m)
    recs = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3, 3]
    assert recs[-1] == {"step": 3, "config_change": {"train.lr": [2e-4, 1e-3]},
                        "previous_config": "config.step-00000003.yaml"}  # fmt: skip
    # a later resume compares against the checkpoint's own config: an unchanged resume logs nothing new
    RunStart(out / "checkpoints" / "step-00000003", 3).log_to(m)
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]


def test_resume_never_into_a_run_is_refused_unless_overwrite_which_starts_clean(tmp_path, capsys):
    out = _finished_run(tmp_path / "run")
    (out / "notes.txt").write_text("mine")
    before = _snapshot(out)
    with pytest.raises(RunFolderError) as e:
        open_run(_cfg(out, "run.resume=never"), rank=0)
    msg = str(e.value)
    assert "checkpoints/ (step-00000003)" in msg and "metrics.jsonl (steps 1-3)" in msg and "export/" in msg
    assert "run.overwrite=true" in msg and _snapshot(out) == before
    with pytest.raises(ValueError, match="run.overwrite .*run.resume=never"):
        _cfg(out, "run.overwrite=true")  # overwrite without never: a config error
    start = open_run(_cfg(out, "run.resume=never", "run.overwrite=true", "train.seed=9"), rank=0)
    said = capsys.readouterr().out
    assert start.resume is None, start
    assert "run.overwrite=true: deleted checkpoints, metrics.jsonl, export in" in said, said
    assert run_outputs(out) == [] and (out / "notes.txt").read_text() == "mine"  # only the run's own files
    assert load_config(out / "config.yaml").train.seed == 9


def test_auto_without_a_checkpoint(tmp_path, capsys):
    """Records of a start that never reached its first checkpoint: the same config redoes them (dropped,
    said), another config is refused."""
    out = tmp_path / "run"
    save_resolved(_cfg(out), out)
    (out / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward": 0.1}) + "\n")
    before = _snapshot(out)
    with pytest.raises(RunFolderError, match=r"no checkpoint to resume and a different config: train.lr"):
        open_run(_cfg(out, "train.lr=1e-3"), rank=0)
    assert _snapshot(out) == before
    assert open_run(_cfg(out), rank=0).resume is None
    assert "deleted metrics.jsonl" in capsys.readouterr().out and not (out / "metrics.jsonl").exists()


def test_leftovers_of_a_start_that_failed_early_do_not_block_the_next(tmp_path, capsys):
    """TensorBoard logs alone (a start that died before its first step) are not a run: cleared, said."""
    out = tmp_path / "run"
    save_resolved(_cfg(out, "train.lr=1e-3"), out)
    (out / "tb").mkdir()
    (out / "tb" / "events.out").write_bytes(b"x")
    assert open_run(_cfg(out), rank=0).resume is None  # another config, auto: nothing to mix
    assert not (out / "tb").exists() and "deleted tb" in capsys.readouterr().out


def test_unwritable_run_folder_fails_at_start_up(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoints").write_text("a file where the checkpoints folder goes")
    with pytest.raises(RunFolderError, match=r"cannot write to .*checkpoints"):
        open_run(_cfg(out), rank=0)
    with pytest.raises(RunFolderError, match=r"cannot write to /proc"):  # read-only even for root
        open_run(_cfg(Path("/proc")), rank=0)


# ---------------------------------------------------------------------------------------------
# The real loop and its command line.


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume_guard")
    return make_micro_model(d / "model"), make_synth(d / "synth", n_train=16, n_val=4, n_test=4)


def test_loop_refuses_a_changed_resume_before_loading_then_allows_and_overwrites(
    assets, tmp_path, monkeypatch
):
    import vppo.train as vt

    out = tmp_path / "run"
    ov = lambda *x: train_overrides(assets, out, "train.total_steps=2", "run.save_every=1",  # noqa: E731
                                    "run.export_hf=false", *x)  # fmt: skip
    vt.train(load_config(None, ov()))
    before = _snapshot(out)
    # the command line: one message naming the key, exit 2, no traceback, nothing loaded or written
    p = subprocess.run([sys.executable, "-m", "vppo.train", *ov("train.total_steps=3", "train.lr=5e-4")],
                       capture_output=True, text=True, env=subprocess_env(OMP_NUM_THREADS="1"), cwd=ROOT,
                       timeout=600)  # fmt: skip
    assert p.returncode == 2, p.stderr[-2000:]
    assert "train.lr: 0.001 -> 0.0005" in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert "resumed from" not in p.stdout and _snapshot(out) == before
    # in-process: refused before the model is loaded
    loads = []
    real = vt.load_policy
    monkeypatch.setattr(vt, "load_policy", lambda cfg: loads.append(1) or real(cfg))
    with pytest.raises(RunFolderError, match=r"rollout.n: 4 -> 2"):
        vt.train(load_config(None, ov("train.total_steps=3", "rollout.n=2")))
    assert not loads and _snapshot(out) == before
    # allowed: the new lr is the one the optimizer uses (not the checkpoint's), the change is on record
    last = vt.train(
        load_config(None, ov("train.total_steps=3", "train.lr=5e-4", "run.allow_config_change=true"))
    )
    assert last["step"] == 3 and last["lr"] == pytest.approx(5e-4)
    recs = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 2, 3]
    assert recs[2]["config_change"] == {"train.lr": [1e-3, 5e-4]}
    assert (out / "config.step-00000002.yaml").read_bytes() == before["config.yaml"]
    assert load_config(out / "checkpoints" / "step-00000003" / "config.yaml").train.lr == 5e-4
    # never into it: refused; with overwrite: a clean run whose records are its own
    with pytest.raises(RunFolderError, match="run.overwrite=true"):
        vt.train(load_config(None, ov("run.resume=never")))
    vt.train(load_config(None, ov("run.resume=never", "run.overwrite=true")))
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-00000001", "step-00000002"]
    assert not list(out.glob("config.step-*.yaml"))


def _checkout(d: Path) -> list[str]:
    """A copy of the shipped tiny base and of a two-file data cache under d: their overrides."""
    from vppo.bases import BASES_DIR

    shutil.copytree(BASES_DIR / "tiny", d / "bases" / "tiny")
    (d / "cache").mkdir()
    for split in ("train", "val"):
        (d / "cache" / f"{split}.parquet").write_bytes(f"{split} rows".encode())
    return [f"model.path={d}/bases/tiny", f"data.train={d}/cache/train.parquet",
            f"data.val={d}/cache/val.parquet"]  # fmt: skip


def test_a_base_and_data_moved_to_another_checkout_are_the_same_run(tmp_path):
    """A run started in one checkout resumes in another: model.path is the other checkout's copy of
    the shipped base and data.train / data.val the other cache's copies of the synthetic set (before,
    refused as three changed keys although the bytes were the same). Copies that differ, and an old
    path that is gone, are still refused."""
    a, b = _checkout(tmp_path / "a"), _checkout(tmp_path / "b")
    out = _finished_run(tmp_path / "run", *a)
    start = plan_start(_cfg(out, "train.total_steps=5", *b))
    assert start.resume == out / "checkpoints" / "step-00000003" and start.changes == {}

    (tmp_path / "b" / "cache" / "val.parquet").write_bytes(b"val rowz")  # same size, other bytes
    with pytest.raises(RunFolderError, match="data.val: ") as e:
        plan_start(_cfg(out, "train.total_steps=5", *b))
    assert "data.train" not in str(e.value) and "model.path" not in str(e.value)

    sums = tmp_path / "b" / "bases" / "tiny" / "SHA256SUMS"
    sums.write_text(sums.read_text().replace("config.json", "config.json ", 1))
    shutil.rmtree(tmp_path / "a" / "cache")
    with pytest.raises(RunFolderError) as e:
        plan_start(_cfg(out, "train.total_steps=5", *b))
    listed = [ln.strip().partition(":")[0] for ln in str(e.value).splitlines() if ln.startswith("  ")]
    assert listed == ["model.path", "data.train", "data.val"], str(e.value)


def test_every_start_records_its_base_and_a_moved_base_is_recognised_after_the_old_folder_is_gone(tmp_path):
    """A start appends a line to provenance.jsonl (step, base path and sha256, packages and commit).
    When the checkout the run started in is gone (moved or deleted), its base is recognised by that
    recorded sha256 (before, refused as a changed model.path); a base with other bytes is refused."""
    a, b = _checkout(tmp_path / "a"), _checkout(tmp_path / "b")
    data = [x for x in a if x.startswith("data.")]  # data stay where they are: only the base moves
    out = tmp_path / "run"
    cfg = _cfg(out, a[0], *data)
    assert open_run(cfg, rank=0) == RunStart()
    CheckpointManager(out, config=to_yaml(cfg)).save(3, model=torch.nn.Linear(2, 2), state={"data_pos": 12})
    first = [json.loads(x) for x in (out / "provenance.jsonl").read_text().splitlines()]
    assert len(first) == 1 and first[0]["step"] == 0 and first[0]["base"]["path"] == cfg.model.path
    assert len(first[0]["base"]["sha256"]) == 64 and "git_commit" in first[0]["packages"]

    shutil.rmtree(tmp_path / "a" / "bases")
    start = open_run(_cfg(out, "train.total_steps=5", b[0], *data), rank=0)
    assert start.resume == out / "checkpoints" / "step-00000003" and start.changes == {}
    lines = [json.loads(x) for x in (out / "provenance.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [0, 3] and lines[1]["base"]["sha256"] == first[0]["base"]["sha256"]

    (tmp_path / "b" / "bases" / "tiny" / "config.json").write_text("{}")  # another base at the new path
    with pytest.raises(RunFolderError) as e:
        plan_start(_cfg(out, "train.total_steps=5", b[0], *data))
    assert [ln.strip().partition(":")[0] for ln in str(e.value).splitlines() if ln.startswith("  ")] == [
        "model.path"
    ]
