"""The perturbation on each family's grid (vppo.models: Qwen2.5-VL 14-px patches on a 28-px grid,
Qwen3-VL 16-px patches on a 32-px grid): rows of pixel_values are whole vision patches."""

import numpy as np
import pytest
import torch
from helpers import FAMILIES
from PIL import Image

from vppo.perturb import (
    PerturbSpec,
    cell_mask,
    patchify,
    perturb_image,
    perturb_pixel_values,
    resize_for_processor,
    trajectory_seed,
    unpatchify,
)

MIN_PX, MAX_PX = 3136, 50176


@pytest.fixture(scope="module", params=FAMILIES)
def proc(request):
    """The image processor of each family's processor (as the micro models and tiny bases build it)."""
    from vppo.models import family
    from vppo.tiny import build_tokenizer

    fam = family(request.param)
    return fam.build_processor(build_tokenizer(["a b"] * 3, vocab_size=300), MIN_PX, MAX_PX).image_processor


def _grid(proc):
    """(patch, merge, the factor images are resized to multiples of)."""
    return proc.patch_size, proc.merge_size, proc.patch_size * proc.merge_size


def _spec(proc, **kw):
    """A PerturbSpec whose blackening cell is the processor's vision patch."""
    return PerturbSpec(patch_size=proc.patch_size, **kw)


def _img(h, w, seed=0):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8))


