"""Where the visual dependency falls: the spotlight testbed, its diagnostic and its picture.

    python -m vppo.spotlight --model runs/spotlight/export --out runs/spotlight/spotlight
    python -m vppo.spotlight --model PATH --problem "<image>How many red shapes are there?" \\
        --image shapes.png --answer 3 --out DIR

writes DIR/spotlight.html, DIR/spotlight.png (responses, each token coloured by its visual dependency,
the TGF top-k tokens boxed, the ground-truth visual tokens marked) and DIR/spotlight.json (the
diagnostic below). Any exported model works; without --problem the problems are the first
--problems rows of --data (default: the spotlight test split).

- `variant(name)`: the synthetic set and the tiny base of a task family (`data.synth`): "default" (the
  embedded default) or "spotlight" (vppo.synth.SPOTLIGHT_TASKS: read one value off the image, then
  compute with it; the generator knows which characters were read off the image).
- `precision_recall`: how well a token selection finds the ground-truth visual tokens.
- `diagnose`: on responses sampled from a model, the per-token exact KL and k3 between the clean and
  the perturbed image from the training loop's own passes (vppo.perturb, vppo.loss.score), the top-k
  masks they give (and entropy / random masks for comparison), and their precision / recall against
  the visual spans of vppo.synth.visual_spans; `dep_mass` is the share of the total dependency that
  falls on the visual tokens, `base_rate` the visual share of all tokens (a random mask's precision).
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from vppo import models, synth
from vppo.synth import SynthConfig
from vppo.tiny import TinyConfig

# The spotlight base stops its warm start a little higher than the default (30-40 % instead of
# 20-30 %): the family's text-only guess is ~21 %, so a base inside 20-30 % might not read the image.
SPOTLIGHT_TINY = dict(stop_low=0.3, stop_high=0.42, accept=(0.3, 0.4), max_new_tokens=40)
# The multiread base stops above its family's text-only guess (~28 %: the most common greatest height,
# the most common colour), like the spotlight base: a base at 20-30 % there guessed without the image.
MULTIREAD_TINY = dict(stop_low=0.35, stop_high=0.47, accept=(0.35, 0.45), max_new_tokens=48)
SCORES = ("kl", "k3", "entropy", "random")


def variant(name: str, family: str = "qwen2_5_vl") -> tuple[SynthConfig, TinyConfig]:
    """(synthetic set, tiny base) configs of the task family `name` (`data.synth`), the base of model
    family `family` (`model.tiny_family`; images resized to 2-3 cells of its grid on a side)."""
    if name not in synth.VARIANTS:
        raise ValueError(f"unknown synthetic variant {name!r}; known: {sorted(synth.VARIANTS)}")
    s = synth.VARIANTS[name]
    if name == "default":
        tiny_cfg = TinyConfig()
    else:
        tiny_cfg = TinyConfig(synth=s, **(MULTIREAD_TINY if name == "multiread" else SPOTLIGHT_TINY))
    if family != tiny_cfg.family:
        g = models.family(family).grid
        tiny_cfg = replace(tiny_cfg, family=family, min_pixels=(2 * g) ** 2, max_pixels=(3 * g) ** 2)
    return s, tiny_cfg


# ----------------------------------------------------------------------------------------------------
# ground truth on tokens, precision / recall


def token_pieces(tokenizer, ids: list[int]) -> list[str]:
    """The text each token adds to the decoded response (special tokens add ""), so that
    "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)."""
    pieces, prev = [], ""
    for i in range(len(ids)):
        cur = tokenizer.decode(ids[: i + 1], skip_special_tokens=True)
        pieces.append(cur[len(prev) :] if cur.startswith(prev) else cur)
        prev = cur
    return pieces


def visual_token_mask(pieces: list[str], spans: list[tuple[int, int]]) -> list[bool]:
    """Which tokens overlap a character span (start inclusive, end exclusive) of "".join(pieces)."""
    out, pos = [], 0
    for p in pieces:
        a, b = pos, pos + len(p)
        out.append(bool(p) and any(a < e and s < b for s, e in spans))
        pos = b
    return out


