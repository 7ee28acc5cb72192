"""Sampling responses and laying out the passes over them (shared by training and evaluation).

`generate` samples n responses per prompt into a `vppo.trajectory.Trajectory` (its docstring gives
the layout); `model_inputs` and `response_hidden` feed those rows to the model again, clean or
perturbed, for the scoring passes and the update.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GenerationConfig

from vppo.distributed import zero3_ranks
from vppo.models import family_of
from vppo.trajectory import Trajectory


@dataclass
class GenSettings:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 64


def split_images(inputs: dict, vision_start_id: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Split a processor batch's concatenated pixel_values / image_grid_thw into per-row pieces.

    The processor concatenates every image of every row in order; the number of images of a row
    is the number of <|vision_start|> tokens in it, the patches of an image are t * h * w.
    """
    ids, grid, pix = inputs["input_ids"], inputs.get("image_grid_thw"), inputs.get("pixel_values")
    counts = (ids == vision_start_id).sum(-1).tolist()
    if grid is None:
        if any(counts):
            raise ValueError("input_ids hold image slots but the batch has no image_grid_thw")
        empty = torch.zeros(0, 3, dtype=torch.long)
        return [torch.zeros(0, 0)] * len(counts), [empty] * len(counts)
    if sum(counts) != grid.shape[0]:
        raise ValueError(f"{sum(counts)} <|vision_start|> tokens in the batch but {grid.shape[0]} images")
    patches = grid.prod(-1).tolist()
    pix_rows, grid_rows, i, p = [], [], 0, 0
    for c in counts:
        n = sum(patches[i : i + c])
        pix_rows.append(pix[p : p + n])
        grid_rows.append(grid[i : i + c])
        i, p = i + c, p + n
    return pix_rows, grid_rows


