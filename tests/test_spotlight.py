"""vppo.spotlight (ground truth on tokens, precision / recall, rendering, CLI) and the TGF token
selections of vppo.objective.selection_stats (issue 15)."""

import html.parser
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from vppo import objective, spotlight, synth
from vppo.config import load_config
from vppo.loss import tgf_token_mask

# ----------------------------------------------------------------------------------------------------
# precision / recall by hand


def test_precision_recall_by_hand():
    sel = [[1, 1, 0, 0], [0, 1, 1]]
    vis = [[1, 0, 0, 0], [0, 0, 0]]
    pr = spotlight.precision_recall(sel, vis)
    # hits 1 (row 0, position 0); selected 4; visual 1
    assert pr == {"precision": 0.25, "recall": 1.0, "hits": 1, "selected": 4, "visual": 1}
    pr = spotlight.precision_recall([[0, 1, 0], [1, 0]], [[1, 0, 1], [0, 1]])
    assert pr["precision"] == 0.0 and pr["recall"] == 0.0
    empty = spotlight.precision_recall([[0, 0]], [[0, 0]])
    assert empty["precision"] is None and empty["recall"] is None
    assert (
        spotlight.precision_recall(torch.tensor([[True, False]]), torch.tensor([[True, True]]))["recall"]
        == 0.5
    )
    with pytest.raises(ValueError, match="row lengths"):
        spotlight.precision_recall([[1, 0]], [[1]])
    with pytest.raises(ValueError, match="rows"):
        spotlight.precision_recall([[1]], [])


def test_topk_rows_is_ceil_ratio_ties_low():
    rows = spotlight.topk_rows([[0.1, 0.5, 0.5, 0.2, 0.0], [3.0], []], 0.4)
    assert rows == [[False, True, True, False, False], [True], []]  # ceil(2.0) = 2, ceil(0.4) = 1


def test_visual_tokens_from_character_spans():
    pieces = ["<think>", " there", " are", " ", "1", "2", " red", ""]
    text = "".join(pieces)
    spans = synth.visual_spans("count_add", text)
    assert [text[a:b] for a, b in spans] == ["12"]
    assert spotlight.visual_token_mask(pieces, spans) == [False] * 4 + [True, True] + [False, False]


def test_token_pieces_rejoin_the_decoded_text():
    from vppo.tiny import build_tokenizer

    rows = synth.make_split(
        synth.SynthConfig(tasks=synth.SPOTLIGHT_TASKS, n_train=30, n_val=1, n_test=1), "train"
    )
    tok = build_tokenizer([r["response"] for r in rows] * 3, vocab_size=300)
    for r in rows[:6]:
        ids = tok(r["response"], add_special_tokens=False)["input_ids"] + [
            tok.convert_tokens_to_ids("<|im_end|>")
        ]
        pieces = spotlight.token_pieces(tok, ids)
        assert "".join(pieces) == r["response"] and pieces[-1] == ""
        vis = spotlight.visual_token_mask(pieces, json.loads(r["visual_spans"]))
        read = "".join(p for p, v in zip(pieces, vis) if v)
        ((a, b),) = json.loads(r["visual_spans"])
        assert read.strip() == r["response"][a:b] and sum(vis) >= 1  # a token may carry the space before


# ----------------------------------------------------------------------------------------------------
# token selection (algo.token_select)


def _traj():
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    kl = torch.tensor([[0.1, 0.9, 0.0, 0.3, 0.2], [0.5, 0.0, 0.4, 0, 0]])
    ent = torch.tensor([[2.0, 0.0, 1.0, 0.0, 3.0], [0.0, 1.0, 0.5, 0, 0]])
    return SimpleNamespace(kl=kl, k3=kl * 2, entropy=ent, response_mask=mask)


