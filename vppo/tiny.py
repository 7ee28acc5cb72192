"""The embedded tiny base model: a few-million-parameter Qwen2.5-VL that loads like the 7B one.

    python -m vppo.tiny            # build (or find in the cache) and print the path

Pieces, all standard Qwen2.5-VL classes saved with save_pretrained, so AutoProcessor.from_pretrained
and Qwen2_5_VLForConditionalGeneration.from_pretrained read them exactly as they read
Qwen2.5-VL-7B-Instruct from a local folder:
- tokenizer: a byte-level BPE trained on the synthetic set's text with Qwen2's pre-tokenizer, the
  Qwen2.5-VL special tokens and chat template (Qwen2Tokenizer);
- processor: Qwen2_5_VLProcessor with the Qwen2-VL image processor, small min / max pixels;
"""

from __future__ import annotations

import json
from collections.abc import Iterable

# Qwen2.5-VL's special tokens in their original order (ids 151643... there, 0... here).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# The Qwen2-VL / Qwen2.5-VL-Instruct chat template, verbatim.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Text the template itself writes, so the BPE learns it too.
TEMPLATE_TEXT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n", "user\n", "assistant\n")


def build_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """A Qwen2Tokenizer whose byte-level BPE is trained on `texts` (plus the chat template's text).

    Same normaliser, pre-tokenizer (digits split one by one) and decoder as Qwen2; the Qwen2.5-VL
    special tokens take ids 0..13; eos <|im_end|>, pad <|endoftext|> as in Qwen2.5-VL-7B-Instruct.
    """
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers import AddedToken, Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (bytes + specials)")
    bpe = Tokenizer(BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([*TEMPLATE_TEXT, *texts], trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = Qwen2Tokenizer(
        vocab=model["vocab"], merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None
    )
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_processor(tokenizer, min_pixels: int = 56 * 56, max_pixels: int = 84 * 84):
    """Qwen2_5_VLProcessor around `tokenizer`: Qwen2-VL image (and video) processor, patch 14, merge 2."""
    from transformers import Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    if min_pixels > max_pixels:
        raise ValueError(f"min_pixels ({min_pixels}) must not exceed max_pixels ({max_pixels})")
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(min_pixels=min_pixels, max_pixels=max_pixels),
        chat_template=CHAT_TEMPLATE,
    )
