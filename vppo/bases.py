"""The shipped tiny bases: the exact weights the README's training numbers start from.

    python -m vppo.bases list                      # the shipped bases, their fingerprints and sizes
    python -m vppo.bases verify [NAME ...]         # check every file against its SHA256SUMS
    python -m vppo.bases ship SRC NAME             # copy a built base (python -m vppo.tiny) into bases/NAME

A tiny base is warm-started until its measured accuracy enters a band (vppo.tiny), so a few
floating-point differences between CPUs (vector ISA, BLAS blocking, memory alignment) move where the
warm start stops and what the base knows: the same build code gave the spotlight base test avg@8
31.4, 32.3 and 39.3 % on three machines of one kind. Numbers others must reproduce therefore start
from committed weights, not from a rebuild. `bases/<name>/` holds a Hugging Face folder (config,
safetensors, tokenizer, processor, chat template, generation config, the prompt suffix it was
trained on, warm_start.json with the build's provenance) and `SHA256SUMS`, checked file by file
whenever the base is loaded, so a truncated file or a Git LFS pointer is an error naming the file,
never a silently different model.

`model.base` chooses, when `model.path` is null: `shipped` (the default) loads `bases/<name>/` for the
task family `data.synth` and the model family `model.tiny_family` (SHIPPED); `build` builds or finds
one in the cache with vppo.tiny, as before
(still tested, and what `ship` copies from).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
from pathlib import Path

from vppo.paths import REPO_ROOT

BASES_DIR = REPO_ROOT / "bases"
log = logging.getLogger("vppo.bases")
SUMS = "SHA256SUMS"
SHIP_INFO = "shipped.json"  # what was shipped from where: the synthetic set's hashes, the source folder
# (data.synth, model.tiny_family) -> the shipped base's folder under bases/
SHIPPED = {
    ("default", "qwen2_5_vl"): "tiny",
    ("spotlight", "qwen2_5_vl"): "spotlight",
    ("multiread", "qwen2_5_vl"): "multiread",
    ("default", "qwen3_vl"): "tiny_qwen3_vl",
}


class BaseError(ValueError):
    """A shipped base is missing, incomplete or not the committed bytes."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def weights_fingerprint(model_dir: str | Path) -> str:
    """sha256 (first 16 hex digits) over a model folder's weight files (name and digest of each
    *.safetensors): the base a run started from (vppo.sweep records it with every result)."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    digests = "\n".join(f"{p.name} {sha256_file(p)}" for p in files)
    return hashlib.sha256(digests.encode()).hexdigest()[:16]


def _read_sums(folder: Path) -> dict[str, str]:
    sums = {}
    for n, line in enumerate((folder / SUMS).read_text().splitlines(), 1):
        if not line.strip():
            continue
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64:
            raise BaseError(f"{folder / SUMS}:{n}: not '<sha256>  <file>': {line!r}")
        sums[name] = digest
    return sums


def verify(folder: str | Path) -> dict[str, str]:
    """Check every file of a shipped base against its SHA256SUMS; returns {file: sha256}.

    Raises BaseError naming the first problem: no SHA256SUMS, a listed file missing or different
    (a Git LFS pointer checked out instead of the weights is one), or a file not listed."""
    folder = Path(folder)
    if not (folder / SUMS).is_file():
        raise BaseError(f"{folder} has no {SUMS}: not a shipped base (python -m vppo.bases ship)")
    sums = _read_sums(folder)
    present = {p.name for p in folder.iterdir() if p.is_file() and p.name != SUMS}
    if extra := sorted(present - set(sums)):
        raise BaseError(f"{folder}: files not in {SUMS}: {extra}")
    for name, digest in sums.items():
        p = folder / name
        if not p.is_file():
            raise BaseError(f"{folder}: {name} is listed in {SUMS} but missing")
        got = sha256_file(p)
        if got != digest:
            raise BaseError(
                f"{p}: sha256 {got[:16]}... is not the shipped {digest[:16]}... ({p.stat().st_size} "
                "bytes): the file is damaged or not the committed one (a Git LFS pointer?)"
            )
    return sums


def shipped_base(synth: str = "default", family: str = "qwen2_5_vl", root: str | Path | None = None) -> Path:
    """The verified folder of the shipped base for the task family `synth` (data.synth) and the model
    family `family` (model.tiny_family)."""
    if (synth, family) not in SHIPPED:
        raise BaseError(
            f"no shipped base for data.synth={synth!r} with model.tiny_family={family!r} (shipped: "
            f"{', '.join(f'{s}/{f}' for s, f in SHIPPED)}); use model.base=build to build one with vppo.tiny"
        )
    folder = Path(root or BASES_DIR) / SHIPPED[synth, family]
    if not folder.is_dir():
        raise BaseError(f"the shipped base {folder} is missing (a partial checkout?)")
    verify(folder)
    return folder


def info(folder: str | Path) -> dict:
    """warm_start.json and shipped.json of a base folder, with its weights fingerprint and size."""
    folder = Path(folder)
    out = {"path": str(folder), "weights_sha": weights_fingerprint(folder)}
    out["bytes"] = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    for name in ("warm_start.json", SHIP_INFO):
        if (folder / name).is_file():
            out[name.removesuffix(".json")] = json.loads((folder / name).read_text())
    return out


def ship(
    src: str | Path, name: str, *, synth_hashes: dict | None = None, root: str | Path | None = None
) -> Path:
    """Copy the files of a built base `src` into bases/`name` and write its SHA256SUMS (replaces it)."""
    src, dest = Path(src), Path(root or BASES_DIR) / name
    files = sorted(p for p in src.iterdir() if p.is_file())
    if not any(p.suffix == ".safetensors" for p in files) or not (src / "config.json").is_file():
        raise BaseError(f"{src} is not a built model folder (config.json and *.safetensors)")
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for p in files:
        shutil.copy2(p, tmp / p.name)
    meta = {"name": name, "source": src.name, "weights_sha": weights_fingerprint(src)}  # the cache key
    if synth_hashes is not None:
        meta["synth"] = synth_hashes
    (tmp / SHIP_INFO).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    lines = [f"{sha256_file(p)}  {p.name}" for p in sorted(tmp.iterdir())]
    (tmp / SUMS).write_text("\n".join(lines) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    verify(dest)
    return dest


def synth_hashes(synth_dir: str | Path) -> dict[str, str]:
    """sha256 of each split file of a synthetic set: the data a shipped base was warm-started on
    (the set is generated deterministically; these show whether it came out bitwise the same)."""
    d = Path(synth_dir)
    return {p.name: sha256_file(p) for p in sorted(d.glob("*.parquet"))}


def check_synth(base: str | Path, synth_dir: str | Path) -> list[str]:
    """Splits whose bytes differ from those the shipped base was built on (empty: the same set)."""
    meta_path = Path(base) / SHIP_INFO
    if not meta_path.is_file():
        return []
    want = json.loads(meta_path.read_text()).get("synth") or {}
    got = synth_hashes(synth_dir)
    return sorted(k for k in want if got.get(k) != want[k])


def resolve_defaults(cfg) -> None:
    """Fill a Config's null model.path / data.train / data.val with the tiny base (shipped or built:
    model.base) and the synthetic set of the task family data.synth (the training loop's defaults)."""
    if cfg.model.path is not None and cfg.data.train is not None and cfg.data.val is not None:
        return
    from vppo.distributed import is_main  # heavy (torch): only when a run fills its defaults
    from vppo.spotlight import variant
    from vppo.synth import ensure_synth_data
    from vppo.tiny import ensure_tiny_model

    synth_cfg, tiny_cfg = variant(cfg.data.synth, cfg.model.tiny_family)
    synth = ensure_synth_data(synth_cfg)
    if cfg.model.path is None and cfg.model.base == "shipped":
        cfg.model.path = str(shipped_base(cfg.data.synth, cfg.model.tiny_family))
        if is_main():
            print(
                f"base: {cfg.model.path} (shipped, weights sha {weights_fingerprint(cfg.model.path)})",
                flush=True,
            )
        if stale := check_synth(cfg.model.path, synth):  # the set is generated deterministically
            log.warning("synthetic %s differ from the set %s was built on", stale, cfg.model.path)
    elif cfg.model.path is None:
        cfg.model.path = str(ensure_tiny_model(tiny_cfg))
    if cfg.data.train is None:
        cfg.data.train = str(synth / "train.parquet")
    if cfg.data.val is None:
        cfg.data.val = str(synth / "val.parquet")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="the shipped bases")
    v = sub.add_parser("verify", help="check the shipped bases against their SHA256SUMS")
    v.add_argument("names", nargs="*", help="folders under bases/ (default: all)")
    s = sub.add_parser("ship", help="copy a built base into bases/NAME")
    s.add_argument("src")
    s.add_argument("name")
    s.add_argument("--synth", help="data.synth family whose synthetic set the base was built on (hashed)")
    s.add_argument(
        "--family", default="qwen2_5_vl", help="model.tiny_family of the base (its synthetic set's cell)"
    )
    args = ap.parse_args(argv)
    if args.cmd == "ship":
        hashes = None
        if args.synth:
            from vppo.spotlight import variant  # heavy (torch): only when shipping
            from vppo.synth import ensure_synth_data

            hashes = synth_hashes(ensure_synth_data(variant(args.synth, args.family)[0]))
        print(ship(args.src, args.name, synth_hashes=hashes))
        return 0
    names = getattr(args, "names", None) or sorted(p.name for p in BASES_DIR.iterdir() if p.is_dir())
    status = 0
    for name in names:
        try:
            verify(BASES_DIR / name)
            i = info(BASES_DIR / name)
            ws = i.get("warm_start", {})
            print(
                f"{name}: weights {i['weights_sha']}, {i['bytes'] / 1e6:.1f} MB, "
                f"val {ws.get('val_accuracy', 0):.1%}, test {ws.get('test_accuracy', 0):.1%} (1 sample), ok"
            )
        except (BaseError, FileNotFoundError) as e:
            print(f"{name}: {e}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
