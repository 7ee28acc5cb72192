"""vppo.bases: the shipped tiny bases load, are checked byte for byte, and are what the loop, the
evaluation and the sweep start from (issue 24)."""

import json
import shutil
import subprocess
import sys

import pytest

from vppo import bases, synth
from vppo.config import Config, load_config
from vppo.spotlight import variant


@pytest.mark.parametrize("synth_family, model_family", sorted(bases.SHIPPED))
def test_shipped_bases_verify_and_load(synth_family, model_family):
    from transformers import AutoConfig, AutoProcessor

    folder = bases.shipped_base(synth_family, model_family)
    sums = bases.verify(folder)
    need = {"model.safetensors", "config.json", "tokenizer.json", "warm_start.json", "shipped.json"}
    assert need <= set(sums)
    assert AutoConfig.from_pretrained(folder).model_type == model_family
    assert AutoProcessor.from_pretrained(folder).tokenizer.padding_side in ("left", "right")
    meta = json.loads((folder / bases.SHIP_INFO).read_text())
    assert meta["weights_sha"] == bases.weights_fingerprint(folder)
    # the build's provenance travels with it: machine, threads, packages
    ws = json.loads((folder / "warm_start.json").read_text())
    assert ws["in_band"] and "machine" in ws["packages"] and ws["threads"] >= 1


@pytest.mark.parametrize("synth_family, model_family", sorted(bases.SHIPPED))
def test_synthetic_sets_are_bitwise_the_sets_the_bases_were_built_on(synth_family, model_family, tmp_path):
    """The synthetic set is generated deterministically: rebuilt here, every split hashes to what the
    shipped base recorded (so a run on this machine trains on the same bytes)."""
    synth.write_synth(variant(synth_family, model_family)[0], tmp_path)
    base = bases.shipped_base(synth_family, model_family)
    assert bases.check_synth(base, tmp_path) == []
    (tmp_path / "val.parquet").write_bytes(b"x")
    assert bases.check_synth(base, tmp_path) == ["val.parquet"]


def _copy(tmp_path, name="tiny"):
    dest = tmp_path / name
    shutil.copytree(bases.BASES_DIR / name, dest)
    return dest


def test_a_damaged_file_is_named(tmp_path):
    d = _copy(tmp_path)
    w = d / "model.safetensors"
    b = bytearray(w.read_bytes())
    b[len(b) // 2] ^= 1
    w.write_bytes(bytes(b))
    with pytest.raises(bases.BaseError, match=r"model.safetensors: sha256 .* is not the shipped"):
        bases.verify(d)


def test_an_lfs_pointer_missing_file_or_stray_file_is_named(tmp_path):
    d = _copy(tmp_path)
    (d / "model.safetensors").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 1\n"
    )
    with pytest.raises(bases.BaseError, match="Git LFS pointer"):
        bases.verify(d)
    d = _copy(tmp_path / "b")
    (d / "tokenizer.json").unlink()
    with pytest.raises(bases.BaseError, match="tokenizer.json is listed in SHA256SUMS but missing"):
        bases.verify(d)
    d = _copy(tmp_path / "c")
    (d / "extra.bin").write_bytes(b"1")
    with pytest.raises(bases.BaseError, match=r"files not in SHA256SUMS: \['extra.bin'\]"):
        bases.verify(d)
    (d / bases.SUMS).unlink()
    with pytest.raises(bases.BaseError, match="has no SHA256SUMS"):
        bases.verify(d)


def test_shipped_base_of_an_unknown_family_and_a_missing_folder(tmp_path):
    with pytest.raises(bases.BaseError, match="no shipped base for data.synth='nope'"):
        bases.shipped_base("nope")
    with pytest.raises(bases.BaseError, match="model.tiny_family='qwen3_vl'"):
        bases.shipped_base("spotlight", "qwen3_vl")
    with pytest.raises(bases.BaseError, match="is missing"):
        bases.shipped_base("default", root=tmp_path)


def test_ship_round_trip(tmp_path):
    src = _copy(tmp_path / "src")
    for extra in (bases.SUMS, bases.SHIP_INFO):
        (src / extra).unlink()
    out = bases.ship(src, "again", synth_hashes={"train.parquet": "ab"}, root=tmp_path / "bases")
    assert bases.verify(out) and bases.weights_fingerprint(out) == bases.weights_fingerprint(
        bases.BASES_DIR / "tiny"
    )
    assert json.loads((out / bases.SHIP_INFO).read_text())["synth"] == {"train.parquet": "ab"}
    with pytest.raises(bases.BaseError, match="not a built model folder"):
        bases.ship(tmp_path, "x", root=tmp_path / "bases")


def test_the_loop_starts_from_the_shipped_base(monkeypatch, capsys):
    """model.path null + model.base=shipped (the default) -> bases/<family>, its fingerprint printed;
    model.base=build -> vppo.tiny's cached build, as before."""
    assert Config().model.base == "shipped" and load_config(None, []).model.base == "shipped"
    cfg = load_config(None, ["data.synth=spotlight"])
    bases.resolve_defaults(cfg)
    assert cfg.model.path == str(bases.BASES_DIR / "spotlight")
    cfg = load_config(None, ["model.tiny_family=qwen3_vl"])
    bases.resolve_defaults(cfg)
    assert cfg.model.path == str(bases.BASES_DIR / "tiny_qwen3_vl")
    assert bases.weights_fingerprint(cfg.model.path) in capsys.readouterr().out
    capsys.readouterr()
    built = []
    monkeypatch.setattr("vppo.tiny.ensure_tiny_model", lambda c: built.append(c) or "/built")
    cfg = load_config(None, ["model.base=build"])
    bases.resolve_defaults(cfg)
    assert cfg.model.path == "/built" and built == [variant("default")[1]]


def test_eval_model_tiny_is_the_shipped_base():
    from vppo import eval as ev

    assert ev._resolve_model("tiny") == str(bases.BASES_DIR / "tiny")


def test_cli_list_and_verify():
    r = subprocess.run([sys.executable, "-m", "vppo.bases", "verify"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for name in bases.SHIPPED.values():
        assert f"{name}: weights {bases.weights_fingerprint(bases.BASES_DIR / name)}" in r.stdout
