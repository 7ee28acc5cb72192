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
`balance` re-partitions rows across ranks by sequence length (train.balance_batch: each global
mini-batch, or the whole rollout batch as the released trainer's `_balance_batch`; the
Karmarkar-Karp partition is the released one, ties included).
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


class _Partial:
    """A partial solution of the largest-differencing method: `parts` groups, each [sum, members]
    with members the (index, size) pairs in the order they joined, kept heaviest first."""

    def __init__(self, groups: list[list]):
        self.groups = groups
        self._sort()

    def _sort(self) -> None:
        # heaviest first by (sum, count, members): a stable descending sort, so the order of the
        # groups (and which rank gets which) matches the released trainer's, ties included
        self.groups.sort(key=lambda g: (g[0], len(g[1]), g[1]), reverse=True)

    def heaviest(self) -> tuple:
        g = self.groups[0]
        return g[0], len(g[1]), g[1]

    def __lt__(self, other: _Partial) -> bool:  # the heap pops the largest spread first
        a = self.groups[0][0] - self.groups[-1][0]
        b = other.groups[0][0] - other.groups[-1][0]
        if a != b:
            return a > b
        return self.heaviest() > other.heaviest()  # equal spread: the heavier largest group first

    def merge(self, other: _Partial) -> None:  # heaviest of one with the lightest of the other
        for g, h in zip(self.groups, reversed(other.groups)):
            g[0] += h[0]
            g[1].extend(h[1])
        self._sort()


def karmarkar_karp(sizes: list[int], parts: int) -> list[list[int]]:
    """Indices of `sizes` in `parts` groups of equal count (len(sizes) % parts == 0) with close
    sums: the largest-differencing method, with the released trainer's conventions (its
    `_balance_batch` calls verl/utils/seqlen_balancing.py `get_seqlen_balanced_partitions(...,
    equal_size=True)`, repository huaixuheqing/VPPO-RL), so a batch gets the same partition, in
    the same rank order: items sorted ascending by (size, index) and taken `parts` at a time, the
    i-th smallest of a batch into group i; the two partial solutions of largest spread merged
    repeatedly (equal spreads: the one whose heaviest group is heavier first), the first popped
    keeping its place; groups ordered heaviest first by (sum, count, members in joining order);
    group r for rank r, its indices sorted ascending. Deterministic."""
    if parts < 1 or len(sizes) % parts:
        raise ValueError(f"{len(sizes)} items do not split into {parts} equal groups")
    order = sorted(range(len(sizes)), key=lambda i: (sizes[i], i))
    pq: list[_Partial] = []
    for s in range(0, len(order), parts):  # pushed one by one in ascending order, as released
        heapq.heappush(pq, _Partial([[sizes[i], [(i, sizes[i])]] for i in order[s : s + parts]]))
    while len(pq) > 1:
        a = heapq.heappop(pq)
        b = heapq.heappop(pq)
        a.merge(b)
        heapq.heappush(pq, a)
    if not pq:
        return [[] for _ in range(parts)]
    return [sorted(i for i, _ in g[1]) for g in pq[0].groups]


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


def rollout_position(rank: int, row: int, world: int, group: int) -> int:
    """Position in the global rollout batch of this rank's `row`, the rows coming in groups of
    `group` (the n responses of a prompt) dealt to ranks round-robin, as `vppo.sampling.sample_batch`
    deals prompts (global prompt p on rank p % world): the released trainer's batch order."""
    return ((row // group) * world + rank) * group + row % group


def balance(mb: Trajectory, world: int, pad_id: int, group: int = 1) -> Trajectory:
    """This rank's rows of a global batch (a mini-batch, or the whole rollout batch) after a
    Karmarkar-Karp partition of all ranks' rows by sequence length (valid tokens) into `world`
    equal-count parts (`karmarkar_karp`, the released partition): rank r keeps part r, its rows in
    ascending rollout position (`rollout_position` with `group` = rollout.n), as the released
    trainer reorders its batch and deals it in equal slices.

    Every rank holds len(mb) rows before and after; the global batch (its rows, advantages,
    scores) is unchanged, only which rank holds which row, so groups are split across ranks. Rows
    travel with every per-row field (token rows re-padded to the widest prompt and response)."""
    n = len(mb)
    if group < 1 or n % group:
        raise ValueError(f"{n} rows per rank are not whole groups of {group}")
    if world == 1:
        return mb
    import torch.distributed as dist

    rank = dist.get_rank()
    lengths = mb.attention_mask.sum(-1)
    every = [torch.zeros_like(lengths) for _ in range(world)]
    dist.all_gather(every, lengths)
    pos = [[rollout_position(r, i, world, group) for i in range(n)] for r in range(world)]
    sizes = [0] * (n * world)
    for r in range(world):
        for i, size in enumerate(every[r].tolist()):
            sizes[pos[r][i]] = size
    owner = [0] * len(sizes)
    for r, part in enumerate(karmarkar_karp(sizes, world)):
        for g in part:
            owner[g] = r
    # what this rank sends to each rank, then one scatter per source rank
    outgoing = [mb.select([i for i in range(n) if owner[pos[rank][i]] == dst]) for dst in range(world)]
    received = []
    for src in range(world):
        box = [None]
        dist.scatter_object_list(box, outgoing if src == rank else None, src=src)
        received.append(box[0])
    mine = [p for src in range(world) for p in pos[src] if owner[p] == rank]  # as received
    return _cat(received, pad_id).select(sorted(range(len(mine)), key=mine.__getitem__))


def pad_fraction(traj: Trajectory, packed: bool, reduce=None) -> float:
    """Fraction of the positions a pass over traj computes that are padding (0 when packed); over
    every rank's rows together when `reduce(tensor, "sum")` all-reduces (a logged statistic)."""
    if packed:
        return 0.0
    a = traj.attention_mask
    n = torch.tensor([float(a.sum()), float(a.numel())], dtype=torch.float64)
    n = reduce(n, "sum") if reduce is not None else n
    return 1.0 - float(n[0]) / max(float(n[1]), 1.0)


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