def test_selection_dependency_entropy_random():
    t = _traj()
    assert objective.selection_stats(t, "dependency") is t
    dep = tgf_token_mask(t, t.response_mask, 0.4, kind="k3", impl="torch")
    assert dep.tolist() == [[0, 1, 0, 1, 0], [1, 0, 1, 0, 0]]
    ent = tgf_token_mask(
        objective.selection_stats(t, "entropy"), t.response_mask, 0.4, kind="k3", impl="torch"
    )
    assert ent.tolist() == [[1, 0, 0, 0, 1], [0, 1, 1, 0, 0]]
    r1 = objective.selection_stats(t, "random", seed=7)
    r2 = objective.selection_stats(t, "random", seed=7)
    r3 = objective.selection_stats(t, "random", seed=8)
    assert torch.equal(r1.k3, r2.k3) and not torch.equal(r1.k3, r3.k3) and torch.equal(r1.kl, r1.k3)
    m = tgf_token_mask(r1, t.response_mask, 0.4, kind="kl", impl="torch")
    assert m.sum(-1).tolist() == [2, 2] and not (m & ~t.response_mask).any()
    # over many seeds every valid token gets picked: no positional bias
    hits = sum(
        tgf_token_mask(objective.selection_stats(t, "random", s), t.response_mask, 0.4, impl="torch").int()
        for s in range(200)
    )
    assert (hits[t.response_mask] > 40).all()
    with pytest.raises(ValueError, match="select"):
        objective.selection_stats(t, "loudest")
    with pytest.raises(ValueError, match="entropy"):
        objective.selection_stats(SimpleNamespace(entropy=None, response_mask=t.response_mask), "entropy")


def test_token_select_config():
    assert load_config(None).algo.token_select == "dependency"
    assert load_config(None, ["algo.token_select=entropy"]).algo.token_select == "entropy"
    with pytest.raises(ValueError, match="token_select"):
        load_config(None, ["algo.token_select=random", "algo.topk_ratio=1.0"])
    with pytest.raises(ValueError):
        load_config(None, ["algo.token_select=loudest"])
    assert load_config(None, ["data.synth=spotlight"]).data.synth == "spotlight"
    s, t = spotlight.variant("spotlight")
    assert s.tasks == synth.SPOTLIGHT_TASKS and t.synth == s
    assert spotlight.variant("default")[1] == spotlight.TinyConfig()
    with pytest.raises(ValueError, match="variant"):
        spotlight.variant("nope")


# ----------------------------------------------------------------------------------------------------
# summary and rendering on hand-made responses


def _png() -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("RGB", (84, 84), (128, 128, 128)).save(buf, format="PNG")
    return buf.getvalue()


def _rows():
    pieces = ["<think>", " there", " are", " ", "4", " red", " .", " 4", " + ", "3", "<&>", ""]
    n = len(pieces)
    vis = [False] * n
    vis[4] = True
    kl = [0.0] * n
    kl[4], kl[7] = 2.0, 0.5
    scores = {"kl": kl, "k3": [2 * x for x in kl], "entropy": [0.1] * n, "random": [i / n for i in range(n)]}
    masks = {k: spotlight.topk_rows([v], 0.4)[0] for k, v in scores.items()}
    masks["tgf"] = masks["k3"]
    a = spotlight.Scored(
        "<image>How many red shapes are there? Add 3",
        "7",
        "count_add",
        _png(),
        "".join(pieces),
        1.0,
        pieces,
        scores,
        vis,
        masks,
    )
    off = spotlight.Scored(
        "<image>q",
        "2",
        "count_add",
        b"",
        "junk",
        0.0,
        ["junk"],
        {k: [0.0] for k in scores},
        None,
        {k: [True] for k in [*scores, "tgf"]},
    )
    return [a, off]


def test_summarize_by_hand():
    s = spotlight.summarize(_rows(), 0.4)["all"]
    assert s["responses"] == 2 and s["parsed"] == 1
    n = 12
    assert s["base_rate"] == pytest.approx(1 / n)
    k = 5  # ceil(0.4 * 12)
    assert s["kl_precision"] == pytest.approx(1 / k) and s["kl_recall"] == 1.0
    assert s["kl_rprec"] == 1.0  # the top-1 token is the visual one
    assert s["kl_dep_mass"] == pytest.approx(2.0 / 2.5)
    assert s["random_recall"] == 0.0  # the top random scores are the last positions here


