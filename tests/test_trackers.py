"""run.loggers (vppo.trackers) with the real packages, offline: a short run on the micro model logs to
W&B, SwanLab, MLflow and TensorBoard at once; each tracker's local files are read back with its own
SDK and must hold metrics.jsonl's scalars at the same steps, and the resolved config. Then the run
resumes from its step-2 checkpoint and redoes step 3 (the records a killed process wrote after its
last checkpoint): each tracker continues the same run and holds no step twice."""

from __future__ import annotations

import json
import math
import struct
import sys
import zlib

import pytest
import yaml
from helpers import make_micro_model, make_synth, train_overrides

LOGGERS = "run.loggers=[console,tensorboard,wandb,swanlab,mlflow]"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The run folder after a fresh 3-step run, metrics.jsonl's records then, and again after the
    resume from step 2 (checkpoint 3 removed, as when killed while writing it)."""
    import shutil

    from vppo.config import load_config
    from vppo.metrics import read_metrics
    from vppo.train import train

    d = tmp_path_factory.mktemp("trackers")
    assets = make_micro_model(d / "model"), make_synth(d / "synth", n_train=16, n_val=4, n_test=4)
    out = d / "run"
    mp = pytest.MonkeyPatch()
    for var in ("WANDB_MODE", "SWANLAB_MODE", "MLFLOW_TRACKING_URI", "WANDB_PROJECT", "SWANLAB_PROJ_NAME"):
        mp.delenv(var, raising=False)  # the defaults: everything offline, in the run folder
    mp.setenv("WANDB_SILENT", "true")
    ov = train_overrides(assets, out, LOGGERS, "run.tensorboard=null", "run.save_every=1", "run.keep_last=5",
                         "run.export_hf=false")  # fmt: skip
    train(load_config(None, ov))
    first = read_metrics(out / "metrics.jsonl")
    state = json.loads((out / "trackers.json").read_text())
    shutil.rmtree(out / "checkpoints" / "step-00000003")
    train(load_config(None, ov))
    mp.undo()
    return out, first, state, read_metrics(out / "metrics.jsonl")


def _scalars(records):
    """{step: {key: float}} of metrics.jsonl records: what every tracker must hold."""
    return {r["step"]: {k: float(v) for k, v in r.items() if k != "step" and isinstance(v, (int, float))}
            for r in records}  # fmt: skip


def _same(got: dict, want: dict, rel: float = 0.0):
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    for step in want:
        assert set(got[step]) == set(want[step]), (step, set(got[step]) ^ set(want[step]))
        for k, v in want[step].items():
            g = got[step][k]
            assert (math.isnan(g) and math.isnan(v)) or g == pytest.approx(v, rel=rel, abs=rel), (
                step,
                k,
                g,
                v,
            )


def _config(out) -> dict:
    return yaml.safe_load((out / "config.yaml").read_text())


# --------------------------------------------------------------------------------------------
# Readers of each tracker's local files.


def _leveldb_records(path, ident: bytes):
    """The records of a LevelDB-log file (W&B's .wandb transaction log: a 7-byte header, 32 KiB
    blocks, 7-byte record headers with a CRC-32 seeded by the record type)."""
    buf = path.read_bytes()
    assert buf[:4] == ident, buf[:7]
    pos, part = 7, b""
    while pos + 7 <= len(buf):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        crc, n, kind = struct.unpack("<IHB", buf[pos : pos + 7])
        data = buf[pos + 7 : pos + 7 + n]
        assert zlib.crc32(data, zlib.crc32(bytes([kind]))) == crc, f"{path}: bad record at byte {pos}"
        pos += 7 + n
        part = data if kind in (1, 2) else part + data
        if kind in (1, 4):  # a whole record, or the last piece of one
            yield part


def _wandb(out, run_id, upto=None):
    """{step: {key: value}} and the config of W&B's offline runs of run_id (the first `upto`),
    oldest first; a later run's branch point (resume_from) drops the steps after it, as `wandb sync`
    has the server do."""
    from wandb.proto import wandb_internal_pb2 as pb

    folders = sorted((out / "wandb").glob(f"offline-run-*-{run_id}"))[:upto]
    hist, config = {}, None
    for folder in folders:
        for data in _leveldb_records(folder / f"run-{run_id}.wandb", b":W&B"):
            rec = pb.Record()
            rec.ParseFromString(data)
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                if rec.run.branch_point.run:
                    assert rec.run.branch_point.run == run_id and rec.run.branch_point.metric == "_step"
                    hist = {s: v for s, v in hist.items() if s <= rec.run.branch_point.value}
                config = {u.key: json.loads(u.value_json) for u in rec.run.config.update if u.key != "_wandb"}
            elif kind == "history":
                step = rec.history.step.num
                assert step not in hist, f"W&B step {step} logged twice"
                items = {u.key or "/".join(u.nested_key): u.value_json for u in rec.history.item}
                hist[step] = {k: float(json.loads(v)) for k, v in items.items() if not k.startswith("_")}
    return folders, hist, config


def _swanlab(out, run_id, upto=None):
    """{step: {key: value}} and the config of SwanLab's offline folders of run_id (the first
    `upto`), oldest first; a step a folder holds again is dropped, as SwanLab does (online, and at
    `swanlab sync`)."""
    from swanlab.proto.swanlab.record.v1.record_pb2 import Record
    from swanlab.sdk.internal.core_python.store import DataStoreReader

    folders = sorted((out / "swanlog").glob(f"run-*-{run_id}"))[:upto]
    hist, again = {}, 0
    for folder in folders:
        reader = DataStoreReader()
        reader.open(folder / f"run-{run_id}.swanlab")
        for data in reader:
            rec = Record()
            rec.ParseFromString(data)
            if rec.HasField("scalar"):
                row = hist.setdefault(rec.scalar.step, {})
                again += rec.scalar.key in row
                row.setdefault(rec.scalar.key, rec.scalar.value.number)
        reader.close()
    doc = yaml.safe_load((folders[-1] / "files" / "config.yaml").read_text())
    return folders, hist, {k: v["value"] for k, v in doc.items()}, again


def _mlflow(out, run_id):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    run = client.get_run(run_id)
    hist = {}
    for key in run.data.metrics:
        for m in client.get_metric_history(run_id, key):
            assert key not in hist.get(m.step, {}), f"MLflow {key} step {m.step} logged twice"
            hist.setdefault(m.step, {})[key] = m.value
    config = yaml.safe_load(open(client.download_artifacts(run_id, "config.yaml", str(out / "dl"))))
    runs = client.search_runs([run.info.experiment_id])
    return run, hist, config, runs


def _tensorboard(out):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0})
    ea.Reload()
    hist = {}
    for key in ea.Tags()["scalars"]:
        for e in ea.Scalars(key):
            assert key not in hist.get(e.step, {}), f"TensorBoard {key} step {e.step} logged twice"
            hist.setdefault(e.step, {})[key] = e.value
    return hist


# --------------------------------------------------------------------------------------------


def test_each_tracker_holds_the_metrics_records_and_the_config(runs, monkeypatch):
    """The fresh run, from what each tracker wrote (checked on the first run's files: W&B's and
    SwanLab's first folder, MLflow's history up to step 3 is unchanged by the resume)."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    out, first, state, _ = runs
    want, config = _scalars(first), _config(out)
    assert sorted(want) == [1, 2, 3] and len(want[1]) > 20
    assert set(state) == {"wandb", "swanlab", "mlflow"}

    _, hist, wconf = _wandb(out, state["wandb"]["id"], upto=1)
    _same(hist, want)
    assert wconf == config

    _, hist, sconf, again = _swanlab(out, state["swanlab"]["id"], upto=1)
    _same(hist, want)
    assert sconf == config and again == 0

    run, hist, mconf, _ = _mlflow(out, state["mlflow"]["run_id"])
    _same(hist, want)  # the resume skipped the step it already held: the first run's records
    assert mconf == config
    assert run.data.params["train.lr"] == str(config["train"]["lr"]) and run.info.status == "FINISHED"


