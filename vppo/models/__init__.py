"""Model families: everything this project must know of one architecture, one module per family.

    fam = family_of(hf)                       # a loaded model (its config.model_type)
    fam = family_of_path(cfg.model.path)      # a model folder, from config.json alone (no weights)
    pos = fam.rope_positions(hf, inputs)      # (3, b, L) the rope ids the padded forward uses

A family is a subclass of `Family` registered with `@register`; the registry is keyed by the
checkpoint's `model_type`. Every abstract method below is a piece the rest of the code asks for, and
`register` refuses a class that leaves one out (naming it), so a new family cannot half-exist:

  rope_positions        the M-RoPE ids packing needs: the model's own get_rope_index on the padded
                        rows, and the text-only fallback when a batch carries no image
  share_image_features  the vision tower's output for a batch whose rows repeat images, expanded from
                        the distinct images' features back to one entry per image (every per-image
                        field: Qwen3-VL's DeepStack features as well as the pooled ones)
  vision_tower          the module `model.freeze_vision` freezes
  apply_liger           Liger-Kernel's patch for the family (an error where Liger has none)
  build_processor       a processor around a tokenizer (the tiny bases and the tests' micro models)
  build_model           a randomly initialised model of a given `Size`, ids from a tokenizer
  chat_template         the family's chat template, for the tiny tokenizer / processor

Plain attributes: `model_type`, `hf_class` / `processor_class` (transformers class names), `patch` /
`merge` (the vision patch in pixels and the spatial merge: the perturbation's grid is patch * merge),
the special token names the rollout and the vLLM engine use (`vision_start_token`, `image_pad_token`).
`dummy_image` (the smallest image the vision tower takes, which a rank without an image runs) is
derived from the vision config and `patch` / `merge`; a family whose tower takes another layout
overrides it. Adding a family: one module here (subclass, fill every piece, `@register`), an
import at the bottom of this file, and its name in the parametrised tests (tests/helpers.FAMILIES).
"""

from __future__ import annotations

import abc
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn


@dataclass(frozen=True)
class Size:
    """The shape of a small model of any family (the tiny bases, the tests' micro models)."""

    hidden: int = 128
    intermediate: int = 384
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    vision_depth: int = 2
    vision_hidden: int = 128
    vision_intermediate: int = 256
    vision_heads: int = 4
    max_positions: int = 4096


class Family(abc.ABC):
    """One model family (see the module docstring for what each piece is for)."""

    model_type: ClassVar[str]
    hf_class: ClassVar[str]
    processor_class: ClassVar[str]  # the transformers processor class name
    patch: ClassVar[int]  # vision patch, pixels
    merge: ClassVar[int]  # spatial merge: one image token per merge x merge patches
    vision_start_token: ClassVar[str] = "<|vision_start|>"
    image_pad_token: ClassVar[str] = "<|image_pad|>"
    REQUIRED_ATTRS: ClassVar[tuple[str, ...]] = (
        "model_type",
        "hf_class",
        "processor_class",
        "patch",
        "merge",
    )

    @property
    def grid(self) -> int:
        """Side of one image token's cell in pixels: images are resized to multiples of it."""
        return self.patch * self.merge

    def dummy_image(self, hf: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(pixel_values, image_grid_thw) of the smallest image the vision tower takes: one frame
        of merge x merge patches, all zeros, on the tower's device and dtype. A rank whose batch has
        no image runs it (vppo.model.vision_in_every_pass), so that every rank runs the tower."""
        vc = hf.config.vision_config
        tp = vc.temporal_patch_size if isinstance(vc.temporal_patch_size, int) else vc.temporal_patch_size[0]
        w = next(self.vision_tower(hf).parameters())
        n, width = self.merge * self.merge, vc.in_channels * tp * self.patch * self.patch
        pixels = torch.zeros(n, width, device=w.device, dtype=w.dtype)
        return pixels, torch.tensor([[1, self.merge, self.merge]], device=w.device)

    @abc.abstractmethod
    def rope_positions(self, hf: nn.Module, inputs: dict) -> torch.Tensor:
        """(3, b, L) rope ids of the padded rows `inputs` (`vppo.rollout.model_inputs`), as the
        padded forward computes them."""

    @abc.abstractmethod
    def share_image_features(self, feats, which: list[int]):
        """`feats` (get_image_features of the distinct images) with every per-image field re-indexed
        by `which` (per image of the batch, the distinct image it equals)."""

    @abc.abstractmethod
    def vision_tower(self, hf: nn.Module) -> nn.Module:
        """The vision encoder (patch embedding, blocks, mergers) of a loaded model."""

    @abc.abstractmethod
    def apply_liger(self, hf: nn.Module) -> None:
        """Liger-Kernel's patch for this family, in place (lm_head untouched: vppo.loss owns it)."""

    @abc.abstractmethod
    def chat_template(self) -> str:
        """The chat template a small model of this family is built with."""

    @abc.abstractmethod
    def build_processor(self, tokenizer, min_pixels: int, max_pixels: int):
        """The family's processor around `tokenizer`, images resized within [min_pixels, max_pixels]."""

    @abc.abstractmethod
    def build_model(self, size: Size, tokenizer, seed: int = 0) -> nn.Module:
        """A randomly initialised model of `size` whose special ids are those of `tokenizer`."""

    def vllm_options(self, min_pixels: int | None, max_pixels: int | None) -> dict:
        """Keyword arguments of vllm.LLM for this family: the image bounds as the processor's
        `size` (Qwen2.5-VL and Qwen3-VL processors both read shortest_edge / longest_edge, in pixels),
        so vLLM resizes images exactly as the processor of the scoring passes does."""
        size = {k: v for k, v in (("shortest_edge", min_pixels), ("longest_edge", max_pixels)) if v}
        return {"mm_processor_kwargs": {"size": size}} if size else {}

    def describe(self) -> str:
        return f"{self.model_type} ({self.hf_class}, {self.patch}-px patches, merge {self.merge})"


FAMILIES: dict[str, Family] = {}


def missing_pieces(cls: type) -> list[str]:
    """The pieces a family class leaves out: abstract methods not implemented, attributes not set."""
    missing = sorted(getattr(cls, "__abstractmethods__", ()))
    missing += [a for a in Family.REQUIRED_ATTRS if not hasattr(cls, a)]
    return missing


def register(cls: type[Family]) -> type[Family]:
    """Class decorator: add a family to the registry; a class missing a piece is an error naming it."""
    if not (inspect.isclass(cls) and issubclass(cls, Family)):
        raise TypeError(f"{cls!r} is not a vppo.models.Family subclass")
    missing = missing_pieces(cls)
    if missing:
        raise TypeError(
            f"model family {cls.__name__} lacks {', '.join(missing)} (see vppo/models/__init__.py)"
        )
    if cls.model_type in FAMILIES:
        raise ValueError(f"model_type {cls.model_type!r} is registered twice")
    FAMILIES[cls.model_type] = cls()
    return cls


def supported() -> list[str]:
    return sorted(FAMILIES)


def family(model_type: str) -> Family:
    """The family of a checkpoint's `model_type`; an unsupported one is an error naming the supported."""
    if model_type not in FAMILIES:
        raise ValueError(
            f"model_type {model_type!r} is not supported; supported model types: {', '.join(supported())}"
        )
    return FAMILIES[model_type]


def model_type_of_path(path: str | Path) -> str | None:
    """`model_type` of a model folder's config.json (no weights read); None when there is no such file
    or it names none."""
    f = Path(path).expanduser() / "config.json"
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text()).get("model_type")
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{f}: cannot read the model_type ({e})") from e