def response_mask_from(responses: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """(B, R) bool: every generated token up to and including the first EOS; all of a truncated
    response (no EOS); nothing after the EOS (generate pads finished rows)."""
    is_eos = torch.isin(responses, torch.tensor(eos_ids, device=responses.device))
    after = (is_eos.cumsum(-1) - is_eos.long()) > 0  # strictly after the first EOS
    return ~after


@torch.no_grad()
def generate(
    model,
    inputs: dict,
    n: int,
    gen: GenSettings,
    *,
    eos_ids: list[int],
    pad_id: int,
    suppress_ids: list[int],
    vision_start_id: int,
    tokenizer=None,
) -> Trajectory:
    """Sample n responses per prompt. `inputs` is a left-padded processor batch (input_ids,
    attention_mask, mm_token_type_ids, pixel_values, image_grid_thw). Vision special tokens are
    suppressed: fed back for scoring they would be counted as image slots."""
    pix_rows, grid_rows = split_images(inputs, vision_start_id)
    rep = lambda t: t.repeat_interleave(n, dim=0)  # noqa: E731
    ids, attn = rep(inputs["input_ids"]), rep(inputs["attention_mask"])
    mm = rep(inputs["mm_token_type_ids"]) if "mm_token_type_ids" in inputs else torch.zeros_like(ids)
    pix = [p for p in pix_rows for _ in range(n)]
    grid = [g for g in grid_rows for _ in range(n)]
    kwargs = {"input_ids": ids, "attention_mask": attn, "mm_token_type_ids": mm}
    if sum(g.shape[0] for g in grid):
        kwargs["pixel_values"] = torch.cat(pix)
        kwargs["image_grid_thw"] = torch.cat(grid)
    config = GenerationConfig(
        do_sample=True,
        temperature=gen.temperature,
        top_p=gen.top_p,
        top_k=gen.top_k,  # 0 = off; never None, or generate() takes the checkpoint's default
        repetition_penalty=1.0,  # likewise (Qwen2.5-VL-7B-Instruct ships 1.05)
        max_new_tokens=gen.max_new_tokens,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
        suppress_tokens=list(suppress_ids) or None,
    )
    device = next(model.parameters()).device
    out = model.generate(
        **{k: v.to(device) for k, v in kwargs.items()},
        generation_config=config,
        synced_gpus=zero3_ranks(model),
    )
    prompt_len = ids.shape[1]
    responses = out[:, prompt_len:].cpu()
    mask = response_mask_from(responses, eos_ids)
    responses = responses.masked_fill(~mask, pad_id)
    texts = []
    if tokenizer is not None:
        texts = [tokenizer.decode(r[m], skip_special_tokens=True) for r, m in zip(responses, mask)]
    return Trajectory(
        input_ids=torch.cat([ids, responses], 1),
        attention_mask=torch.cat([attn, mask.long()], 1),
        mm_token_type_ids=torch.cat([mm, torch.zeros_like(responses)], 1).to(mm.dtype),
        prompt_len=prompt_len,
        response_mask=mask,
        pixel_values=pix,
        image_grid_thw=grid,
        group=torch.arange(inputs["input_ids"].shape[0]).repeat_interleave(n),
        texts=texts,
    )


def model_inputs(
    ro: Trajectory, *, masked: bool = False, vision_ids: list[int] = (), pad_id: int = 0
) -> dict:  # noqa: E501
    """Forward inputs for the rows of `ro` (clean or perturbed image). Vision special tokens that
    slipped into a response are replaced by pad in the input (their labels stay as sampled), so
    the placeholder count always matches the image features."""
    ids = ro.input_ids.clone()
    if vision_ids:
        resp = ids[:, ro.prompt_len :]
        resp.masked_fill_(torch.isin(resp, torch.tensor(list(vision_ids))), pad_id)
    pix = ro.masked_pixel_values if masked else ro.pixel_values
    if masked and pix is None:
        raise ValueError("rollout has no perturbed images (masked_pixel_values is None)")
    out = {"input_ids": ids, "attention_mask": ro.attention_mask, "mm_token_type_ids": ro.mm_token_type_ids}
    if sum(g.shape[0] for g in ro.image_grid_thw):
        out["pixel_values"] = torch.cat(pix)
        out["image_grid_thw"] = torch.cat(ro.image_grid_thw)
    return out


def shared_image_features(model, pixel_values: torch.Tensor, grid: torch.Tensor):
    """The vision tower's output for a batch whose rows repeat images, computing each run of equal
    consecutive images once (the n responses of a prompt share its clean image); None when no image
    repeats. `model` is the base model (`hf.model`); the result is what its forward takes as
    `mm_encoder_outputs["image"]`, every per-image output (the pooled features; Qwen3-VL's DeepStack
    features too) one block per image of the batch, in order (the family's `share_image_features`).

    Vision attention never crosses images (cu_seqlens per image), so the features are those of the
    per-row computation; under autograd the repeated blocks sum their gradients into one tower pass.
    """
    imgs = pixel_values.split(grid.prod(-1).tolist())  # per image: (t * h * w, C * 2 * p * p)
    first, which = [], []  # index of each distinct image, and per image the distinct one it equals
    for i, im in enumerate(imgs):
        j = first[-1] if first else None
        if j is None or not (torch.equal(grid[j], grid[i]) and torch.equal(imgs[j], im)):
            first.append(i)
        which.append(len(first) - 1)
    if len(first) == len(imgs):
        return None
    feats = model.get_image_features(torch.cat([imgs[i] for i in first]), grid[first], return_dict=True)
    return family_of(model).share_image_features(feats, which)


def response_hidden(hf_model, inputs: dict, prompt_len: int) -> torch.Tensor:
    """Last hidden states at the positions that predict response tokens: (b, R, H).

    Runs the base model only (no lm_head): the caller feeds the hidden states to a fused kernel
    so the [tokens, V] logits are never materialized. An image repeated over consecutive rows goes
    through the vision tower once (`shared_image_features`)."""
    device = next(hf_model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    if inputs.get("pixel_values") is not None and inputs.get("image_grid_thw") is not None:
        feats = shared_image_features(hf_model.model, inputs["pixel_values"], inputs["image_grid_thw"])
        if feats is not None:
            del inputs["pixel_values"]
            inputs["mm_encoder_outputs"] = {"image": feats}
    out = hf_model.model(**inputs, use_cache=False)
    h = out.last_hidden_state  # (b, P + R, H)
    return h[:, prompt_len - 1 : -1]