def test_a_resumed_run_continues_each_tracker_run_without_repeating_a_step(runs, monkeypatch):
    """Resumed from step 2, the run redid step 3: metrics.jsonl holds the redone record; W&B
    (rewound to step 2) and TensorBoard (purged after step 2) hold exactly metrics.jsonl; MLflow
    (the same run reopened) and SwanLab (the same id) hold step 3 once: the first process's record
    (its training values equal the redone one's, tests/test_train.py; its timings do not)."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    out, first, state, after = runs
    want, config = _scalars(after), _config(out)
    assert sorted(want) == [1, 2, 3] and want[3] != _scalars(first)[3]  # step 3 was redone
    assert json.loads((out / "trackers.json").read_text()) == state  # the same tracker runs

    folders, hist, wconf = _wandb(out, state["wandb"]["id"])
    assert len(folders) == 2
    _same(hist, want)
    assert wconf == config

    folders, hist, _, again = _swanlab(out, state["swanlab"]["id"])
    assert len(folders) == 2 and again == len(want[3])  # the second folder re-logged step 3 only
    _same(hist, _scalars(first))

    run, hist, _, all_runs = _mlflow(out, state["mlflow"]["run_id"])
    assert len(all_runs) == 1 and run.info.status == "FINISHED"
    _same(hist, _scalars(first))

    # TensorBoard keeps float32 values
    _same(_tensorboard(out), {s: {k: v for k, v in r.items() if math.isfinite(v)} for s, r in want.items()},
          rel=1e-6)  # fmt: skip


def test_a_missing_tracker_package_is_named_before_the_model_loads(monkeypatch, tmp_path, capsys):
    import vppo.train as T
    from vppo.config import config_from_args, load_config

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    monkeypatch.setitem(sys.modules, "swanlab", None)
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.loggers=[tensorboard,wandb,swanlab]"])

    def loaded(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(T, "load_policy", loaded)
    monkeypatch.setattr(T.bases, "resolve_defaults", loaded)  # the tiny base and set
    with pytest.raises(ValueError) as e:
        T.setup(cfg)
    msg = str(e.value)
    assert "run.loggers" in msg and "`pip install wandb`" in msg and "`pip install swanlab`" in msg
    assert "tensorboard" not in msg.split(".")[0]  # only the missing ones are named
    with pytest.raises(SystemExit) as ex:
        config_from_args([f"run.output_dir={tmp_path}", "run.loggers=[wandb]"])
    assert ex.value.code == 2 and "pip install wandb" in capsys.readouterr().err


def test_loggers_key_checks_names_and_folds_the_deprecated_tensorboard_flag(tmp_path):
    from vppo.config import Config, load_config, save_resolved
    from vppo.trackers import NAMES

    assert Config().run.loggers == ["tensorboard"] and Config().run.tensorboard is None
    assert set(NAMES) == {"console", "tensorboard", "wandb", "swanlab", "mlflow"}
    with pytest.raises(ValueError, match=r"run.loggers\[1\]: 'wandbb' is not one of"):
        load_config(None, ["run.loggers=[console,wandbb]"])
    with pytest.raises(ValueError, match="run.loggers must not repeat"):
        load_config(None, ["run.loggers=[mlflow,mlflow]"])
    with pytest.warns(FutureWarning, match="run.tensorboard is deprecated"):
        cfg = load_config(None, ["run.loggers=[console,tensorboard]", "run.tensorboard=false"])
    assert cfg.run.loggers == ["console"] and cfg.run.tensorboard is None
    with pytest.warns(FutureWarning):
        assert load_config(None, ["run.loggers=[]", "run.tensorboard=true"]).run.loggers == ["tensorboard"]
    path = save_resolved(cfg, tmp_path)  # the saved config has run.loggers alone: no warning again
    assert load_config(path) == cfg


def test_only_rank_0_logs(tmp_path):
    """Metrics is enabled on rank 0 only (vppo.train.setup); elsewhere no tracker starts."""
    from vppo.metrics import Metrics

    m = Metrics(tmp_path, False, ["console", "tensorboard", "wandb", "swanlab", "mlflow"], {"a": 1})
    m.truncate(1)
    m.log({"step": 2, "reward": 0.5})
    m.close()
    assert m.trackers == [] and not list(tmp_path.iterdir())


def test_console_prints_the_config_then_a_line_per_record(tmp_path, capsys):
    from vppo.metrics import Metrics

    m = Metrics(tmp_path, True, ["console"], {"train": {"lr": 0.1}})
    m.log({"step": 1, "reward": 0.5, "note": "text stays in metrics.jsonl"})
    m.close()
    out = capsys.readouterr().out
    assert "resolved config:\ntrain:\n  lr: 0.1\n" in out and "step 1: reward=0.5\n" in out
