"""bench/case_rollout.py reports a missing engine instead of failing (issue 26, item 11): without
the vLLM environment `make bench` must still write rollout.json with a vllm row that says why."""

from __future__ import annotations

import json


def test_missing_vllm_environment_gives_a_row_that_says_so(tmp_path, monkeypatch, capsys):
    from bench import case_rollout

    hf_row = {"engine": "hf", "seconds": 2.0, "tokens": 1000, "tokens_per_second": 500.0,
              "startup_seconds": 0.1, "torch": "x"}  # fmt: skip
    # the reporting path only: no model is built or run
    monkeypatch.setattr(case_rollout, "measure", lambda engine, model_dir, repeats=2: dict(hf_row))
    monkeypatch.setattr(case_rollout, "VLLM_PY", tmp_path / "no-venv" / "bin" / "python")
    res = case_rollout.main(["--out", str(tmp_path / "out"), "--model", str(tmp_path / "model")])
    hf, vllm = res["rows"]
    assert hf == hf_row and vllm["engine"] == "vllm" and "tokens_per_second" not in vllm
    assert "no-venv" in vllm["unavailable"] and "make vllm-env" in vllm["unavailable"]
    assert "vllm_over_hf" not in res
    assert json.loads((tmp_path / "out" / "rollout.json").read_text()) == res
    err = capsys.readouterr().err
    assert "rollout   hf: 500 tokens/s (1000 tokens in 2.00 s)" in err
    assert "rollout vllm: unavailable:" in err and "make vllm-env" in err