class _Checker(html.parser.HTMLParser):
    VOID = {"meta", "img", "br"}

    def __init__(self):
        super().__init__()
        self.stack, self.spans = [], 0

    def handle_starttag(self, tag, attrs):
        if tag == "span":
            self.spans += 1
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, (tag, self.stack)
        self.stack.pop()


def test_render_html_and_png(tmp_path):
    rows = _rows()
    h = spotlight.render_html(rows, tmp_path / "s.html")
    text = h.read_text()
    assert text.startswith("<!DOCTYPE html>") and "&lt;&amp;&gt;" in text  # escaped token
    c = _Checker()
    c.feed(text)
    c.close()
    assert c.stack == [] and c.spans >= 12
    assert text.count('class="t m') == sum(rows[0].masks["tgf"]) + sum(rows[1].masks["tgf"])
    assert "t v" in text and "data:image/png;base64," in text
    p = spotlight.render_png(rows, tmp_path / "s.png")
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(p) as im:
        im.verify()
    with Image.open(p) as im:
        assert im.size[0] > 500 and im.size[1] > 100


# ----------------------------------------------------------------------------------------------------
# the command on an exported model


def test_cli_on_a_micro_model(tmp_path):
    from helpers import make_micro_model, subprocess_env

    model = make_micro_model(tmp_path / "m")
    data = tmp_path / "d"
    synth.write_synth(synth.SynthConfig(tasks=synth.SPOTLIGHT_TASKS, n_train=6, n_val=3, n_test=3), data)
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "vppo.spotlight",
        "--model",
        str(model),
        "--data",
        str(data / "test.parquet"),
        "--problems",
        "2",
        "--samples",
        "2",
        "--max-new-tokens",
        "8",
        "--out",
        str(out),
        "--threads",
        "1",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "spotlight.json").read_text())
    assert res["summary"]["all"]["responses"] == 4 and len(res["responses"]) == 4
    for resp in res["responses"]:
        n = len(resp["pieces"])
        assert all(len(v) == n for v in resp["scores"].values()) and len(resp["tgf"]) == n
        assert all(x >= -1e-6 for x in resp["scores"]["kl"])
    assert (out / "spotlight.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "spotlight.html").read_text().startswith("<!DOCTYPE html>")


def test_report_line():
    line = spotlight.report_line(spotlight.summarize(_rows(), 0.4))
    assert "1 of 2 responses" in line and "recall k3 100 %" in line and "random 0 %" in line
    assert "no response" in spotlight.report_line({"all": {"responses": 3, "parsed": 0}})


# ----------------------------------------------------------------------------------------------------
# at every validation of a training run (run.spotlight_problems)


def test_validation_metrics_are_the_summary_and_draw_the_samples(tmp_path, monkeypatch):
    from vppo.config import AlgoConfig

    seen = {}

    def fake(hf, processor, ids, problems, **kw):
        seen.update(kw)
        torch.manual_seed(kw["seed"])  # as the real sampler does
        torch.rand(3)
        return _rows()

    monkeypatch.setattr(spotlight, "sample_and_score", fake)
    algo = AlgoConfig(topk_ratio=0.4, dependency="kl")
    rng = torch.get_rng_state()
    rec = spotlight.validation_metrics(
        None, None, None, ["p"], algo, step=7, seed=3, suffix="S", max_new_tokens=9, out_dir=tmp_path
    )
    assert torch.equal(torch.get_rng_state(), rng)  # the training's random stream is left as it was
    s = spotlight.summarize(_rows(), 0.4)["all"]
    assert rec["spot_parsed_frac"] == 0.5 and rec["spot_base_rate"] == pytest.approx(1 / 12)
    assert rec["spot_kl_rprec"] == 1.0 and rec["spot_kl_dep_mass"] == pytest.approx(0.8)
    keys = [k for k in spotlight.RUN_KEYS if s.get(k) is not None]
    assert {k: rec[f"spot_{k}"] for k in keys} == {k: s[k] for k in keys}
    # the run's algo reaches the scoring; the seed moves with the step
    assert seen["dependency"] == "kl" and seen["ratio"] == 0.4 and seen["algo"] is algo
    assert seen["max_new_tokens"] == 9 and seen["suffix"] == "S"
    d = tmp_path / "step_000007"
    assert (d / "spotlight.png").read_bytes()[:4] == b"\x89PNG"
    assert (d / "spotlight.html").read_text().startswith("<!DOCTYPE html>")
    assert json.loads((d / "spotlight.json").read_text())["summary"]["all"] == s
    rec8 = spotlight.validation_metrics(
        None, None, None, ["p"], algo, step=8, seed=3, suffix="S", max_new_tokens=9, out_dir=None
    )
    assert rec8 == rec and not (tmp_path / "step_000008").exists()  # out_dir=None (ranks > 0): no files


def _spot_assets(tmp_path):
    from helpers import make_micro_model

    data = tmp_path / "d"
    synth.write_synth(synth.SynthConfig(tasks=synth.SPOTLIGHT_TASKS, n_train=16, n_val=4, n_test=2), data)
    return make_micro_model(tmp_path / "m"), data


def test_run_logs_the_diagnostic_at_every_validation_without_changing_training(tmp_path):
    from helpers import train_overrides

    from vppo.config import load_config
    from vppo.metrics import read_metrics
    from vppo.train import train

    assets = _spot_assets(tmp_path)
    val = ("run.val_every=1", "run.val_samples=4", "rollout.val_n=1", "train.total_steps=2")
    recs = {}
    for n in (0, 2):
        out = tmp_path / f"run{n}"
        train(load_config(None, train_overrides(assets, out, *val, f"run.spotlight_problems={n}")))
        recs[n] = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in recs[2]] == [0, 1, 2]
    for r in recs[2]:
        assert 0.0 <= r["spot_parsed_frac"] <= 1.0
        d = tmp_path / "run2" / "spotlight" / f"step_{r['step']:06d}"
        res = json.loads((d / "spotlight.json").read_text())
        assert len(res["responses"]) == 2 * 2  # 2 problems x 2 responses
        a = res["summary"]["all"]
        assert r["spot_parsed_frac"] == a["parsed"] / a["responses"]
        assert {k: r[k] for k in r if k.startswith("spot_") and k != "spot_parsed_frac"} == {
            f"spot_{k}": a[k] for k in spotlight.RUN_KEYS if a.get(k) is not None
        }
        assert (d / "spotlight.png").read_bytes()[:4] == b"\x89PNG"
        assert (d / "spotlight.html").read_text().startswith("<!DOCTYPE html>")
    assert not (tmp_path / "run0" / "spotlight").exists()
    # the diagnostic runs in a forked RNG: the training is the same with it as without it
    timing = ("time", "_s", "tokens_per_s", "samples_per_s")

    def train_keys(r):
        return {k: v for k, v in r.items() if not k.startswith("spot_") and not any(t in k for t in timing)}

    assert [train_keys(r) for r in recs[2]] == [train_keys(r) for r in recs[0]]


def test_spotlight_problems_need_known_visual_tokens_and_validation(tmp_path):
    from helpers import make_micro_model, make_synth, train_setup

    from vppo.config import load_config

    assets = (make_micro_model(tmp_path / "m"), make_synth(tmp_path / "d", n_train=8, n_val=2, n_test=2))
    with pytest.raises(ValueError, match=r"run.spotlight_problems=2: no problem of data.val=.*known visual"):
        train_setup(assets, tmp_path / "r", "run.val_every=1", "run.spotlight_problems=2")
    with pytest.raises(ValueError, match=r"run.spotlight_problems.*needs run.val_every > 0"):
        load_config(None, ["run.val_every=0", "run.spotlight_problems=2"])