def family_of_path(path: str | Path) -> Family:
    """The family of a local model folder, from its config.json."""
    mt = model_type_of_path(path)
    if mt is None:
        raise ValueError(f"{path}: no config.json naming a model_type to choose a model family by")
    return family(mt)


def family_of_checkpoint(path: str | Path) -> Family:
    """The family of a local folder or a model in the local Hugging Face cache (config only)."""
    if (Path(path).expanduser() / "config.json").is_file():
        return family_of_path(path)
    from transformers import AutoConfig

    return family(AutoConfig.from_pretrained(str(path), local_files_only=True).model_type)


def family_of(model: nn.Module) -> Family:
    """The family of a loaded Hugging Face model (or a module wrapping one as `.hf`)."""
    hf = getattr(model, "hf", model)
    return family(hf.config.model_type)


def family_of_processor(processor) -> Family:
    """The family whose processor class `processor` is (a processor carries no model_type)."""
    name = type(processor).__name__
    for fam in FAMILIES.values():
        if fam.processor_class == name:
            return fam
    known = ", ".join(f"{f.processor_class} ({t})" for t, f in sorted(FAMILIES.items()))
    raise ValueError(f"processor {name} belongs to no supported model family; supported: {known}")


def apply_liger_patch(patch_name: str, hf: nn.Module) -> None:
    """Liger-Kernel's `patch_name` on `hf` (lm_head and loss untouched: vppo.loss owns them); an
    ImportError (no liger_kernel, or a Liger without a working patch for this transformers) is
    re-raised naming the versions."""
    try:
        import liger_kernel.transformers as lt  # optional extra

        getattr(lt, patch_name)(model=hf, fused_linear_cross_entropy=False, cross_entropy=False)
    except (ImportError, AttributeError) as e:
        import transformers

        try:
            from importlib.metadata import version

            liger = version("liger-kernel")
        except Exception:  # not installed
            liger = "not installed"
        raise RuntimeError(
            f"model.liger: {patch_name} failed (liger-kernel {liger}, transformers "
            f"{transformers.__version__}): {e}; run with model.liger=false"
        ) from e


def mrope_positions(hf: nn.Module, inputs: dict) -> torch.Tensor:
    """(3, B, L) M-RoPE positions from the model's own `get_rope_index` (helper of `rope_positions` for
    families that have one with Qwen's signature); without an image grid, 0..L-1 on every row and axis
    (the text model's own fallback)."""
    ids = inputs["input_ids"]
    if inputs.get("image_grid_thw") is None:
        return torch.arange(ids.shape[1]).view(1, 1, -1).expand(3, ids.shape[0], -1)
    pos, _ = hf.model.get_rope_index(
        input_ids=ids, mm_token_type_ids=inputs["mm_token_type_ids"],
        image_grid_thw=inputs["image_grid_thw"], attention_mask=inputs["attention_mask"],
    )  # fmt: skip
    return pos


def share_by_index(per_image, which: list[int]) -> tuple:
    """A tuple of per-image tensors re-indexed by `which` (helper of `share_image_features`)."""
    return tuple(per_image[j] for j in which)


from vppo.models import qwen2_5_vl, qwen3_vl  # noqa: E402,F401  (registers the families)