def _process(proc, images):
    out = proc(images=images, return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def _black_row(proc):
    mean, std = torch.tensor(proc.image_mean), torch.tensor(proc.image_std)
    return ((0 - mean) / std).repeat_interleave(proc.temporal_patch_size * proc.patch_size**2)


def test_unpatchify_inverts_the_processor(proc):
    p, m, factor = _grid(proc)
    img = _img(73, 100)
    pv, grid = _process(proc, [img])
    (gt, gh, gw) = grid[0].tolist()
    frames = unpatchify(pv, (gt, gh, gw), 3, 2, p, m)  # (T, C, H, W)
    assert frames.shape == (2, 3, gh * p, gw * p)
    assert torch.equal(patchify(frames, 3, 2, p, m), pv)
    # the frames are the normalised image: checked on an image the processor does not resize
    r = resize_for_processor(img, MIN_PX, MAX_PX, factor)
    assert (r.height, r.width) == (gh * p, gw * p)
    pv, grid = _process(proc, [r])
    frames = unpatchify(pv, (gt, gh, gw), 3, 2, p, m)
    x = torch.from_numpy(np.asarray(r, dtype=np.float32)).permute(2, 0, 1) / 255
    mean, std = torch.tensor(proc.image_mean).view(3, 1, 1), torch.tensor(proc.image_std).view(3, 1, 1)
    torch.testing.assert_close(frames[0], (x - mean) / std, atol=1e-5, rtol=0)


def test_patch_blacken_rows(proc):
    pv, grid = _process(proc, [_img(73, 100)])
    spec = _spec(proc)
    out = perturb_pixel_values(pv, grid, spec, [123], proc)
    assert out.shape == pv.shape and out.dtype == pv.dtype
    black = _black_row(proc)
    is_black = torch.isclose(out, black[None], atol=1e-6).all(1)
    unchanged = torch.equal(out[~is_black], pv[~is_black])
    assert unchanged  # untouched rows are bit-identical
    frac = is_black.float().mean().item()
    assert 0.25 < frac < 0.75, frac  # 48 (Qwen3-VL: 32) cells at p = 0.5
    # the grid is kept and every vision patch is blackened whole or left alone
    assert out.shape[1] == 3 * proc.temporal_patch_size * proc.patch_size**2
    # seeded: same seed same mask, another seed (another trajectory) another mask
    assert torch.equal(perturb_pixel_values(pv, grid, spec, [123], proc), out)
    assert not torch.equal(perturb_pixel_values(pv, grid, spec, [124], proc), out)
    assert torch.equal(perturb_pixel_values(pv, grid, _spec(proc, patch_prob=0.0), 1, proc), pv)
    all_black = perturb_pixel_values(pv, grid, _spec(proc, patch_prob=1.0), 1, proc)
    assert torch.isclose(all_black, black[None], atol=1e-6).all()


def test_pixel_values_route_equals_pil_route(proc):
    # Blackening the rows of pixel_values == blackening patch x patch cells of the resized image and
    # processing it again (the paper's definition), cell for cell; the grid is unchanged.
    img = _img(90, 61, seed=3)
    resized = resize_for_processor(img, MIN_PX, MAX_PX, _grid(proc)[2])
    assert resized.size != img.size
    pv, grid = _process(proc, [resized])  # the processor leaves an already-resized image as it is
    assert torch.equal(grid, _process(proc, [img])[1])
    for spec in [
        _spec(proc),
        PerturbSpec(),  # 14-px cells: on Qwen3-VL across patches (the released 8B code's cell size)
        PerturbSpec(kind="grey"),
        PerturbSpec(kind="noise"),
        PerturbSpec(kind="blur"),
    ]:
        seed = trajectory_seed(1, 7, "traj-0", 0)
        a = perturb_pixel_values(pv, grid, spec, [seed], proc)
        pil = perturb_image(resized, spec, seed)
        assert pil.size == resized.size
        b, grid_b = _process(proc, [pil])
        assert torch.equal(grid_b, grid)
        # the PIL route rounds to uint8: at most half a grey level apart
        tol = 0.5 / 255 / min(proc.image_std) + 1e-5
        assert (a - b).abs().max().item() <= tol, spec.kind


@pytest.mark.parametrize("kind", ["patch_blacken", "noise", "blur", "grey"])
def test_every_kind_changes_the_input_and_keeps_the_grid(proc, kind):
    images = [_img(73, 100, 1), _img(56, 56, 2), _img(200, 150, 3)]  # three grids in one batch
    pv, grid = _process(proc, images)
    spec = _spec(proc, kind=kind)
    seeds = [trajectory_seed(0, 0, i) for i in range(3)]
    out = perturb_pixel_values(pv, grid, spec, seeds, proc)
    assert out.shape == pv.shape
    sizes = grid.prod(1).tolist()
    for o, p in zip(out.split(sizes), pv.split(sizes)):
        assert (o - p).abs().mean() > 0.1, kind  # every image really changed (normalised units)
    # values stay those of an image in 0..255
    mean, std = torch.tensor(proc.image_mean), torch.tensor(proc.image_std)
    lo, hi = ((0 - mean) / std).min() - 1e-4, ((1 - mean) / std).max() + 1e-4
    assert out.min() >= lo and out.max() <= hi
    if kind == "grey":
        assert torch.allclose(out, out[:1].expand_as(out))
    if kind == "blur":  # smoother: neighbouring pixels closer than in the random image
        p, m, _ = _grid(proc)
        f0 = unpatchify(pv[: sizes[0]], tuple(grid[0].tolist()), 3, 2, p, m)
        f1 = unpatchify(out[: sizes[0]], tuple(grid[0].tolist()), 3, 2, p, m)
        assert f1.diff(dim=-1).abs().mean() < 0.2 * f0.diff(dim=-1).abs().mean()
    if kind == "noise":  # sigma 189 on 0..255 (clipped): a large change, over 67 grey levels on average
        assert (out - pv).abs().mean() * std.min() * 255 > 67


def test_bf16_pixel_values(proc):
    pv, grid = _process(proc, [_img(73, 100)])
    out = perturb_pixel_values(pv.bfloat16(), grid, PerturbSpec(), 5, proc)
    assert out.dtype == torch.bfloat16 and out.shape == pv.shape
    ref = perturb_pixel_values(pv, grid, PerturbSpec(), 5, proc)
    torch.testing.assert_close(out.float(), ref, atol=0.02, rtol=0.01)


def test_cell_mask_and_seed():
    m = cell_mask(28, 42, 14, 0.5, 9)
    assert m.shape == (2, 3) and m.dtype == torch.bool
    assert torch.equal(m, cell_mask(28, 42, 14, 0.5, 9))
    assert trajectory_seed(1, 2, "a") == trajectory_seed(1, 2, "a") != trajectory_seed(1, 2, "b")
    big = cell_mask(1400, 1400, 14, 0.5, 0)
    assert abs(big.float().mean().item() - 0.5) < 0.02


def test_pil_blacken_other_cell_size():
    img = _img(56, 84)
    out = perturb_image(img, PerturbSpec(patch_size=28, patch_prob=1.0), 0)
    assert out.size == img.size and np.asarray(out).max() == 0
    out = perturb_image(img, PerturbSpec(patch_size=28, patch_prob=0.5), 0)
    a = np.asarray(out).reshape(2, 28, 3, 28, 3)
    black = (a == 0).all(axis=(1, 3, 4))  # per 28x28 cell
    assert black.any() and not black.all()
    assert np.array_equal(black, cell_mask(56, 84, 28, 0.5, 0).numpy())


def test_bad_input(proc):
    pv, grid = _process(proc, [_img(73, 100)])
    with pytest.raises(ValueError, match="pixel_values"):
        perturb_pixel_values(pv[:, :100], grid, PerturbSpec(), 0, proc)
    with pytest.raises(ValueError, match="image_grid_thw"):
        perturb_pixel_values(pv[:-4], grid, PerturbSpec(), 0, proc)
    with pytest.raises(ValueError, match="seeds"):
        perturb_pixel_values(pv, grid, PerturbSpec(), [1, 2], proc)
    with pytest.raises(ValueError, match="spec.kind"):
        PerturbSpec(kind="cutout")
    with pytest.raises(ValueError, match="spec.patch_prob"):
        PerturbSpec(patch_prob=2.0)


def test_from_config():
    from vppo.config import load_config

    cfg = load_config(None, ["algo.perturbation=noise", "algo.noise_sigma=50"])
    s = PerturbSpec.from_config(cfg.algo)
    assert (s.kind, s.noise_sigma, s.patch_size) == ("noise", 50.0, 14)
