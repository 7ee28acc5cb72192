"""Hardening III (issue 26), items 7-9; items 1-2 (the resume guard) are in test_resume_guard.py.

item 7  late errors come early: rollout.engine=vllm without vllm (training and evaluation),
        rollout.tensor_parallel_size against the world size and the model's heads, an unwritable
        run folder, and the spotlight command line's bad inputs: one message, exit 2, nothing loaded
item 8  algo.tis_cap below 1 is rejected, saying why
item 9  a short vLLM run's stderr has no shutdown traceback and none of the per-step noise
        (marker `vllm`: runs in .venv-vllm)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, make_micro_model, make_synth, subprocess_env, train_overrides

from vppo.config import check_engine, load_config

# Qwen2.5-VL-7B-Instruct's config.json (the head counts only)
HEADS_7B = {
    "text_config": {"num_attention_heads": 28, "num_key_value_heads": 4},
    "vision_config": {"num_heads": 16},
}


@pytest.fixture
def no_vllm(monkeypatch):
    """vllm not importable, in either environment (find_spec answers None for a None module entry)."""
    monkeypatch.setitem(sys.modules, "vllm", None)


# ---------------------------------------------------------------------------------------------
# Item 7.


def test_train_with_vllm_engine_but_no_vllm_is_one_line_exit_2_before_anything(no_vllm, tmp_path, capsys):
    from vppo.train import main

    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(["rollout.engine=vllm", f"run.output_dir={out}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "error: rollout.engine=vllm needs the vllm package" in err, err
    assert "make vllm-env" in err and "Traceback" not in err
    assert not out.exists()  # nothing written, so nothing loaded


def test_eval_with_vllm_engine_but_no_vllm_is_one_line_exit_2(no_vllm, capsys):
    from vppo.eval import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args(["--model", "tiny", "--engine", "vllm"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "error: --engine vllm needs the vllm package" in err, err


def test_tensor_parallel_size_checked_against_world_and_heads(tmp_path, monkeypatch):
    import vppo.config as vc

    monkeypatch.setattr(vc, "vllm_missing", lambda: None)  # the check past the import
    model = tmp_path / "qwen7b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(HEADS_7B))
    ov = ["rollout.engine=vllm", f"model.path={model}", "train.micro_batch=8"]
    with pytest.raises(ValueError, match=r"rollout.tensor_parallel_size must divide the world size \(1\)"):
        load_config(None, [*ov, "rollout.tensor_parallel_size=2"], world_size=1)
    with pytest.raises(ValueError, match=r"must divide the world size \(8\).*got 3"):
        load_config(None, [*ov, "rollout.tensor_parallel_size=3", "train.global_batch=8"], world_size=8)
    cfg = load_config(None, [*ov, "rollout.tensor_parallel_size=8"], world_size=8)
    with pytest.raises(ValueError, match=r"must divide num_attention_heads \(28\) of .*qwen7b, got 8"):
        check_engine(cfg)
    for tp in (1, 2, 4):  # 28 query, 4 key/value and 16 vision heads all split evenly
        check_engine(load_config(None, [*ov, f"rollout.tensor_parallel_size={tp}"], world_size=8))
    # key/value heads fewer than tp are replicated, more must split evenly
    (model / "config.json").write_text(json.dumps({"num_attention_heads": 12, "num_key_value_heads": 3}))
    with pytest.raises(ValueError, match=r"must divide num_key_value_heads \(3\)"):
        check_engine(load_config(None, [*ov, "rollout.tensor_parallel_size=2"], world_size=2))
    (model / "config.json").write_text(json.dumps({"num_attention_heads": 12, "num_key_value_heads": 2}))
    check_engine(
        load_config(None, [*ov, "rollout.tensor_parallel_size=4"], world_size=4)
    )  # 2 kv heads, twice


def test_hf_engine_ignores_vllm_checks(no_vllm):
    check_engine(load_config(None, ["rollout.tensor_parallel_size=3"]))  # tp is a vllm setting


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("hardening3")
    return make_micro_model(d / "model"), make_synth(d / "synth", n_train=16, n_val=4, n_test=4)


def test_unwritable_checkpoints_folder_fails_at_start_up_before_the_model_loads(
    assets, tmp_path, monkeypatch
):
    import vppo.train as vt
    from vppo.checkpoint import RunFolderError

    loads = []
    monkeypatch.setattr(vt, "load_policy", lambda cfg: loads.append(cfg))
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoints").write_text("not a folder")  # root writes anywhere; a file cannot be a folder
    with pytest.raises(RunFolderError, match=r"cannot write to .*run/checkpoints"):
        vt.train(load_config(None, train_overrides(assets, out)))
    with pytest.raises(RunFolderError, match=r"cannot write to /proc/"):  # read-only for root too
        vt.train(load_config(None, train_overrides(assets, Path("/proc/vppo-run"))))
    assert not loads


@pytest.mark.parametrize(
    "args, said",
    [
        (["--model", "/no/such/model"], "--model /no/such/model: not a model folder"),
        (["--problem", "x <image>", "--image", "{tmp}/none.png"], "no such file"),
        (["--problem", "x <image>", "--image", "{tmp}/notes.txt"], "not a readable image"),
        (["--problem", "x <image>", "--image", "{tmp}/cut.png"], "not a readable image"),
        (["--problem", "what is x?", "--image", "{tmp}/ok.png"], "--problem needs one <image>"),
        (["--data", "{tmp}/none.parquet"], "--data {tmp}/none.parquet: no such file"),
    ],
)  # fmt: skip
def test_spotlight_cli_bad_inputs_are_one_message_exit_2(tmp_path, capsys, args, said):
    from PIL import Image

    from vppo import spotlight

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")  # the checks run before the model loads
    (tmp_path / "notes.txt").write_text("not an image")
    Image.new("RGB", (32, 32), "red").save(tmp_path / "ok.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "ok.png").read_bytes()[:40])  # a truncated PNG
    argv = [a.format(tmp=tmp_path) for a in args]
    if "--model" not in argv:
        argv = ["--model", str(model), *argv]
    with pytest.raises(SystemExit) as e:
        spotlight.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and said.format(tmp=tmp_path) in err and "Traceback" not in err, err


# ---------------------------------------------------------------------------------------------
# Item 8.


def test_tis_cap_below_one_is_rejected_saying_why():
    base = ["rollout.engine=vllm"]
    with pytest.raises(ValueError, match=r"algo.tis_cap must be >= 1 .*shrinks every token's term"):
        load_config(None, [*base, "algo.tis_cap=0.5"])
    assert (
        load_config(None, [*base, "algo.tis_cap=1.0"]).algo.tis_cap == 1.0
    )  # on-policy weights only truncated
    assert load_config(None, [*base, "algo.tis_cap=2.0"]).algo.tis_cap == 2.0


# ---------------------------------------------------------------------------------------------
# Item 9 (vLLM environment).


@pytest.mark.vllm
def test_vllm_run_stderr_has_no_shutdown_traceback_nor_per_step_noise(tmp_path):
    try:
        import vllm  # noqa: F401
    except ImportError as e:  # selected without vllm: fail loudly, never skip
        pytest.fail(f"the vllm tests need vllm (run them with `make test-vllm`): {e}")
    model = make_micro_model(tmp_path / "micro", hidden=64)
    cfg_file = model / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["text_config"]["rope_parameters"]["mrope_section"] = [4, 4, 8]  # head_dim 32 (vLLM's CPU attention)
    cfg_file.write_text(json.dumps(cfg))
    synth = make_synth(tmp_path / "synth", n_train=16, n_val=4, n_test=4)
    ov = train_overrides((model, synth), tmp_path / "run", "rollout.engine=vllm", "train.total_steps=2",
                         "run.export_hf=false")  # fmt: skip
    p = subprocess.run([sys.executable, "-m", "vppo.train", *ov], capture_output=True, text=True, cwd=ROOT,
                       env=subprocess_env(OMP_NUM_THREADS="1"), timeout=900)  # fmt: skip
    err, both = p.stderr, p.stdout + p.stderr  # vLLM's logger writes to stdout
    assert p.returncode == 0, err[-3000:]
    assert "Traceback" not in err and "Invalid process group specified" not in both, err[-3000:]
    assert "set_num_threads" not in both, [ln for ln in both.splitlines() if "set_num_threads" in ln][:3]
    assert "Failed to load weights" not in both, [ln for ln in both.splitlines() if "Failed to load" in ln][
        :3
    ]
    assert "resumed from" not in p.stdout and json.loads(p.stdout.strip().splitlines()[-1])["step"] == 2


def test_vllm_noise_filter_drops_only_the_harmless_messages():
    """A weight the push missed must stay loud: only the layers of buffers vLLM derives are quiet."""
    import logging

    from vppo.vllm_engine import _VLLMNoise

    def rec(msg, *args):
        return logging.LogRecord("vllm", logging.WARNING, __file__, 1, msg, args, None)

    f = _VLLMNoise()
    assert not f.filter(rec("%s: Failed to load weights", "MRotaryEmbedding"))
    assert not f.filter(rec(_VLLMNoise.THREADS + ", skip it."))
    assert f.filter(rec("%s: Failed to load weights", "QKVParallelLinear"))
    assert f.filter(rec("%s: Failed to load weights", "RMSNorm"))