def precision_recall(selected, visual) -> dict:
    """Micro-averaged precision and recall of token selections against ground-truth visual tokens.

    selected, visual: sequences of equal-length boolean rows (lists or tensors), one row per
    response. precision = |selected & visual| / |selected|, recall = |selected & visual| / |visual|
    over all rows together; None when the denominator is 0. Also the counts.
    """
    tp = n_sel = n_vis = 0
    if len(selected) != len(visual):
        raise ValueError(f"{len(selected)} selected rows but {len(visual)} visual rows")
    for s, v in zip(selected, visual):
        s, v = [bool(x) for x in s], [bool(x) for x in v]
        if len(s) != len(v):
            raise ValueError(f"row lengths differ: {len(s)} selected vs {len(v)} visual")
        tp += sum(a and b for a, b in zip(s, v))
        n_sel += sum(s)
        n_vis += sum(v)
    return {
        "precision": tp / n_sel if n_sel else None,
        "recall": tp / n_vis if n_vis else None,
        "hits": tp,
        "selected": n_sel,
        "visual": n_vis,
    }


def topk_rows(scores: list[list[float]], ratio: float) -> list[list[bool]]:
    """Per row the ceil(ratio * L) highest scores (ties to the lower position), as TGF selects."""
    out = []
    for row in scores:
        k = math.ceil(ratio * len(row) - 1e-9) if row else 0
        order = sorted(range(len(row)), key=lambda i: (-row[i], i))[:k]
        keep = set(order)
        out.append([i in keep for i in range(len(row))])
    return out


# ----------------------------------------------------------------------------------------------------
# sampling and scoring


@dataclass
class Scored:
    """One sampled response: its tokens, per-token scores, the ground truth and the top-k masks."""

    problem: str
    answer: str
    task: str
    image_png: bytes
    text: str
    reward: float
    pieces: list[str]
    scores: dict[str, list[float]]  # kl, k3, entropy, random
    visual: list[bool] | None  # None: off format or no ground truth
    masks: dict[str, list[bool]]


def load_for_scoring(path: str):
    """(hf model with the loop's FusedLMHead, processor, TokenIds) of a local model folder."""
    from vppo.config import Config
    from vppo.data import load_processor
    from vppo.model import load_policy
    from vppo.tokens import token_ids

    cfg = Config()
    cfg.model.path = str(path)
    processor = load_processor(path, cfg.data.min_pixels, cfg.data.max_pixels)
    hf = load_policy(cfg).eval()
    return hf, processor, token_ids(hf, processor)


def sample_and_score(
    hf,
    processor,
    ids,
    problems,
    *,
    samples: int = 2,
    max_new_tokens: int = 64,
    seed: int = 0,
    suffix: str | None = None,
    ratio: float = 0.4,
    dependency: str = "k3",
    algo=None,
) -> list[Scored]:
    """`samples` responses per problem at T = 1 (seeded), scored as the training loop scores them."""
    from vppo import loss
    from vppo.config import AlgoConfig
    from vppo.data import encode_prompts
    from vppo.perturb import PerturbSpec, perturb_pixel_values, trajectory_seed
    from vppo.reward import Grader
    from vppo.rollout import GenSettings, generate

    algo = algo or AlgoConfig()
    torch.manual_seed(seed)
    traj = generate(
        hf,
        encode_prompts(problems, processor, suffix),
        samples,
        GenSettings(1.0, 1.0, 0, max_new_tokens),
        eos_ids=ids.eos,
        pad_id=ids.pad,
        suppress_ids=ids.vision,
        vision_start_id=ids.vision_start,
        tokenizer=processor.tokenizer,
    )
    spec, ip = PerturbSpec.from_config(algo), processor.image_processor
    traj.masked_pixel_values = [
        perturb_pixel_values(
            p, g, spec, [trajectory_seed(seed, "spotlight", i, j) for j in range(len(g))], ip
        )
        if len(g)
        else p
        for i, (p, g) in enumerate(zip(traj.pixel_values, traj.image_grid_thw))
    ]
    loss.score(hf, traj, loss.LossOptions(), ids=ids, micro=64, dependency=True)
    answers = [problems[int(g)].answer for g in traj.group]
    grader = Grader()
    try:
        rewards, _ = grader.grade(traj.texts, answers)
    finally:
        grader.close()
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(len(traj)):
        p = problems[int(traj.group[i])]
        valid = traj.response_mask[i]
        tok = traj.responses[i][valid].tolist()
        pieces = token_pieces(processor.tokenizer, tok)
        text = "".join(pieces)
        rand = torch.rand(len(tok), generator=gen).tolist()
        scores = {k: getattr(traj, k)[i][valid].tolist() for k in ("kl", "k3", "entropy")}
        scores["random"] = rand
        spans = synth.visual_spans(p.meta.get("task", ""), text)
        masks = {k: topk_rows([v], ratio)[0] for k, v in scores.items()}
        masks["tgf"] = masks[dependency]
        out.append(
            Scored(
                problem=p.problem,
                answer=p.answer,
                task=p.meta.get("task", ""),
                image_png=_png_bytes(p),
                text=text,
                reward=float(rewards[i]),
                pieces=pieces,
                scores=scores,
                visual=visual_token_mask(pieces, spans) if spans else None,
                masks=masks,
            )
        )
    return out


