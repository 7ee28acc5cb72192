"""Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration): the family of VPPO-7B.

14-px vision patches, merge 2 (a 28-px grid); windowed vision attention with a few full-attention
blocks; 3-D M-RoPE with contiguous (temporal, height, width) sections of each rotary half
(`get_rope_index` of transformers' Qwen2.5-VL). No DeepStack: the vision tower's only output the
language model sees is the pooled (merged) features, one block per image.
"""

from __future__ import annotations

import torch
from torch import nn

from vppo.models import Family, Size, apply_liger_patch, mrope_positions, register, share_by_index

# The Qwen2-VL / Qwen2.5-VL-Instruct chat template, verbatim (a default system turn when the first
# message is not a system one).
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


@register
class Qwen2_5_VL(Family):
    model_type = "qwen2_5_vl"
    hf_class = "Qwen2_5_VLForConditionalGeneration"
    processor_class = "Qwen2_5_VLProcessor"
    patch = 14
    merge = 2

    def rope_positions(self, hf: nn.Module, inputs: dict) -> torch.Tensor:
        return mrope_positions(hf, inputs)

    def share_image_features(self, feats, which: list[int]):
        feats.pooler_output = share_by_index(feats.pooler_output, which)
        return feats

    def vision_tower(self, hf: nn.Module) -> nn.Module:
        return hf.model.visual

    def apply_liger(self, hf: nn.Module) -> None:
        apply_liger_patch("apply_liger_kernel_to_qwen2_5_vl", hf)

    def chat_template(self) -> str:
        return CHAT_TEMPLATE

    def build_processor(self, tokenizer, min_pixels: int, max_pixels: int):
        from transformers import Qwen2_5_VLProcessor  # heavy: ~1.3 s (all three)
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

        return Qwen2_5_VLProcessor(
            image_processor=Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels),
            tokenizer=tokenizer,
            video_processor=Qwen2VLVideoProcessor(min_pixels=min_pixels, max_pixels=max_pixels),
            chat_template=CHAT_TEMPLATE,
        )

    def build_model(self, size: Size, tokenizer, seed: int = 0) -> nn.Module:
        from transformers import GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        ids = tokenizer.convert_tokens_to_ids
        half = size.hidden // size.heads // 2
        # each rotary half split into (temporal, height, width) sections, 16 / 24 / 24 of 64 in the 7B
        section = [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]
        config = Qwen2_5_VLConfig(
            text_config=dict(
                vocab_size=len(tokenizer), hidden_size=size.hidden, intermediate_size=size.intermediate,
                num_hidden_layers=size.layers, num_attention_heads=size.heads,
                num_key_value_heads=size.kv_heads, max_position_embeddings=size.max_positions,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
                bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"),
                pad_token_id=tokenizer.pad_token_id,
            ),
            vision_config=dict(
                depth=size.vision_depth, hidden_size=size.vision_hidden,
                intermediate_size=size.vision_intermediate, num_heads=size.vision_heads,
                out_hidden_size=size.hidden, fullatt_block_indexes=[size.vision_depth - 1],
                window_size=112, patch_size=self.patch, spatial_merge_size=self.merge, temporal_patch_size=2,
            ),
            image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
            vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
            tie_word_embeddings=False,
        )  # fmt: skip
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
        model.generation_config = GenerationConfig(
            bos_token_id=ids("<|endoftext|>"), eos_token_id=[ids("<|im_end|>"), ids("<|endoftext|>")],
            pad_token_id=tokenizer.pad_token_id, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
        )  # fmt: skip
        return model
