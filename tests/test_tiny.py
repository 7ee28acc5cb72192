import json
from dataclasses import replace

import pytest
import torch
from helpers import FAMILIES

from vppo import tiny
from vppo.data import encode_prompts, load_problems, render_prompt, vision_token_ids
from vppo.models import family
from vppo.synth import SynthConfig, ensure_synth_data
from vppo.tiny import SPECIAL_TOKENS, TinyConfig

# A micro build: same code path as the default, a few seconds instead of minutes.
MICRO = TinyConfig(
    synth=SynthConfig(seed=5, n_train=40, n_val=10, n_test=10),
    vocab_size=300,
    hidden_size=32,
    intermediate_size=64,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    vision_depth=1,
    vision_hidden_size=32,
    vision_intermediate_size=64,
    vision_heads=2,
    batch_size=4,
    max_steps=4,
    eval_every=2,
    eval_problems=4,
    max_new_tokens=6,
)


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    return ensure_synth_data(MICRO.synth, tmp_path_factory.mktemp("synth"))


@pytest.fixture(scope="module", params=FAMILIES)
def built(request, tmp_path_factory, synth_dir):
    """A micro build of each family (Qwen3-VL: the pixel bounds `spotlight.variant` gives its grid)."""
    cfg = MICRO
    if request.param != MICRO.family:
        g = family(request.param).grid
        cfg = replace(MICRO, family=request.param, min_pixels=(2 * g) ** 2, max_pixels=(3 * g) ** 2)
    out = tmp_path_factory.mktemp(f"tiny_{request.param}")
    info = tiny.build_tiny_model(out, cfg, synth_dir)
    return out, info, request.param