def _png_bytes(problem) -> bytes:
    imgs = problem.pil_images()
    if not imgs:
        return b""
    buf = io.BytesIO()
    imgs[0].save(buf, format="PNG")
    return buf.getvalue()


def summarize(rows: list[Scored], ratio: float = 0.4) -> dict:
    """Precision / recall of each score's top-k mask against the visual tokens, the dependency mass on
    them, over the responses that follow the format (`parsed`), overall and per task."""

    def one(rs: list[Scored]) -> dict:
        known = [r for r in rs if r.visual is not None and any(r.visual)]
        res = {"responses": len(rs), "parsed": len(known)}
        if not known:
            return res
        vis = [r.visual for r in known]
        n_tok = sum(len(v) for v in vis)
        res["base_rate"] = sum(map(sum, vis)) / n_tok
        res["tokens_per_response"] = n_tok / len(known)
        for k in SCORES:
            pr = precision_recall([r.masks[k] for r in known], vis)
            res[f"{k}_precision"], res[f"{k}_recall"] = pr["precision"], pr["recall"]
            # R-precision: the top-|visual| tokens of each row by this score
            top = [
                [
                    i
                    in set(
                        sorted(range(len(r.scores[k])), key=lambda j: (-r.scores[k][j], j))[: sum(r.visual)]
                    )
                    for i in range(len(r.visual))
                ]
                for r in known
            ]
            res[f"{k}_rprec"] = precision_recall(top, vis)["precision"]
        for k in ("kl", "k3"):
            tot = sum(max(0.0, x) for r in known for x in r.scores[k])
            on = sum(max(0.0, x) for r in known for x, v in zip(r.scores[k], r.visual) if v)
            res[f"{k}_dep_mass"] = on / tot if tot > 0 else None
        return res

    out = {"ratio": ratio, "all": one(rows)}
    for t in sorted({r.task for r in rows}):
        out[t] = one([r for r in rows if r.task == t])
    return out


def diagnose(model_path: str, problems, **kw) -> dict:
    """summarize(sample_and_score(...)) of a model folder on `problems`."""
    from vppo.data import load_prompt_suffix

    hf, processor, ids = load_for_scoring(model_path)
    kw.setdefault("suffix", load_prompt_suffix(model_path))
    return summarize(sample_and_score(hf, processor, ids, problems, **kw), kw.get("ratio", 0.4))


