"""Image perturbations for the token visual dependency (docs/algorithm.md section 1).

The perturbed pass must see a different image on exactly the same token sequence: the same
image grid, so the same number of image tokens and the same 3-D rotary positions. We therefore
perturb the processor's output, not the raw image:

    pv_masked = perturb_pixel_values(pixel_values, image_grid_thw, spec, seeds, image_processor)

`pixel_values` of the Qwen2-VL image processor (which Qwen2.5-VL and Qwen3-VL both use) is
[num_patches, C*T*p*p]: each row is one p x p vision patch of the RESIZED image (smart_resize to
multiples of p * merge within min/max_pixels), normalised with image_mean / image_std, repeated over
T = temporal_patch_size frames, and ordered by merge x merge blocks (block row, block col, row in
block, col in block). The patch p, merge and normalisation are read from the image processor, so the
grid is the model family's (`vppo.models`): Qwen2.5-VL p = 14 on a 28-px grid, Qwen3-VL p = 16 on
a 32-px grid (mean = std = 0.5). With algo.patch_size = p one row is exactly one cell of the resized
image, which is the paper's "random patch blackening after the processor's resize": a cell is
blackened by setting its row to the normalised value of pixel 0, (0 - mean_c) / std_c per channel.
Another cell size (14 on Qwen3-VL, as the released 8B code blackens 14-px cells of the PIL image)
goes through pixel space like the other kinds, cells straddling vision patches. Untouched rows stay
bit-identical. The other perturbations (Gaussian noise sigma=189 on 0..255, Gaussian blur of
radius 6, uniform grey 128) are applied in pixel space after un-patchifying, then patchified
again; noise is clipped to [0, 255] (a real image cannot leave that range).

The grid never changes, so `image_grid_thw` and the input ids are reused as they are.
The PIL functions (`resize_for_processor`, `perturb_image`) do the same on images, for
pictures, for callers that re-process, and to test that both routes agree.

Randomness is seeded per image of each trajectory (`trajectory_seed`), so a run is reproducible
and two trajectories of the same prompt get different masks.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

KINDS = ("patch_blacken", "noise", "blur", "grey")


@dataclass(frozen=True)
class PerturbSpec:
    kind: Literal["patch_blacken", "noise", "blur", "grey"] = "patch_blacken"
    patch_size: int = 14  # blackening cell, in pixels of the resized image (the vision patch: one row)
    patch_prob: float = 0.5
    noise_sigma: float = 189.0  # on 0..255
    blur_radius: float = 6.0  # Gaussian std in pixels
    grey_value: int = 128

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"spec.kind must be one of {KINDS}, got {self.kind!r}")
        if self.patch_size < 1:
            raise ValueError(f"spec.patch_size must be >= 1, got {self.patch_size}")
        if not 0 <= self.patch_prob <= 1:
            raise ValueError(f"spec.patch_prob must be in [0, 1], got {self.patch_prob}")
        if self.noise_sigma < 0 or self.blur_radius < 0 or not 0 <= self.grey_value <= 255:
            raise ValueError(
                "spec.noise_sigma and spec.blur_radius must be >= 0, spec.grey_value in [0, 255]"
            )

    @classmethod
    def from_config(cls, algo: Any) -> PerturbSpec:
        """From vppo.config.AlgoConfig (perturbation, patch_size, patch_prob, noise_sigma, ...)."""
        return cls(
            kind=algo.perturbation,
            patch_size=algo.patch_size,
            patch_prob=algo.patch_prob,
            noise_sigma=algo.noise_sigma,
            blur_radius=algo.blur_radius,
            grey_value=algo.grey_value,
        )


def trajectory_seed(*parts: int | str) -> int:
    """A 63-bit seed from (run seed, step, trajectory id, image index, ...), stable across runs,
    processes and Python versions (no hash randomisation)."""
    h = hashlib.blake2b(repr(tuple(parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


def _generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int(seed))
    return g


def cell_mask(height: int, width: int, cell: int, prob: float, seed: int) -> torch.Tensor:
    """[ceil(H/cell), ceil(W/cell)] bool, True = blacken; row-major over the image. Both routes
    (pixel_values and PIL) draw the same mask from the same seed."""
    gh, gw = math.ceil(height / cell), math.ceil(width / cell)
    return torch.rand(gh, gw, generator=_generator(seed)) < prob


# ---------------------------------------------------------------------------------------------
# pixel_values <-> images.


def _proc_params(image_processor: Any) -> tuple[torch.Tensor, torch.Tensor, int, int, int]:
    ip = getattr(image_processor, "image_processor", image_processor)  # a full processor works too
    mean = torch.tensor(ip.image_mean, dtype=torch.float32)
    std = torch.tensor(ip.image_std, dtype=torch.float32)
    return mean, std, int(ip.patch_size), int(ip.temporal_patch_size), int(ip.merge_size)


def _check_grid(
    pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, c: int, t: int, p: int, m: int
) -> None:
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 2:
        shape = getattr(pixel_values, "shape", "?")
        raise ValueError(f"pixel_values must be a 2-D tensor [num_patches, C*T*p*p], got {shape}")
    if pixel_values.shape[1] != c * t * p * p:
        raise ValueError(
            f"pixel_values has {pixel_values.shape[1]} columns, expected C*T*p*p = {c * t * p * p}"
        )
    if (
        not isinstance(image_grid_thw, torch.Tensor)
        or image_grid_thw.dim() != 2
        or image_grid_thw.shape[1] != 3
    ):
        raise ValueError(
            f"image_grid_thw must be [num_images, 3], got {getattr(image_grid_thw, 'shape', None)}"
        )
    if bool((image_grid_thw[:, 1:] % m).any()):
        raise ValueError(
            f"image_grid_thw h and w must be multiples of merge_size {m}, got {image_grid_thw.tolist()}"
        )
    total = int(image_grid_thw.prod(dim=1).sum())
    if total != pixel_values.shape[0]:
        raise ValueError(
            f"pixel_values has {pixel_values.shape[0]} rows but image_grid_thw sums to {total} patches"
        )


def unpatchify(
    rows: torch.Tensor, grid_thw: tuple[int, int, int], c: int, t: int, p: int, m: int
) -> torch.Tensor:
    """One image's rows [gt*gh*gw, C*T*p*p] -> frames [gt*T, C, gh*p, gw*p] (inverse of the processor)."""
    gt, gh, gw = grid_thw
    x = rows.reshape(gt, gh // m, gw // m, m, m, c, t, p, p)
    x = x.permute(0, 6, 5, 1, 3, 7, 2, 4, 8)  # (gt, T, C, bh, mh, p, bw, mw, p)
    return x.reshape(gt * t, c, gh * p, gw * p)


def patchify(frames: torch.Tensor, c: int, t: int, p: int, m: int) -> torch.Tensor:
    """frames [gt*T, C, H, W] -> rows [gt*gh*gw, C*T*p*p] in the processor's order."""
    n, _, h, w = frames.shape
    gt, gh, gw = n // t, h // p, w // p
    x = frames.reshape(gt, t, c, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (gt, bh, bw, mh, mw, C, T, p, p)
    return x.reshape(gt * gh * gw, c * t * p * p)


def _row_to_cell_order(gh: int, gw: int, m: int) -> torch.Tensor:
    """For each processor row of one frame, the row-major index of its cell in the [gh, gw] grid."""
    r = torch.arange(gh * gw).reshape(gh // m, m, gw // m, m).permute(0, 2, 1, 3)
    return r.reshape(-1)


def _perturb_frames(x: torch.Tensor, spec: PerturbSpec, seed: int) -> torch.Tensor:
    """x [F, C, H, W] float32 on 0..255 -> perturbed, same shape; frames of one image share the draw."""
    f, c, h, w = x.shape
    if spec.kind == "patch_blacken":
        mask = cell_mask(h, w, spec.patch_size, spec.patch_prob, seed).to(x.device)
        px = mask.repeat_interleave(spec.patch_size, 0)[:h].repeat_interleave(spec.patch_size, 1)[:, :w]
        return x.masked_fill(px, 0.0)
    if spec.kind == "grey":
        return torch.full_like(x, float(spec.grey_value))
    if spec.kind == "noise":
        noise = torch.randn(1, c, h, w, generator=_generator(seed)).to(x.device) * spec.noise_sigma
        return (x + noise).clamp(0.0, 255.0)
    return gaussian_blur(x, spec.blur_radius)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of x [F, C, H, W] with std sigma (PIL's GaussianBlur radius),
    kernel 2*ceil(3 sigma)+1, edges replicated."""
    if sigma <= 0:
        return x
    r = math.ceil(3 * sigma)
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / sigma) ** 2)
    k = (k / k.sum()).to(x.device)
    f, c, h, w = x.shape
    y = x.reshape(f * c, 1, h, w)
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    return y.reshape(f, c, h, w)


def perturb_pixel_values(
    pixel_values: torch.Tensor,
    image_grid_thw: torch.Tensor,
    spec: PerturbSpec,
    seeds: list[int] | int,
    image_processor: Any,
) -> torch.Tensor:
    """The perturbed copy of the processor's pixel_values, same shape, dtype and device.

    pixel_values [P, C*T*p*p] (any float dtype; computed in float32), image_grid_thw [I, 3]
    with P = sum(t*h*w); seeds: one int per image (or one int for all). image_processor gives
    image_mean, image_std, patch_size, temporal_patch_size, merge_size (the Qwen2-VL image
    processor, or a processor that has one as .image_processor).
    """
    if not isinstance(spec, PerturbSpec):
        raise ValueError(f"spec must be a PerturbSpec, got {type(spec).__name__}")
    mean, std, p, t, m = _proc_params(image_processor)
    c = mean.numel()
    _check_grid(pixel_values, image_grid_thw, c, t, p, m)
    grids = [tuple(int(v) for v in g) for g in image_grid_thw.tolist()]
    if isinstance(seeds, int):
        seeds = [seeds] * len(grids)
    if len(seeds) != len(grids):
        raise ValueError(f"seeds has {len(seeds)} entries for {len(grids)} images")
    dev, dtype = pixel_values.device, pixel_values.dtype
    mean, std = mean.to(dev), std.to(dev)
    # The normalised value of a pixel v in 0..255 for each column of a row (C, T, p, p).
    col_channel = torch.arange(c, device=dev).repeat_interleave(t * p * p)

    def normed(v: float) -> torch.Tensor:
        return ((v / 255.0 - mean) / std)[col_channel]

    out = []
    start = 0
    for (gt, gh, gw), seed in zip(grids, seeds):
        n = gt * gh * gw
        rows = pixel_values[start : start + n].float()
        start += n
        if spec.kind == "patch_blacken" and spec.patch_size == p:
            # One row = one cell: blacken rows, leave the others bit-identical.
            cells = cell_mask(gh * p, gw * p, p, spec.patch_prob, seed).reshape(-1).to(dev)
            hit = cells[_row_to_cell_order(gh, gw, m).to(dev)].repeat(gt)
            rows = torch.where(hit[:, None], normed(0.0)[None, :], rows)
        elif spec.kind == "grey":
            rows = normed(float(spec.grey_value))[None, :].expand(n, -1).clone()
        else:
            frames = unpatchify(rows, (gt, gh, gw), c, t, p, m)  # normalised [gt*T, C, H, W]
            pix = (frames * std.view(1, c, 1, 1) + mean.view(1, c, 1, 1)) * 255.0
            pix = _perturb_frames(pix, spec, seed)
            frames = (pix / 255.0 - mean.view(1, c, 1, 1)) / std.view(1, c, 1, 1)
            rows = patchify(frames, c, t, p, m)
        out.append(rows.to(dtype))
    return torch.cat(out, 0) if out else pixel_values.clone()


# ---------------------------------------------------------------------------------------------
# PIL route.


def resize_for_processor(
    image: Image.Image, min_pixels: int, max_pixels: int, factor: int = 28
) -> Image.Image:
    """The image at the size the Qwen2-VL image processor resizes it to (smart_resize, bicubic), RGB;
    processing the result again leaves its size unchanged. factor: patch * merge of the family's
    grid (`vppo.models.Family.grid`: 28 Qwen2.5-VL, 32 Qwen3-VL)."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize  # heavy: ~1.3 s

    image = image.convert("RGB")
    h, w = smart_resize(
        image.height, image.width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels
    )
    return image if (h, w) == (image.height, image.width) else image.resize((w, h), Image.BICUBIC)


def perturb_image(image: Image.Image, spec: PerturbSpec, seed: int) -> Image.Image:
    """The perturbed copy of an (already resized) PIL image, same size, RGB uint8, drawn exactly
    as perturb_pixel_values draws it from the same seed (same cell mask, noise and blur kernel);
    cells are aligned to the top-left corner, as the processor's patches."""
    if not isinstance(spec, PerturbSpec):
        raise ValueError(f"spec must be a PerturbSpec, got {type(spec).__name__}")
    image = image.convert("RGB")
    x = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)[None]  # (1, C, H, W)
    y = _perturb_frames(x, spec, seed)[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
    return Image.fromarray(y, "RGB")