def test_tokenizer_has_qwen_specials_and_template(synth_dir):
    train = list(load_problems(synth_dir, "train"))
    tok = tiny.build_tokenizer(tiny._corpus(train), vocab_size=300)
    assert tok.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == list(range(len(SPECIAL_TOKENS)))
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and tok.bos_token is None
    proc = tiny.build_processor(tok)
    text = render_prompt(train[0], proc, tiny.PROMPT_SUFFIX)  # the suffix the tiny base learns
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert "<|vision_start|><|image_pad|><|vision_end|>" in text and text.endswith("<|im_start|>assistant\n")
    # The BPE corpus is exactly what the processor renders.
    assert tiny._corpus(train[:1])[0] == text + train[0].meta["response"] + "<|im_end|>\n"
    ids = tok(text + "123", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text + "123"
    assert tok.convert_ids_to_tokens(ids[-3:]) == ["1", "2", "3"]  # digits one by one, as in Qwen2
    assert sum(i < len(SPECIAL_TOKENS) for i in ids) == text.count("<|")


def test_sft_batch_layout(synth_dir):
    train = list(load_problems(synth_dir, "train"))[:3]
    tok = tiny.build_tokenizer(tiny._corpus(train), vocab_size=300)
    proc = tiny.build_processor(tok)
    targets = [[5, 6], [7], [8, 9, 10]]
    b = tiny._sft_batch(train, targets, proc, tok.pad_token_id)
    prompt = encode_prompts(train, proc, tiny.PROMPT_SUFFIX)
    t = prompt["input_ids"].shape[1]
    assert b["input_ids"].shape == (3, t + 3)
    assert torch.equal(b["input_ids"][:, :t], prompt["input_ids"])
    assert (b["labels"][:, :t] == -100).all()
    assert b["labels"][:, t:].tolist() == [[5, 6, -100], [7, -100, -100], [8, 9, 10]]
    assert b["attention_mask"][:, t:].tolist() == [[1, 1, 0], [1, 0, 0], [1, 1, 1]]
    assert (b["mm_token_type_ids"][:, t:] == 0).all()


def test_micro_build_loads_like_a_released_checkpoint(built, synth_dir):
    import transformers
    from transformers import AutoModelForImageTextToText, AutoProcessor

    out, info, name = built
    fam = family(name)
    saved = json.loads((out / tiny.INFO_FILE).read_text())
    meta = json.loads((synth_dir / "meta.json").read_text())
    assert saved["text_only_baseline"]["val"] == meta["text_only_baseline"]["val"]["all"]
    assert 0.0 <= saved["val_accuracy"] <= 1.0 and saved["params"] == info["params"] < 200_000
    assert saved["warm_start_steps"] <= MICRO.max_steps
    # the suffix the warm start taught is recorded where vppo.eval and vppo.train look for it
    from vppo.data import load_prompt_suffix

    assert load_prompt_suffix(out) == MICRO.prompt_suffix == saved["prompt_suffix"] == tiny.PROMPT_SUFFIX

    proc = AutoProcessor.from_pretrained(out, local_files_only=True)
    assert type(proc).__name__ == fam.processor_class
    assert type(proc.image_processor).__name__ == "Qwen2VLImageProcessor"  # both families use it
    assert proc.image_processor.patch_size == fam.patch
    model = getattr(transformers, fam.hf_class).from_pretrained(out, local_files_only=True)
    auto = AutoModelForImageTextToText.from_pretrained(out, local_files_only=True)
    tok = proc.tokenizer
    eos = [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
    assert model.generation_config.eos_token_id == eos
    assert model.generation_config.pad_token_id == tok.pad_token_id
    assert model.config.image_token_id == proc.image_token_id
    assert not model.config.tie_word_embeddings

    problems = list(load_problems(synth_dir, "val"))[:3]
    proc.tokenizer.padding_side = "left"
    batch = encode_prompts(problems, proc)
    grid = batch["image_grid_thw"]
    assert grid.tolist() == [[1, 6, 6]] * 3  # 84 x 84 images: 14-px patches, or 96 x 96 and 16-px
    n_pad = (batch["input_ids"] == proc.image_token_id).sum(1)
    assert n_pad.tolist() == (grid.prod(-1) // 4).tolist()
    with torch.no_grad():
        a, b = model(**batch).logits, auto(**batch).logits
    assert a.shape == (*batch["input_ids"].shape, len(tok)) and torch.equal(a, b)

    torch.manual_seed(0)
    suppress = vision_token_ids(proc)
    gen = model.generate(**batch, max_new_tokens=12, do_sample=True, suppress_tokens=suppress)
    new = gen[:, batch["input_ids"].shape[1] :]
    assert new.shape[1] >= 1 and not torch.isin(new, torch.tensor(suppress)).any()


def test_warm_start_stops_in_band_and_rolls_back_past_it(monkeypatch, synth_dir):
    train = list(load_problems(synth_dir, "train"))
    val = list(load_problems(synth_dir, "val"))
    tok = tiny.build_tokenizer(tiny._corpus(train), vocab_size=300)
    proc = tiny.build_processor(tok)
    model = tiny.build_model(MICRO, tok)
    # Probe accuracies in order: below the band, past it (roll back), inside (confirm on val).
    script = iter([0.1, 0.8, 0.4, 0.45])
    calls = []

    def fake(model, processor, problems, **kw):
        calls.append(len(problems))
        return [next(script)] * len(problems)

    monkeypatch.setattr(tiny, "sample_accuracy", fake)
    stops = {"stop_low": 0.33, "stop_high": 0.55, "accept": (0.25, 0.55)}
    cfg = TinyConfig(**{**MICRO.__dict__, "max_steps": 50, "eval_every": 4, **stops})
    threads = torch.get_num_threads()
    torch.set_num_threads(tiny._threads())  # as build_tiny_model does: 1 on a busy machine
    try:
        log = tiny.warm_start(model, proc, train, val, cfg)
    finally:
        torch.set_num_threads(threads)
    h = log["history"]
    assert [x["step"] for x in h] == [4, 8, 6]  # rolled back to step 4, then measured every 2 steps
    assert [x["lr"] for x in h] == [cfg.lr, cfg.lr, cfg.lr / 2]
    assert [x["probe_acc"]["all"] for x in h] == [0.1, 0.8, 0.4]
    assert h[-1]["val_acc"] == 0.45 and log["val_accuracy"]["all"] == pytest.approx(0.45) and log["in_band"]
    assert calls == [4, 4, 4, len(val)] and log["steps"] == 6


def test_ensure_tiny_model_caches_by_config(tmp_path, monkeypatch):
    built = []

    def fake_build(out, cfg, synth_dir):
        built.append(cfg)
        out.mkdir(parents=True, exist_ok=True)
        (out / tiny.INFO_FILE).write_text(json.dumps({"seed": cfg.seed}))

    monkeypatch.setattr(tiny, "build_tiny_model", fake_build)
    cfg = TinyConfig(**{**MICRO.__dict__, "synth": SynthConfig(seed=7, n_train=5, n_val=5, n_test=5)})
    first = tiny.ensure_tiny_model(cfg, tmp_path)
    assert tiny.ensure_tiny_model(cfg, tmp_path) == first and len(built) == 1
    other = tiny.ensure_tiny_model(TinyConfig(**{**cfg.__dict__, "seed": 1}), tmp_path)
    assert other != first and len(built) == 2
    assert json.loads((other / tiny.INFO_FILE).read_text()) == {"seed": 1}
    assert tiny.tiny_key(cfg) != tiny.tiny_key(TinyConfig(**{**cfg.__dict__, "lr": 1e-4}))


def test_config_is_checked():
    with pytest.raises(ValueError, match="stop_low"):
        TinyConfig(stop_low=0.1)
    with pytest.raises(ValueError, match="multiple of 4"):
        TinyConfig(hidden_size=40, num_heads=4)
    with pytest.raises(ValueError, match="vocab_size"):
        tiny.build_tokenizer(["a"], vocab_size=100)


def test_family_is_checked_and_the_qwen2_5_vl_base_keeps_its_cache_key():
    from dataclasses import asdict

    from vppo import paths
    from vppo.spotlight import variant
    from vppo.synth import SYNTH_VERSION

    with pytest.raises(ValueError, match="supported model types: qwen2_5_vl, qwen3_vl"):
        TinyConfig(family="llava")
    # the key of the base built before families existed (no family field): its cache stays valid
    d = asdict(TinyConfig())
    del d["family"]
    old = paths.artifact_key({"tiny": d, "tiny_version": tiny.TINY_VERSION, "synth_version": SYNTH_VERSION})
    assert tiny.tiny_key(TinyConfig()) == old == tiny.tiny_key(variant("default")[1])
    q3 = variant("default", "qwen3_vl")[1]
    assert (q3.family, q3.min_pixels, q3.max_pixels) == ("qwen3_vl", 64 * 64, 96 * 96)
    assert tiny.tiny_key(q3) != old