def report_line(summary: dict) -> str:
    """The eval report's paragraph on where the dependency falls (vppo.eval --spotlight N)."""
    a = summary.get("all", {})
    if not a.get("parsed"):
        return "\nSpotlight: no response followed the format (no ground-truth visual tokens).\n"
    pct = lambda k: f"{100 * a[k]:.0f} %" if a.get(k) is not None else "n/a"  # noqa: E731
    pr = f"recall k3 {pct('k3_recall')}, KL {pct('kl_recall')} (precision k3 {pct('k3_precision')})"
    rp = ", ".join(f"{k if k != 'kl' else 'KL'} {pct(k + '_rprec')}" for k in SCORES)
    return (
        f"\nSpotlight ({a['parsed']} of {a['responses']} responses with known visual tokens, "
        f"{pct('base_rate')} of their tokens): top-{100 * summary['ratio']:.0f} % mask {pr}; "
        f"R-precision {rp}; "
        f"share of the k3 dependency on the visual tokens {pct('k3_dep_mass')}.\n"
    )


# ----------------------------------------------------------------------------------------------------
# at every validation of a training run (run.spotlight_problems)

# the numbers of summarize()["all"] a run logs at validation, as spot_<name> (None ones are left out)
RUN_KEYS = (
    "parsed_frac", "base_rate", "k3_precision", "k3_recall", "kl_recall",
    "k3_rprec", "kl_rprec", "entropy_rprec", "random_rprec", "k3_dep_mass", "kl_dep_mass",
)  # fmt: skip


def validation_problems(problems, n: int, where: str) -> list:
    """The first n problems whose task has known visual spans (vppo.synth.VISUAL_PATTERNS); a clear
    error when n > 0 and `where` (e.g. "data.val=...") has none."""
    out = [p for p in problems if p.meta.get("task") in synth.VISUAL_PATTERNS][:n]
    if n and not out:
        raise ValueError(
            f"run.spotlight_problems={n}: no problem of {where} has known visual tokens (its tasks must "
            f"be among {sorted(synth.VISUAL_PATTERNS)}: data.synth=spotlight)"
        )
    return out


