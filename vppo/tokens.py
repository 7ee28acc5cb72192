"""The special token ids that sampling, scoring and evaluation agree on, read once per model.

Training (`vppo.train`), validation and `python -m vppo.eval` (both through vppo.evaluate) all take
them from `token_ids`, so a rollout stops, pads and suppresses the vision tokens the same way wherever
it is sampled.
"""

from __future__ import annotations

from dataclasses import dataclass

from vppo.data import vision_token_ids
from vppo.models import family_of_processor


@dataclass(frozen=True)
class TokenIds:
    vision: list[int]  # the vision special tokens: never sampled, replaced in the masked pass
    pad: int
    eos: list[int]
    vision_start: int  # one per image: how a batch's images are split per prompt


def eos_ids_of(model, tokenizer) -> list[int]:
    """EOS ids: the tokenizer's, <|im_end|> and <|endoftext|>, and the generation config's, all
    inside the vocabulary (a small model may keep Qwen's out-of-range defaults in its config)."""
    vocab = len(tokenizer)
    ids = {tokenizer.eos_token_id}
    ids |= {
        tokenizer.convert_tokens_to_ids(t)
        for t in ("<|im_end|>", "<|endoftext|>")
        if t in tokenizer.get_vocab()
    }
    gc = getattr(model, "generation_config", None)
    extra = getattr(gc, "eos_token_id", None) if gc is not None else None
    ids |= set(extra if isinstance(extra, (list, tuple)) else [extra] if extra is not None else [])
    return sorted(i for i in ids if i is not None and 0 <= i < vocab)


def token_ids(model, processor) -> TokenIds:
    """The ids of `processor`'s tokenizer for `model` (pad falls back to the first EOS id; the
    vision-start token is the model family's, `vppo.models`)."""
    tok = processor.tokenizer
    eos = eos_ids_of(model, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    start = tok.convert_tokens_to_ids(family_of_processor(processor).vision_start_token)
    return TokenIds(vision_token_ids(processor), pad, eos, start)
