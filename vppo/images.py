"""Image sources of the training and evaluation data, and their decoding to 8-bit RGB.

A stored image is encoded bytes, a {"bytes", "path"} struct as `datasets` writes it, a decoded PIL
image, a path (relative paths are taken from the source's folder, then from a `.zip` archive there:
ViRL39K's `images.zip`, never extracted) or a `ZipMember`. `image_source` normalises one,
`check_image` opens it (header, or a full decode), `open_image` decodes it through `to_rgb`, which
keeps what a viewer would show (16-bit and float greyscale scaled, transparency composited on white).
vppo.data builds problems from rows with these.
"""

from __future__ import annotations

import io
import os
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class ZipMember:
    """An image stored in a zip archive, read on use (the archive is never extracted)."""

    archive: str  # absolute path of the .zip
    name: str  # the member's name inside it

    def read(self) -> bytes:
        zf, lock = _open_zip(self.archive)
        with lock:  # one ZipFile shares one file position
            return zf.read(self.name)


ImageSource = Image.Image | bytes | str | ZipMember


def open_image(
    src: ImageSource | dict | os.PathLike, image_dir: str | os.PathLike | None = None
) -> Image.Image:
    """Decode one image source to an 8-bit RGB PIL image (to_rgb).

    `src`: a PIL image, encoded bytes, a path (relative paths are taken from `image_dir`, then from a
    zip archive there), a ZipMember, or a {"bytes", "path"} dict as written by `datasets` (bytes win
    when both are set).
    """
    if isinstance(src, Image.Image):
        img = src
    else:
        src = image_source(src, image_dir)
        img = Image.open(readable(src))
        img.load()
    return to_rgb(img)


# Pillow's 16-bit greyscale modes: `.convert("RGB")` clips them at 255 (an all-white image).
_MODES_16 = ("I;16", "I;16B", "I;16L", "I;16N")


def to_rgb(img: Image.Image) -> Image.Image:
    """`img` as 8-bit RGB, keeping what a viewer would show.

    - 16-bit greyscale (I;16*): scaled by 255 / 65535. 32-bit integer (I, also how older Pillow
      opens a 16-bit PNG): kept when its values fit 0..255, scaled from 0..65535 when they fit that,
      else stretched from its min..max. Float (F): 0..1 scaled to 0..255, 0..255 kept, else stretched.
    - transparency (RGBA, LA, PA, P or L/RGB with a transparent colour): composited on white, as a
      viewer shows it; dropping the alpha, as `.convert("RGB")` does, turns the common diagram drawn
      in black on a transparent ground into an all-black image. The released trainer converts
      without compositing (a departure; no effect on opaque images).
    - CMYK and the rest: Pillow's own conversion.
    """
    if img.mode == "RGB":
        return img
    if img.mode in _MODES_16 or img.mode in ("I", "F"):
        a = np.nan_to_num(np.asarray(img, dtype=np.float64))  # a float image may hold NaN / inf
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if img.mode in _MODES_16 or (img.mode == "I" and lo >= 0 and 255 < hi <= 65535):
            a = a * (255.0 / 65535.0)
        elif img.mode == "F" and lo >= 0 and hi <= 1:
            a = a * 255.0
        elif not (lo >= 0 and hi <= 255):  # another range: stretch what is there
            a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


_ZIPS: dict[tuple[int, str], tuple[zipfile.ZipFile, threading.Lock, dict[str, str]]] = {}
_ZIPS_LOCK = threading.Lock()


def _zip_entry(archive: str) -> tuple[zipfile.ZipFile, threading.Lock, dict[str, str]]:
    """The open archive (one per process: a forked child must not share the parent's file
    position), its lock, and its member index: each file member under its own name and under its
    name less the first folder (`ViRL39K/images/x.jpg` is found as `images/x.jpg`; a shortened
    name two members share is left out)."""
    key = (os.getpid(), archive)
    with _ZIPS_LOCK:
        if key not in _ZIPS:
            zf = zipfile.ZipFile(archive)
            names = [n for n in zf.namelist() if not n.endswith("/")]
            index = {n: n for n in names}
            short: dict[str, list[str]] = {}
            for n in names:
                if "/" in n:
                    short.setdefault(n.split("/", 1)[1], []).append(n)
            for k, v in short.items():
                if k not in index and len(v) == 1:
                    index[k] = v[0]
            _ZIPS[key] = (zf, threading.Lock(), index)
        return _ZIPS[key]


def _open_zip(archive: str) -> tuple[zipfile.ZipFile, threading.Lock]:
    zf, lock, _ = _zip_entry(archive)
    return zf, lock


def zip_member(rel: str, folder: Path) -> tuple[ZipMember | None, list[Path]]:
    """The member of a `.zip` archive in `folder` stored under the relative path `rel`, and the
    archives searched."""
    archives = sorted(folder.glob("*.zip")) if folder.is_dir() else []
    name = Path(rel).as_posix().removeprefix("./")
    for a in archives:
        try:
            index = _zip_entry(str(a))[2]
        except (OSError, zipfile.BadZipFile) as e:
            raise ValueError(f"{a} is not a readable zip archive ({e})") from e
        if name in index:
            return ZipMember(str(a), index[name]), archives
    return None, archives


def readable(src: ImageSource):
    """What Image.open takes for a normalised source: a file path or a byte stream."""
    if isinstance(src, ZipMember):
        return io.BytesIO(src.read())
    return io.BytesIO(src) if isinstance(src, bytes) else src


class MissingImageError(ValueError):
    """An image path that is neither a file nor a member of a zip archive beside it."""


def image_source(src: Any, image_dir: str | os.PathLike | None) -> ImageSource:
    """Normalise one stored image to encoded bytes, an absolute path string, a ZipMember, or a PIL
    image. A relative path is taken from `image_dir`; when no such file exists, from a `.zip`
    archive there (MissingImageError names both when neither has it)."""
    if isinstance(src, dict):
        if src.get("bytes") is not None:
            src = src["bytes"]
        elif src.get("path"):
            src = src["path"]
        else:
            raise ValueError("image dict has neither 'bytes' nor 'path'")
    if isinstance(src, (bytes, bytearray, memoryview)):
        return bytes(src)
    if isinstance(src, (Image.Image, ZipMember)):
        return src
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        if path.is_absolute() or image_dir is None:
            if not path.is_file():
                raise MissingImageError(f"{str(src)!r} not found: no such file")
            return str(path)
        full = Path(image_dir) / path
        if full.is_file():
            return str(full)
        member, archives = zip_member(str(src), Path(image_dir))
        if member is not None:
            return member
        where = f" nor a member of {', '.join(a.name for a in archives)}" if archives else ""
        raise MissingImageError(f"{str(src)!r} not found: no file {full}{where}")
    raise ValueError(f"unsupported image type {type(src).__name__}")


def check_image(src: ImageSource, full: bool) -> tuple[int, int]:
    """(width, height) of one image; raises if it does not decode (`full`) or open (header only)."""
    if isinstance(src, Image.Image):
        return src.size
    with Image.open(readable(src)) as img:
        if full:
            img.load()
        return img.size