def validation_metrics(
    hf,
    processor,
    ids,
    problems,
    algo,
    *,
    step: int,
    seed: int,
    suffix: str | None,
    max_new_tokens: int,
    out_dir: Path | None,
    samples: int = 2,
    show: int = 6,
) -> dict:
    """The diagnostic on the live policy at a validation: spot_* numbers for the run's metrics and,
    when `out_dir` is given (rank 0), the samples drawn in out_dir/step_<step>/ (HTML, PNG, JSON).

    Seeded by (seed, step) and run inside a forked RNG, so it leaves the training's random stream
    as it found it; the scores come from the loop's own perturbation and scoring pass with the
    run's algo (perturbation, dependency, top-k ratio)."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        rows = sample_and_score(
            hf, processor, ids, problems, samples=samples, max_new_tokens=max_new_tokens,
            seed=seed * 1_000_003 + step, suffix=suffix, ratio=algo.topk_ratio,
            dependency=algo.dependency, algo=algo,
        )  # fmt: skip
    summary = summarize(rows, algo.topk_ratio)
    a = dict(summary["all"])
    a["parsed_frac"] = a["parsed"] / a["responses"] if a["responses"] else 0.0
    if out_dir is not None:
        write_view(rows, summary, Path(out_dir) / f"step_{step:06d}", algo.dependency, show,
                   title=f"VPPO spotlight, step {step}")  # fmt: skip
    return {f"spot_{k}": a[k] for k in RUN_KEYS if a.get(k) is not None}


# ----------------------------------------------------------------------------------------------------
# the picture


def _colour(x: float, top: float) -> tuple[float, float, float]:
    """White -> orange -> red as the dependency goes from 0 to `top` (square-root scale)."""
    t = math.sqrt(max(0.0, min(1.0, x / top))) if top > 0 else 0.0  # sqrt: small values stay visible
    return (1.0, 1.0 - 0.55 * t, 1.0 - 0.95 * t)


def render_html(
    rows: list[Scored], out: str | Path, score: str = "k3", title: str = "VPPO spotlight"
) -> Path:
    """An HTML page: per response the image, the prompt, each token's background its `score`, the
    TGF mask boxed, the ground-truth visual tokens underlined; values in the tooltips."""
    out = Path(out)
    top = max((max(r.scores[score], default=0.0) for r in rows), default=0.0) or 1.0
    parts = [
        "<!DOCTYPE html>",
        f'<html><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>',
        "body{font-family:sans-serif;margin:1em} .r{margin:0.6em 0;display:flex;gap:1em}",
        ".t{font-family:monospace;white-space:pre;padding:1px 0} .m{outline:2px solid #1f5fbf}",
        ".v{text-decoration:underline 3px #2a2} img{width:84px;height:84px;image-rendering:pixelated}",
        "</style></head><body>",
        f"<h2>{html.escape(title)}</h2>",
        f"<p>Background: per-token dependency ({html.escape(score)}, clean vs perturbed image; darkest = "
        f"{top:.3g}). <span class='t m'>boxed</span>: the TGF top-k mask. "
        "<span class='t v'>underlined</span>: read off the image (ground truth).</p>",
    ]
    for r in rows:
        img = base64.b64encode(r.image_png).decode() if r.image_png else ""
        toks = []
        for j, (p, s) in enumerate(zip(r.pieces, r.scores[score])):
            c = _colour(s, top)
            cls = "t" + (" m" if r.masks["tgf"][j] else "") + (" v" if r.visual and r.visual[j] else "")
            tip = ", ".join(f"{k} {r.scores[k][j]:.4g}" for k in ("kl", "k3", "entropy"))
            bg = f"rgb({int(255 * c[0])},{int(255 * c[1])},{int(255 * c[2])})"
            toks.append(f'<span class="{cls}" style="background:{bg}" title="{tip}">{html.escape(p)}</span>')
        parts.append(
            f'<div class="r"><img alt="image" src="data:image/png;base64,{img}"><div>'
            f"<div>{html.escape(r.problem)} <b>answer {html.escape(r.answer)}</b> "
            f"(reward {r.reward:g}, task {html.escape(r.task)})</div><div>{''.join(toks)}</div></div></div>"
        )
    parts.append("</body></html>")
    out.write_text("\n".join(parts), encoding="utf-8")
    return out


def render_png(rows: list[Scored], out: str | Path, score: str = "k3", max_chars: int = 90) -> Path:
    """The same picture as a PNG (matplotlib): one line per response, tokens in monospace boxes."""
    import matplotlib  # heavy: the plot only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg")
    from PIL import Image

    out = Path(out)
    top = max((max(r.scores[score], default=0.0) for r in rows), default=0.0) or 1.0
    n = max(1, len(rows))
    height = 0.8 * n + 0.5
    fig = plt.figure(figsize=(12, height))
    renderer = fig.canvas.get_renderer()
    fig_w = fig.get_figwidth() * fig.dpi
    row_h = 0.8 / height  # one response, in figure fraction
    for i, r in enumerate(rows):
        y = 1 - (i + 0.75) * row_h
        if r.image_png:
            ax = fig.add_axes((0.005, y - 0.45 * row_h, 0.9 * row_h * height / 12, 0.9 * row_h))
            ax.imshow(Image.open(io.BytesIO(r.image_png)).convert("RGB"))
            ax.axis("off")
        x = 0.08
        prompt = r.problem.replace("<image>", "")[: max_chars + 30]
        fig.text(
            x,
            y + 0.3 * row_h,
            f"{prompt}  (answer {r.answer}, reward {r.reward:g})",
            fontsize=7,
            color="#444",
        )
        for j, (p, s) in enumerate(zip(r.pieces, r.scores[score])):
            if not p or x > 0.97:
                continue
            edge = "#1f5fbf" if r.masks["tgf"][j] else "none"
            t = fig.text(
                x,
                y,
                "".join(c if c.isprintable() else "\u00b7" for c in p).replace(
                    "$", r"\$"
                ),  # control chars: a dot
                family="monospace",
                fontsize=8,
                va="center",
                bbox=dict(boxstyle="square,pad=0.15", fc=_colour(s, top), ec=edge, lw=1.2),
            )
            if r.visual and r.visual[j]:
                t.set_color("#0a7a0a")
                t.set_fontweight("bold")
            x += t.get_window_extent(renderer).width / fig_w + 0.002
    fig.text(
        0.1,
        0.01,
        f"colour: {score} dependency (darkest {top:.3g}); blue box: TGF top-k; green bold: read off "
        "the image (ground truth)",
        fontsize=7,
    )
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _to_json(rows: list[Scored]) -> list[dict]:
    return [
        {
            "problem": r.problem,
            "answer": r.answer,
            "task": r.task,
            "text": r.text,
            "reward": r.reward,
            "pieces": r.pieces,
            "scores": r.scores,
            "visual": r.visual,
            "tgf": r.masks["tgf"],
        }
        for r in rows
    ]


def write_view(rows: list[Scored], summary: dict, out: Path, score: str, show: int, title: str) -> None:
    """out/spotlight.html and .png (the first `show` responses) and out/spotlight.json (all)."""
    out.mkdir(parents=True, exist_ok=True)
    render_html(rows[:show], out / "spotlight.html", score, title=title)
    render_png(rows[:show], out / "spotlight.png", score)
    body = {"summary": summary, "responses": _to_json(rows)}
    (out / "spotlight.json").write_text(json.dumps(body, indent=1))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a local model folder (a run's export/, the tiny base)")
    ap.add_argument("--out", default="runs/spotlight_view", help="output folder")
    ap.add_argument("--data", default=None, help="parquet of problems (default: the spotlight test split)")
    ap.add_argument("--problems", type=int, default=4, help="first N problems of --data")
    ap.add_argument("--problem", default=None, help="one problem text with <image> (needs --image)")
    ap.add_argument("--image", default=None)
    ap.add_argument("--answer", default="", help="ground truth of --problem (for the reward)")
    ap.add_argument("--task", default="", help="synth task of --problem (for the ground-truth spans)")
    ap.add_argument("--samples", type=int, default=2, help="responses per problem")
    ap.add_argument("--ratio", type=float, default=0.4, help="TGF top-k ratio")
    ap.add_argument("--dependency", choices=("k3", "kl"), default="k3", help="the score TGF ranks by")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--show", type=int, default=8, help="responses drawn in the HTML / PNG (all are scored)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from vppo.data import IMAGE_PLACEHOLDER, Problem, load_problems, load_prompt_suffix

    # bad input fails here, in one line, before the model loads (a traceback from the loader otherwise)
    if not (Path(args.model) / "config.json").is_file():
        ap.error(f"--model {args.model}: not a model folder (no config.json there)")
    if args.data is not None and not Path(args.data).exists():
        ap.error(f"--data {args.data}: no such file or folder")
    if args.problem is not None:
        if not args.image:
            ap.error("--problem needs --image")
        if args.problem.count(IMAGE_PLACEHOLDER) != 1:
            ap.error(f"--problem needs one {IMAGE_PLACEHOLDER} where --image goes, got {args.problem!r}")
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(args.image) as im:
                size = im.size
                im.verify()  # a truncated or corrupt file fails here, not in the processor
        except FileNotFoundError:
            ap.error(f"--image {args.image}: no such file")
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            ap.error(f"--image {args.image}: not a readable image ({e})")
        problems = [Problem("cli[0]", args.problem, args.answer, (args.image,), (size,), {"task": args.task})]
    else:
        src = args.data or str(
            Path(__import__("vppo.synth").synth.ensure_synth_data(variant("spotlight")[0]))
        )
        problems = list(load_problems(src, "test" if args.data is None else None))[: args.problems]
    hf, processor, ids = load_for_scoring(args.model)
    rows = sample_and_score(
        hf,
        processor,
        ids,
        problems,
        samples=args.samples,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        suffix=load_prompt_suffix(args.model),
        ratio=args.ratio,
        dependency=args.dependency,
    )
    out = Path(args.out)
    summary = summarize(rows, args.ratio)
    write_view(rows, summary, out, args.dependency, args.show, title=f"VPPO spotlight: {args.model}")
    print(json.dumps(summary["all"], indent=1))
    print(f"wrote {out}/spotlight.html, spotlight.png, spotlight.json")
    return summary


if __name__ == "__main__":
    main()
