"""Config errors that used to come late or ugly (issue 16, item 6): a YAML syntax error names
file:line:column; a missing data.train / data.val or a model.path that does not exist is one line
naming the key and the value, with exit status 2, before anything heavy loads."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import subprocess_env

from vppo.config import CONFIG_DIR, Config, check_sources, config_from_args, load_config

HF_VARS = ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE", "XDG_CACHE_HOME")
BAD_YAML = "model:\n  path: null\n dtype: float32\n"  # line 3 is indented one space too little


@pytest.fixture
def empty_hf(tmp_path, monkeypatch):
    """An empty Hugging Face home: nothing is cached."""
    home = tmp_path / "hf_home"
    home.mkdir()
    for v in HF_VARS:
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    return home


def _parquet(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    # the vppo schema's columns (check_sources reads the schema: data.format)
    pq.write_table(pa.Table.from_pylist([{"problem": "q", "answer": "1", "images": []}]), path)
    return path


def _cfg(**kw) -> Config:
    c = Config()
    for key, v in kw.items():
        sec, name = key.split("__")
        setattr(getattr(c, sec), name, v)
    return c


def _fails(cfg: Config, key: str, value: str, what: str) -> str:
    with pytest.raises(ValueError) as e:
        check_sources(cfg)
    msg = str(e.value)
    assert msg.startswith(key + " ") and repr(value) in msg and what in msg and "\n" not in msg, msg
    return msg


# ---------------------------------------------------------------------------------------------
# The YAML syntax error.


def test_yaml_syntax_error_names_file_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_YAML)
    with pytest.raises(ValueError) as e:
        load_config(bad)
    msg = str(e.value)
    assert msg.startswith(f"{bad}:3:2: invalid YAML: expected <block end>"), msg
    assert "\n" not in msg and "<unicode string>" not in msg
    assert e.value.__cause__ is None and e.value.__suppress_context__  # no chained PyYAML traceback
    for text, where in (('model:\n  path: "unclosed\n', ":3:1:"), ("train:\n\tlr: 1\n", ":2:1:")):
        bad.write_text(text)
        with pytest.raises(ValueError, match=f"^{bad}{where} invalid YAML: "):
            load_config(bad)
    bad.write_bytes(b"model:\n  path: \xff\n")
    with pytest.raises(ValueError, match=f"^{bad}: not UTF-8 text"):
        load_config(bad)


# ---------------------------------------------------------------------------------------------
# check_sources: data.train / data.val / data.image_dir / model.path.


def test_defaults_and_the_shipped_configs_load_without_their_data(empty_hf, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    check_sources(Config())  # None everywhere: the tiny base and the synthetic set, filled in later
    # sources are not part of load_config / validate: a config stays loadable without its data
    c = load_config(CONFIG_DIR / "vppo_7b.yaml", ["data.val=/x/y.parquet"])
    assert c.data.train == "chamber111/VPPO_ViRL39K_train"
    _fails(c, "data.train", "chamber111/VPPO_ViRL39K_train", "nor a dataset in the local Hugging Face cache")


def test_local_data_sources_must_exist_and_be_loadable(empty_hf, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    good = _parquet(tmp_path / "d" / "train.parquet")
    check_sources(_cfg(data__train=str(good), data__val="d/train.parquet"))  # relative to the cwd
    check_sources(_cfg(data__train="d", data__val="./d"))  # a folder of parquet files
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "state.json").write_text("{}")
    check_sources(_cfg(data__train="saved"))  # a datasets.save_to_disk folder
    for key in ("data.train", "data.val"):
        attr = key.replace(".", "__")
        for missing in ("./nope.parquet", "nope.parquet", "/abs/nope", "a/b/c", "x.jsonl", "~/no-such-dir-x"):
            _fails(_cfg(**{attr: missing}), key, missing, "does not exist")
    (tmp_path / "empty").mkdir()
    _fails(_cfg(data__val="empty"), "data.val", "empty", "no parquet files")
    check_sources(_cfg(data__val="empty", run__val_every=0))  # never validated: never loaded
    (tmp_path / "rows.json").write_text("[]")
    _fails(_cfg(data__train="rows.json"), "data.train", "rows.json", "must be a .parquet file")
    _fails(_cfg(data__image_dir="imgs"), "data.image_dir", "imgs", "must be an existing folder")
    (tmp_path / "imgs").mkdir()
    check_sources(_cfg(data__image_dir="imgs"))


def test_hub_dataset_names_must_be_in_the_local_cache(empty_hf, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _fails(_cfg(data__train="org/MyData"), "data.train", "org/MyData", "local Hugging Face cache")
    _fails(_cfg(data__train="bad name"), "data.train", "bad name", "nor a dataset")
    (empty_hf / "datasets" / "org___my_data").mkdir(parents=True)  # datasets' cache, snake-cased
    check_sources(_cfg(data__train="org/MyData", data__val="org/MyData@validation"))
    _fails(_cfg(data__train="other/MyData"), "data.train", "other/MyData", "local Hugging Face cache")
    (empty_hf / "hub" / "datasets--other--MyData").mkdir(parents=True)  # the hub's file cache
    check_sources(_cfg(data__train="other/MyData"))


def test_model_path_must_be_a_model_folder_or_a_cached_hub_id(empty_hf, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for missing in ("./nope", "/abs/nope", "a/b/c", "bad id!"):
        _fails(_cfg(model__path=missing), "model.path", missing, "does not exist")
    (tmp_path / "m").mkdir()
    _fails(_cfg(model__path="m"), "model.path", "m", "without config.json")
    (tmp_path / "m" / "config.json").write_text("{}")
    check_sources(_cfg(model__path="m"))
    (tmp_path / "f").write_text("x")
    _fails(_cfg(model__path="f"), "model.path", "f", "not a file")
    _fails(_cfg(model__path="Org/Model-7B"), "model.path", "Org/Model-7B", "local Hugging Face cache")
    repo = empty_hf / "hub" / "models--Org--Model-7B"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "config.json").write_text("{}")
    check_sources(_cfg(model__path="Org/Model-7B"))


def test_config_from_args_checks_sources_after_print_config(empty_hf, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        config_from_args(["--print-config", "data.train=./nope.parquet"])
    assert e.value.code == 0  # printing a config needs no data
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        config_from_args(["data.train=./nope.parquet"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error: data.train does not exist" in err and "'./nope.parquet'" in err


# ---------------------------------------------------------------------------------------------
# python -m vppo.train: exit status 2, one line, no traceback, before any model loads.


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--config", "{bad}"], "{bad}:3:2: invalid YAML"),
        (["data.train={tmp}/missing/train.parquet"], "data.train does not exist"),
        (["data.val=./nope_val.parquet"], "data.val does not exist"),
        (["model.path=./nope"], "model.path does not exist"),
        (["--config", "configs/vppo_7b.yaml"], "data.train is neither a file or folder"),
    ],
    ids=["yaml", "train", "val", "model", "7b-without-data"],
)
def test_bad_sources_and_yaml_fail_fast_with_status_2(tmp_path, args, needle):
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_YAML)
    args = [a.format(bad=bad, tmp=tmp_path) for a in args]
    needle = needle.format(bad=bad)
    (tmp_path / "hf").mkdir()
    env = {k: v for k, v in subprocess_env().items() if k not in HF_VARS}
    env["HF_HOME"] = str(tmp_path / "hf")  # an empty cache: no configs/vppo_7b.yaml model or data
    t0 = time.time()
    p = subprocess.run(
        [sys.executable, "-m", "vppo.train", f"run.output_dir={tmp_path / 'run'}", *args],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert p.returncode == 2, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("python -m vppo.train: error: ") and needle in last, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and "<unicode string>" not in p.stderr
    assert "Loading weights" not in p.stderr and time.time() - t0 < 60
    assert not (tmp_path / "run").exists()  # failed before the run folder was written
