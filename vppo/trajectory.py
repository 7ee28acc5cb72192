"""The one record a batch of responses travels in, from sampling to the optimizer step.

`vppo.rollout.generate` fills the token rows and images; each later stage of a training step adds
its own fields and nothing is held twice:

  sampling (vppo.sampling)   answers, rewards
  perturbation (vppo.perturb) masked_pixel_values
  scoring (vppo.loss.score)   old_logp, entropy, kl, k3 (VPPO), ref_logp (algo.kl_coef > 0)
  advantages (vppo.objective) advantages, token_mask (TGF)

Layout: prompt and response token rows in one [B, P + R] block, prompts left-padded to width P (as
generation needs them), responses right-padded to width R. Every pass over the batch (the old
policy on the clean and on the perturbed image, the update) feeds exactly these rows, the same
`mm_token_type_ids` and the same image grid, so the 3-D rotary positions of Qwen2.5-VL agree token
for token between generation and scoring. Per-token fields are [B, R] float32 with zeros at invalid
positions; B = prompts * n, the n responses of a prompt consecutive.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch


@dataclass
class Trajectory:
    # sampled (vppo.rollout.generate)
    input_ids: torch.Tensor  # (B, P + R) prompt left-padded, response right-padded
    attention_mask: torch.Tensor  # (B, P + R)
    mm_token_type_ids: torch.Tensor  # (B, P + R) 0 text, 1 image (the response is all text)
    prompt_len: int  # P
    response_mask: torch.Tensor  # (B, R) bool: generated tokens up to and including EOS
    pixel_values: list[torch.Tensor]  # per row: (patches_i, D) clean image patches
    image_grid_thw: list[torch.Tensor]  # per row: (images_i, 3)
    group: torch.Tensor  # (B,) index of the prompt each row answers
    texts: list[str] = field(default_factory=list)  # decoded responses (for grading)
    sampler_logp: torch.Tensor | None = None  # (B, R) the sampling engine's log-probs (vllm engine)
    # graded
    answers: list[str] | None = None  # (B,) the ground truth of each row's prompt
    rewards: torch.Tensor | None = None  # (B,)
    # perturbed
    masked_pixel_values: list[torch.Tensor] | None = None  # per row, the perturbed image
    # scored by the old policy (no grad)
    old_logp: torch.Tensor | None = None  # (B, R)
    entropy: torch.Tensor | None = None  # (B, R) exact entropy of the clean pass
    kl: torch.Tensor | None = None  # (B, R) exact KL(clean || masked), VPPO only
    k3: torch.Tensor | None = None  # (B, R) sampled-token k3 estimate of it, VPPO only
    ref_logp: torch.Tensor | None = None  # (B, R) the frozen reference policy's
    # advantages
    advantages: torch.Tensor | None = None  # (B,) group-normalised, before shaping (TAS)
    token_mask: torch.Tensor | None = None  # (B, R) TGF mask; None: every valid token

    @property
    def responses(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_len :]  # (B, R)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, idx: list[int] | torch.Tensor | range) -> Trajectory:
        """The rows `idx` (in that order), every per-row field with them."""
        idx = torch.as_tensor(list(idx) if isinstance(idx, range) else idx, dtype=torch.long)
        rows = idx.tolist()
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None or f.name == "prompt_len":
                out[f.name] = v
            elif isinstance(v, torch.Tensor):
                out[f.name] = v[idx]
            else:
                out[f.name] = [v[i] for i in rows] if v else []
        return Trajectory(**out)


def concat(parts: list[Trajectory], pad_id: int) -> Trajectory:
    """Rows of trajectories of different prompt / response widths in one (re-padding both sides;
    groups renumbered to stay distinct). Only the sampled and graded fields are carried."""
    if len(parts) == 1:
        return parts[0]
    p = max(t.prompt_len for t in parts)
    r = max(t.response_mask.shape[1] for t in parts)

    def pad(t: Trajectory, x, fill):
        left, right = p - t.prompt_len, r - t.response_mask.shape[1]
        return torch.cat([x.new_full((len(t), left), fill), x, x.new_full((len(t), right), fill)], 1)

    g0, groups = 0, []
    for t in parts:
        groups.append(t.group + g0)
        g0 += int(t.group.max()) + 1 if len(t) else 0
    graded = all(t.rewards is not None for t in parts)
    return Trajectory(
        input_ids=torch.cat([pad(t, t.input_ids, pad_id) for t in parts]),
        attention_mask=torch.cat([pad(t, t.attention_mask, 0) for t in parts]),
        mm_token_type_ids=torch.cat([pad(t, t.mm_token_type_ids, 0) for t in parts]),
        prompt_len=p,
        response_mask=torch.cat(
            [
                torch.cat(
                    [t.response_mask, t.response_mask.new_zeros(len(t), r - t.response_mask.shape[1])], 1
                )
                for t in parts
            ]
        ),
        pixel_values=[x for t in parts for x in t.pixel_values],
        image_grid_thw=[x for t in parts for x in t.image_grid_thw],
        group=torch.cat(groups),
        texts=[s for t in parts for s in t.texts],
        answers=[a for t in parts for a in t.answers] if graded else None,
        rewards=torch.cat([t.rewards for t in parts]) if graded else None,
        sampler_logp=torch.cat([torch.nn.functional.pad(t.sampler_logp, (0, r - t.sampler_logp.shape[1]))
                                for t in parts]) if all(t.sampler_logp is not None for t in parts) else None,
    )  # fmt: skip
