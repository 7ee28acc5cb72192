"""Qwen3-VL (Qwen3VLForConditionalGeneration): the family of VPPO-8B (Qwen3-VL-8B-Instruct).

Where it differs from Qwen2.5-VL, and what this project does about it:
- 16-px vision patches, merge 2: a 32-px grid. The processor's pixel_values rows are 16 x 16 cells
  (C * T * 16 * 16 = 1536 columns), so `vppo.perturb` blackens one 16-px cell per row (its
  parameters come from the image processor); the image is normalised with mean = std = 0.5.
- DeepStack: the vision tower also returns the features of `deepstack_visual_indexes` vision layers
  (8, 16, 24 in the 8B), each merged like the pooled output, which the language model adds to the
  image positions of its first len(indexes) layers. They are per-image outputs exactly as the pooled
  features are: when a batch computes each repeated image once, both are expanded back to one entry
  per image (`share_image_features`); expanding only the pooled ones hands DeepStack the distinct
  images' features for all image positions of the batch ("size of tensor a (576) must match the size
  of tensor b (72)" with 8 rows sharing one 72-token image).
- Its own get_rope_index: positions from mm_token_type_ids groups, an image advancing the text
  position by max(h, w) / merge, and interleaved M-RoPE (the (t, h, w) frequencies alternate within
  each rotary half; `mrope_interleaved`). Packing feeds the text model the same 4-channel ids as for
  Qwen2.5-VL (text position first): its text model reads that form too.
- The Instruct chat template has no default system turn.
"""

from __future__ import annotations

import torch
from torch import nn

from vppo.models import Family, Size, apply_liger_patch, mrope_positions, register, share_by_index

# A one-turn subset of the Qwen3-VL-Instruct template: no default system turn, images as
# <|vision_start|><|image_pad|><|vision_end|> where they stand in the content list.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@register
class Qwen3_VL(Family):
    model_type = "qwen3_vl"
    hf_class = "Qwen3VLForConditionalGeneration"
    processor_class = "Qwen3VLProcessor"
    patch = 16
    merge = 2

    def rope_positions(self, hf: nn.Module, inputs: dict) -> torch.Tensor:
        return mrope_positions(hf, inputs)  # its own get_rope_index (interleaving is inside the model)

    def share_image_features(self, feats, which: list[int]):
        feats.pooler_output = share_by_index(feats.pooler_output, which)
        feats.deepstack_features = [share_by_index(f, which) for f in feats.deepstack_features]
        return feats

    def vision_tower(self, hf: nn.Module) -> nn.Module:
        return hf.model.visual  # blocks, merger and the DeepStack mergers

    def apply_liger(self, hf: nn.Module) -> None:
        apply_liger_patch("apply_liger_kernel_to_qwen3_vl", hf)

    def chat_template(self) -> str:
        return CHAT_TEMPLATE

    def build_processor(self, tokenizer, min_pixels: int, max_pixels: int):
        from transformers import Qwen3VLProcessor  # heavy: ~1.3 s
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

        size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
        half = [0.5, 0.5, 0.5]  # Qwen3-VL-8B-Instruct's preprocessor_config.json
        common = dict(patch_size=self.patch, merge_size=self.merge, temporal_patch_size=2, size=size,
                      image_mean=half, image_std=half)  # fmt: skip
        return Qwen3VLProcessor(
            image_processor=Qwen2VLImageProcessor(**common),
            tokenizer=tokenizer,
            video_processor=Qwen3VLVideoProcessor(**common),
            chat_template=CHAT_TEMPLATE,
        )

    def build_model(self, size: Size, tokenizer, seed: int = 0) -> nn.Module:
        from transformers import GenerationConfig, Qwen3VLConfig, Qwen3VLForConditionalGeneration

        ids = tokenizer.convert_tokens_to_ids
        head_dim = size.hidden // size.heads
        half = head_dim // 2
        # (t, h, w) frequencies interleaved over each rotary half: 24 / 20 / 20 of 64 in the 8B
        hw = (half * 5) // 16
        section = [half - 2 * hw, hw, hw]
        config = Qwen3VLConfig(
            text_config=dict(
                vocab_size=len(tokenizer), hidden_size=size.hidden, intermediate_size=size.intermediate,
                num_hidden_layers=size.layers, num_attention_heads=size.heads, head_dim=head_dim,
                num_key_value_heads=size.kv_heads, max_position_embeddings=size.max_positions,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section,
                                 "mrope_interleaved": True},
                bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"),
                pad_token_id=tokenizer.pad_token_id,
            ),
            vision_config=dict(
                depth=size.vision_depth, hidden_size=size.vision_hidden,
                intermediate_size=size.vision_intermediate, num_heads=size.vision_heads,
                out_hidden_size=size.hidden, patch_size=self.patch, spatial_merge_size=self.merge,
                temporal_patch_size=2, num_position_embeddings=256,
                # DeepStack from every vision layer (at most one per LLM layer)
                deepstack_visual_indexes=list(range(min(size.vision_depth, size.layers))),
            ),
            image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
            vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
            tie_word_embeddings=False,
        )  # fmt: skip
        torch.manual_seed(seed)
        model = Qwen3VLForConditionalGeneration(config)
        model.generation_config = GenerationConfig(
            bos_token_id=ids("<|endoftext|>"), eos_token_id=[ids("<|im_end|>"), ids("<|endoftext|>")],
            pad_token_id=tokenizer.pad_token_id, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
        )  # fmt: skip
        return model
