"""Padding-free passes: packed rows, token-budget micro-batches, length-balanced ranks.

A micro-batch of a `vppo.trajectory.Trajectory` is [b, P + R] rows, prompts left-padded and
responses right-padded to the widths of the whole rollout batch; every pass over it computes
b * (P + R) positions, most of them padding with ViRL39K-like lengths. `pack` turns the same
forward inputs (`vppo.rollout.model_inputs`) into one (1, T) sequence of the T valid tokens, the
rows one after the other:

  position ids  (4, 1, T): channel 0 the text position within each row (0, 1, ..., len_i - 1),
                channels 1-3 the M-RoPE (temporal, height, width) ids each token has in the
                padded layout, computed by the model's own `get_rope_index` on the padded rows
                (the very call the padded forward makes; the family's `rope_positions`,
                `vppo.models`) and then stripped of the pads, so the
                image grid and the rope positions of the two layouts cannot drift apart;
  images        the rows' pixel_values / image_grid_thw in row order (the placeholders of the
                packed sequence are in that order too);
  index         (N,): the positions of the packed sequence whose hidden states predict the N valid
                response tokens, in the row-major order of `response_mask` -- the [N, H] rows that
                `vppo.loss.score` and `vppo.loss.vppo_loss_linear` take, unchanged.

Attention. Nothing here builds a mask: the packed forward gives the model (Qwen2.5-VL or Qwen3-VL)
4-channel position ids and no attention_mask, the form transformers (>= 4.54, 5.x) reads as a packed
batch: its `create_causal_mask` finds the row boundaries where the text position does not grow by
one and, for sdpa / eager attention, builds the block-diagonal causal mask (a (1, 1, T, T) boolean
mask: exact, runs on the CPU and in the tests here with no flash-attn); under flash_attention_2 the
same position ids become cu_seqlens and flash-attn's varlen kernel runs with no mask at all. We
chose this over our own per-segment SDPA loop or flex attention because it is the path the model
code itself maintains (the mask, the rotary embedding and the FA2 kwargs come from one place), it
needs no patching of the attention modules, and the same inputs run on the CPU and on the GPU. The
sdpa mask is O(T^2) bytes: on a GPU without flash-attn bound T with train.max_tokens_per_micro.

`micro_batches` fills micro-batches by token count (train.max_tokens_per_micro) with the same
number of micro-batches on every rank (ZeRO-2/3 run collectives per forward / backward), and
`balance` re-partitions a mini-batch across ranks by sequence length (train.balance_batch,
Karmarkar-Karp, as the released trainer's `_balance_batch`).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from vppo.models import family_of
from vppo.rollout import model_inputs, shared_image_features
from vppo.trajectory import Trajectory


@dataclass
class Packed:
    """The forward inputs of b rows packed into one (1, T) sequence (see the module docstring)."""

    input_ids: torch.Tensor  # (1, T)
    position_ids: torch.Tensor  # (4, 1, T): text position within the row, then the 3 M-RoPE axes
    index: torch.Tensor  # (N,) packed positions predicting the valid response tokens, row-major
    lengths: list[int]  # tokens of each row
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None

    @property
    def tokens(self) -> int:
        return int(self.input_ids.shape[1])


def rope_positions(hf, inputs: dict) -> torch.Tensor:
    """(3, b, L) M-RoPE ids of the padded rows, as the padded forward computes them: the model
    family's (`vppo.models`): its own `get_rope_index` over the valid tokens when the rows carry
    images, else its text-only fallback."""
    return family_of(hf).rope_positions(hf, inputs)


def pack(hf, inputs: dict, response_mask: torch.Tensor, prompt_len: int) -> Packed:
    """The padded forward inputs of b rows (`vppo.rollout.model_inputs`) as one packed row.

    response_mask: (b, R) the valid response positions (a subset of the attention mask's)."""
    ids, attn = inputs["input_ids"], inputs["attention_mask"].bool()
    valid = response_mask.bool()
    if not bool(attn[:, prompt_len:][valid].all()):
        raise ValueError("response_mask marks a position the attention mask leaves out")
    rope = rope_positions(hf, {**inputs, "input_ids": ids.cpu()} if ids.is_cuda else inputs)
    lengths = attn.sum(-1).tolist()
    text = torch.cat([torch.arange(n) for n in lengths]).view(1, 1, -1)
    position_ids = torch.cat([text.to(rope.device), rope[:, attn].unsqueeze(1)], 0)
    # position (in the packed row) of each kept padded position; the hidden state at padded column
    # prompt_len - 1 + j predicts response token j
    where = torch.full(attn.shape, -1, dtype=torch.long)
    where[attn.cpu()] = torch.arange(int(attn.sum()))
    index = where[:, prompt_len - 1 : -1][valid.cpu()]
    if bool((index < 0).any()):
        raise ValueError("a valid response token has no kept predecessor (an empty prompt row?)")
    return Packed(
        input_ids=ids[attn].unsqueeze(0),
        position_ids=position_ids,
        index=index,
        lengths=lengths,
        pixel_values=inputs.get("pixel_values"),
        image_grid_thw=inputs.get("image_grid_thw"),
    )


def packed_hidden(hf, p: Packed) -> torch.Tensor:
    """Last hidden states of the packed row at `p.index`: (N, H), the rows `response_hidden(...)
    [response_mask]` gives in the padded layout. An image repeated over consecutive rows goes
    through the vision tower once (`vppo.rollout.shared_image_features`)."""
    device = next(hf.parameters()).device
    kw = {"input_ids": p.input_ids.to(device), "position_ids": p.position_ids.to(device)}
    if p.image_grid_thw is not None:
        pix, grid = p.pixel_values.to(device), p.image_grid_thw.to(device)
        feats = shared_image_features(hf.model, pix, grid)
        kw.update({"mm_encoder_outputs": {"image": feats}} if feats is not None else {"pixel_values": pix})
        kw["image_grid_thw"] = grid
    h = hf.model(**kw, attention_mask=None, use_cache=False).last_hidden_state  # (1, T, H)
    return h[0, p.index.to(device)]


# ---------------------------------------------------------------------------------------------
# Token-budget micro-batches.


def row_tokens(traj: Trajectory, packed: bool) -> list[int]:
    """Positions a pass computes per row: its valid tokens packed, the full width P + R padded."""
    if packed:
        return traj.attention_mask.sum(-1).tolist()
    return [traj.input_ids.shape[1]] * len(traj)


def micro_batches(
    traj: Trajectory, rows: int, max_tokens: int | None = None, *, packed: bool = False, reduce=None
) -> list[list[int]]:
    """Contiguous row index lists covering `traj` in order: `rows` rows each when max_tokens is None
    (the row-count micro-batches), else filled greedily up to max_tokens computed positions (a row
    longer than the budget alone), split further until every rank has as many micro-batches as the
    rank with the most (`reduce(tensor, op)` all-reduces over ranks: ZeRO-2/3 run collectives per
    forward / backward, so every rank must make the same number of passes)."""
    n = len(traj)
    if max_tokens is None:
        return [list(range(s, min(s + rows, n))) for s in range(0, n, rows)]
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1 or None, got {max_tokens}")
    cost = row_tokens(traj, packed)
    chunks, cur, used = [], [], 0
    for i, c in enumerate(cost):
        if cur and used + c > max_tokens:
            chunks.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += c
    if cur:
        chunks.append(cur)
    k = len(chunks)
    if reduce is not None:
        k = int(reduce(torch.tensor([k], dtype=torch.long), "max")[0])
    while len(chunks) < k:  # split the costliest splittable chunk at its token midpoint
        cand = [j for j, ch in enumerate(chunks) if len(ch) > 1]
        if not cand:
            raise ValueError(f"{n} rows cannot make the {k} micro-batches another rank needs")
        j = max(cand, key=lambda j: sum(cost[i] for i in chunks[j]))
        ch, half, acc, cut = chunks[j], sum(cost[i] for i in chunks[j]) / 2, 0, 1
        for m, i in enumerate(ch[:-1]):
            acc += cost[i]
            cut = m + 1
            if acc >= half:
                break
        chunks[j : j + 1] = [ch[:cut], ch[cut:]]
    return chunks


# ---------------------------------------------------------------------------------------------
# Length-balanced ranks.


def karmarkar_karp(sizes: list[int], parts: int) -> list[list[int]]:
    """Indices of `sizes` in `parts` groups of equal count (len(sizes) % parts == 0) with close
    sums: the largest-differencing method. Items are taken in descending order, `parts` at a time,
    each batch a partial solution of one item per group; the two partial solutions with the largest
    spread (max - min sum) are merged repeatedly, the heaviest group of one joined with the lightest
    of the other. Deterministic (ties broken by index); each group sorted ascending."""
    if parts < 1 or len(sizes) % parts:
        raise ValueError(f"{len(sizes)} items do not split into {parts} equal groups")
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    heap = []  # (-spread, tie, groups: list of (sum, [indices]) sorted by sum descending)
    for t, s in enumerate(range(0, len(order), parts)):
        groups = sorted(([sizes[i], [i]] for i in order[s : s + parts]), key=lambda g: -g[0])
        heapq.heappush(heap, (-(groups[0][0] - groups[-1][0]), t, groups))
    tie = len(heap)
    while len(heap) > 1:
        _, _, a = heapq.heappop(heap)
        _, _, b = heapq.heappop(heap)
        merged = [[ga[0] + gb[0], ga[1] + gb[1]] for ga, gb in zip(a, reversed(b))]
        merged.sort(key=lambda g: -g[0])
        heapq.heappush(heap, (-(merged[0][0] - merged[-1][0]), tie, merged))
        tie += 1
    return [sorted(g[1]) for g in heap[0][2]] if heap else [[] for _ in range(parts)]


def _pad_to(t: Trajectory, p: int, r: int, pad_id: int) -> dict:
    """The per-row fields of t as a dict, token rows re-padded to prompt width p, response width r."""
    left, right = p - t.prompt_len, r - t.response_mask.shape[1]

    def two(x, fill):
        return torch.cat([x.new_full((len(t), left), fill), x, x.new_full((len(t), right), fill)], 1)

    def resp(x):
        return None if x is None else torch.cat([x, x.new_zeros(len(t), right)], 1)

    out = {f: getattr(t, f) for f in t.__dataclass_fields__}
    out.update(
        input_ids=two(t.input_ids, pad_id), attention_mask=two(t.attention_mask, 0),
        mm_token_type_ids=two(t.mm_token_type_ids, 0), prompt_len=p,
    )  # fmt: skip
    for f in ("response_mask", "old_logp", "entropy", "kl", "k3", "ref_logp", "token_mask"):
        out[f] = resp(out[f])
    return out


def _cat(parts: list[Trajectory], pad_id: int) -> Trajectory:
    p = max(t.prompt_len for t in parts)
    r = max(t.response_mask.shape[1] for t in parts)
    dicts = [_pad_to(t, p, r, pad_id) for t in parts if len(t)]
    out = {}
    for f, v in dicts[0].items():
        if f == "prompt_len":
            out[f] = p
        elif v is None:
            out[f] = None
        elif isinstance(v, torch.Tensor):
            out[f] = torch.cat([d[f] for d in dicts])
        else:
            out[f] = [x for d in dicts for x in d[f]]
    return Trajectory(**out)


def balance(mb: Trajectory, world: int, pad_id: int) -> Trajectory:
    """This rank's rows of the global mini-batch after a Karmarkar-Karp partition of all ranks'
    rows by sequence length (valid tokens) into `world` equal-count parts: rank r keeps part r.

    Every rank holds len(mb) rows of the mini-batch before and after; the global mini-batch (its
    rows, advantages, scores) is unchanged, only which rank holds which row, so groups are split
    across ranks. Rows travel with every per-row field (token rows re-padded to the widest prompt
    and response); the received rows are in (source rank, row) order."""
    if world == 1:
        return mb
    import torch.distributed as dist

    rank = dist.get_rank()
    lengths = mb.attention_mask.sum(-1)
    every = [torch.zeros_like(lengths) for _ in range(world)]
    dist.all_gather(every, lengths)
    sizes = torch.cat(every).tolist()
    n = len(mb)
    owner = [0] * len(sizes)
    for r, part in enumerate(karmarkar_karp(sizes, world)):
        for g in part:
            owner[g] = r
    # what this rank sends to each rank, then one scatter per source rank
    outgoing = [mb.select([i for i in range(n) if owner[rank * n + i] == dst]) for dst in range(world)]
    received = []
    for src in range(world):
        box = [None]
        dist.scatter_object_list(box, outgoing if src == rank else None, src=src)
        received.append(box[0])
    return _cat(received, pad_id)


def pad_fraction(traj: Trajectory, packed: bool) -> float:
    """Fraction of the positions a pass over traj computes that are padding (0 when packed)."""
    if packed:
        return 0.0
    return 1.0 - float(traj.attention_mask.sum()) / max(traj.attention_mask.numel(), 1)


def update_inputs(hf, part: Trajectory, ids, packed: bool):
    """The update's forward inputs of one micro-batch (ids: `vppo.tokens.TokenIds`): the padded
    `vppo.rollout.model_inputs`, or those packed (`pack`)."""
    inputs = model_inputs(part, vision_ids=ids.vision, pad_id=ids.pad)
    return pack(hf, inputs, part.response_mask, part.prompt_len) if packed else inputs


def pass_options(train_cfg, reduce) -> dict:
    """The keyword arguments of `micro_batches` (and `vppo.loss.score`) from a run's train config."""
    return {"packed": train_cfg.packing, "max_tokens": train_cfg.max_tokens_per_micro, "reduce": reduce}


def set_boundary(engine, k: int, count: int, max_tokens: int | None) -> None:
    """With token-budget micro-batches their number per mini-batch varies, while DeepSpeed's
    gradient_accumulation_steps is fixed at init: mark the last one as the accumulation boundary so
    engine.step() steps exactly once per mini-batch (the loss scale, which carries the factor gas
    that DeepSpeed divides out, keeps the gradient the global token / sequence mean). Row-count
    micro-batches (max_tokens None) leave DeepSpeed's own counting alone."""
    if max_tokens is not None:
        engine.set_gradient_accumulation_boundary(k == count - 1)
