import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from vppo.config import (
    CONFIG_DIR,
    Config,
    batch_numbers,
    build_parser,
    config_from_args,
    deepspeed_config,
    derived,
    fields_table,
    load_config,
    save_resolved,
)

YAMLS = sorted(CONFIG_DIR.glob("*.yaml"))
JSONS = sorted(CONFIG_DIR.glob("ds_*.json"))


def test_config_files_exist():
    names = {p.name for p in YAMLS} | {p.name for p in JSONS}
    for n in [
        "tiny.yaml",
        "vppo_7b.yaml",
        "vppo_7b_exact.yaml",
        "dapo_7b.yaml",
        "grpo_7b.yaml",
        "ds_zero2.json",
        "ds_zero3.json",
        "ds_zero2_offload.json",
        "ds_zero3_offload.json",
    ]:
        assert n in names, n


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_every_yaml_resolves_and_sets_every_key(path):
    cfg = load_config(path, world_size=8 if "7b" in path.name else 1)
    # Every file spells out every key, so a new field cannot silently take a tiny default in a 7B recipe.
    doc = yaml.safe_load(path.read_text())
    flat = {f"{s}.{k}" for s, sec in doc.items() for k in sec}
    assert flat == set(fields_table()), set(fields_table()) ^ flat
    if cfg.train.deepspeed is not None:
        ds = deepspeed_config(cfg, 8)
        assert (
            ds["train_batch_size"]
            == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 8
        )


def test_tiny_yaml_equals_defaults():
    assert load_config(CONFIG_DIR / "tiny.yaml") == Config()
    assert load_config(None) == Config()


def test_released_recipe_numbers():
    c = load_config(CONFIG_DIR / "vppo_7b.yaml", world_size=8)
    assert (c.algo.dependency, c.algo.shaping, c.algo.topk_ratio, c.algo.b_min) == (
        "k3",
        "released",
        0.4,
        0.9,
    )
    assert (c.algo.clip_low, c.algo.clip_high, c.algo.dual_clip, c.algo.entropy_coef) == (
        0.2,
        0.28,
        3.0,
        0.06,
    )
    assert (c.rollout.rollout_batch_size, c.rollout.n, c.rollout.top_p, c.rollout.max_response_len) == (
        384,
        8,
        0.99,
        2048,
    )
    assert (c.rollout.filter_low, c.rollout.filter_high, c.rollout.online_filter) == (0.01, 0.99, True)
    assert (c.train.global_batch, c.train.micro_batch, c.train.logprob_micro_batch) == (128, 16, 32)
    assert (c.train.lr, c.train.weight_decay, c.train.betas, c.train.epochs) == (1e-6, 0.01, [0.9, 0.999], 2)
    assert (c.data.min_pixels, c.data.max_pixels, c.data.max_prompt_len) == (200704, 1003520, 4096)
    assert c.model.dtype == "bfloat16" and c.model.gradient_checkpointing and not c.model.freeze_vision
    e = load_config(CONFIG_DIR / "vppo_7b_exact.yaml", world_size=8)
    assert (e.algo.dependency, e.algo.shaping) == ("kl", "global")
    d = derived(e, 8, n_train=38870, print_fn=None)
    assert (d.optimizer_steps_per_rollout, d.grad_accum_per_rank, d.steps_per_epoch, d.total_steps) == (
        3,
        8,
        101,
        202,
    )
    for name in ("dapo_7b.yaml", "grpo_7b.yaml"):
        b = load_config(CONFIG_DIR / name, world_size=8)
        assert b.algo.name in ("dapo", "grpo") and b.algo.shaping == "none" and b.algo.topk_ratio == 1.0


@pytest.mark.parametrize("path", JSONS, ids=lambda p: p.name)
def test_deepspeed_json_is_valid(path):
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    ds = json.loads(path.read_text())
    assert ds["bf16"]["enabled"] is True
    assert "auto" not in path.read_text()
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        assert key not in ds  # filled by deepspeed_config from the run config
    z = DeepSpeedZeroConfig(**ds["zero_optimization"])  # pydantic: unknown keys raise
    assert z.stage == (3 if "zero3" in path.name else 2)
    assert (z.offload_optimizer is not None) == ("offload" in path.name)


def test_overrides_types_and_values():
    c = load_config(
        None,
        [
            "train.lr=1e-6",  # PyYAML reads this as a string
            "rollout.n=16",
            "rollout.top_p=1",
            "model.gradient_checkpointing=true",
            "algo.dual_clip=null",
            "train.betas=[0.8, 0.95]",
            "model.path=/some/where",
            "algo.shaping=static",
            "algo.b_max=1.2",
            "run.watchdog_seconds=5",
        ],
    )
    assert c.train.lr == 1e-6 and isinstance(c.train.lr, float)
    assert c.rollout.n == 16 and isinstance(c.rollout.n, int)
    assert c.rollout.top_p == 1.0 and isinstance(c.rollout.top_p, float)
    assert c.model.gradient_checkpointing is True
    assert c.algo.dual_clip is None
    assert c.train.betas == [0.8, 0.95]
    assert c.model.path == "/some/where"
    assert c.algo.b_max == 1.2 and c.run.watchdog_seconds == 5.0


@pytest.mark.parametrize(
    "override, needle",
    [
        ("algo.topk=0.3", "did you mean 'algo.topk_ratio'"),
        ("trian.lr=1e-6", "did you mean 'train.lr'"),
        ("rollout.temprature=0.7", "did you mean 'rollout.temperature'"),
        ("lr=1e-6", "did you mean 'train.lr'"),
    ],
)
def test_unknown_key_suggests_closest(override, needle):
    with pytest.raises(ValueError, match="unknown config key") as e:
        load_config(None, [override])
    assert needle in str(e.value)


@pytest.mark.parametrize(
    "override, field",
    [
        ("rollout.n=two", "rollout.n"),
        ("rollout.n=2.5", "rollout.n"),
        ("train.lr=fast", "train.lr"),
        ("train.lr=-1", "train.lr"),
        ("train.lr=nan", "train.lr"),
        ("model.liger=maybe", "model.liger"),
        ("algo.name=ppo", "algo.name"),
        ("algo.dependency=k2", "algo.dependency"),
        ("algo.topk_ratio=0", "algo.topk_ratio"),
        ("algo.topk_ratio=1.5", "algo.topk_ratio"),
        ("algo.b_min=1.5", "algo.b_min"),
        ("algo.b_max=1.2", "algo.b_max"),  # only with shaping=static
        ("algo.dual_clip=0.5", "algo.dual_clip"),
        ("rollout.top_p=0", "rollout.top_p"),
        ("rollout.temperature=0", "rollout.temperature"),
        ("rollout.filter_low=0.99", "rollout.filter_low"),
        ("train.betas=[0.9]", "train.betas"),
        ("train.deepspeed=configs/nope.json", "train.deepspeed"),
        ("run.resume=/no/such/checkpoint", "run.resume"),
        ("run.keep_last=0", "run.keep_last"),
        ("data.max_pixels=1000", "data.max_pixels"),
        ("rollout.n=null", "rollout.n"),
        ("algo.name=dapo", "algo.name=dapo"),  # dapo with VPPO shaping left on
    ],
)
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ValueError) as e:
        load_config(None, [override])
    assert field in str(e.value)


def test_section_and_malformed_override():
    with pytest.raises(ValueError, match="'train' is a section"):
        load_config(None, ["train=3"])
    with pytest.raises(ValueError, match="key.sub=value"):
        load_config(None, ["train.lr"])


def test_unknown_key_in_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 1e-5\n  global_bach: 16\n")
    with pytest.raises(ValueError, match="did you mean 'train.global_batch'") as e:
        load_config(p)
    assert str(p) in str(e.value)
    p.write_text("train: 3\n")
    with pytest.raises(ValueError, match="section 'train' must be a mapping"):
        load_config(p)


def test_yaml_then_overrides_precedence(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 1e-5\n  seed: 7\n")
    c = load_config(p, ["train.seed=9"])
    assert (c.train.lr, c.train.seed) == (1e-5, 9)


@pytest.mark.parametrize(
    "overrides, world, fields",
    [
        (["rollout.rollout_batch_size=24"], 1, ["rollout.rollout_batch_size", "train.global_batch"]),
        (["train.micro_batch=48"], 1, ["train.micro_batch", "train.global_batch", "rollout.n"]),
        ([], 3, ["train.global_batch", "world size (3)"]),
        (["train.micro_batch=64"], 4, ["train.micro_batch"]),  # 16*8/4 = 32 per rank
    ],
)
def test_batch_divisibility(overrides, world, fields):
    with pytest.raises(ValueError) as e:  # the sizes spelled out, whatever the defaults are
        load_config(
            None, ["rollout.rollout_batch_size=16", "train.global_batch=16", *overrides], world_size=world
        )
    for f in fields:
        assert f in str(e.value)


def test_world_size_from_env(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="world size"):
        load_config(None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    load_config(None)


def test_derived_numbers(capsys):
    c = load_config(
        None,
        [
            "rollout.rollout_batch_size=32",
            "train.global_batch=8",
            "train.micro_batch=16",
            "train.total_steps=40",
        ],
    )
    d = derived(c, 2, n_train=100)
    out = capsys.readouterr().out
    assert d.optimizer_steps_per_rollout == 4
    assert d.samples_per_step == 64 and d.samples_per_rank_per_step == 32 and d.grad_accum_per_rank == 2
    assert d.rollout_prompts_per_rank == 16 and d.logprob_passes_per_rank == 2
    assert d.steps_per_epoch == 3 and d.total_steps == 40 and d.total_optimizer_steps == 160
    assert "gradient accumulation per rank: 2" in out and "optimizer steps per rollout batch: 4" in out
    c.train.total_steps = None
    c.train.epochs = 2
    assert batch_numbers(c, 2, n_train=100).total_steps == 6
    with pytest.raises(ValueError, match="smaller than rollout.rollout_batch_size"):
        batch_numbers(c, 1, n_train=10)


def test_deepspeed_config_fill():
    c = load_config(CONFIG_DIR / "vppo_7b.yaml", world_size=8)
    ds = deepspeed_config(c, 8, with_optimizer=True)
    assert (
        ds["train_batch_size"],
        ds["train_micro_batch_size_per_gpu"],
        ds["gradient_accumulation_steps"],
    ) == (
        1024,
        16,
        8,
    )
    assert ds["gradient_clipping"] == 1.0 and ds["bf16"]["enabled"] and ds["zero_optimization"]["stage"] == 2
    assert ds["optimizer"]["params"]["lr"] == 1e-6
    tiny = deepspeed_config(Config(), 1)
    assert tiny["zero_optimization"]["stage"] == 0 and not tiny["bf16"]["enabled"]
    assert "optimizer" not in tiny


def test_save_resolved_round_trip(tmp_path):
    c = load_config(None, ["train.lr=3e-5", "algo.dual_clip=null", "data.train=/x/y.parquet"])
    path = save_resolved(c, tmp_path / "run")
    assert path == tmp_path / "run" / "config.yaml"
    assert load_config(path) == c
    assert dataclasses.asdict(load_config(path))["train"]["lr"] == 3e-5


def test_cli(capsys):
    helptext = build_parser("vppo.train").format_help()
    for key in fields_table():
        assert key in helptext
    assert "--config" in helptext
    c = config_from_args(["--config", str(CONFIG_DIR / "tiny.yaml"), "train.seed=5", "rollout.n=4"])
    assert (c.train.seed, c.rollout.n) == (5, 4)
    with pytest.raises(SystemExit) as e:
        config_from_args(["algo.topk=0.1"])
    assert e.value.code == 2
    assert "algo.topk_ratio" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        config_from_args(["--print-config", "train.seed=3"])
    assert e.value.code == 0
    assert yaml.safe_load(capsys.readouterr().out)["train"]["seed"] == 3


def test_relative_deepspeed_path_resolves_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config("configs/vppo_7b.yaml").algo.shaping == "released"
    with pytest.raises(ValueError, match="config file not found"):
        load_config("configs/nope.yaml")
    c = load_config(None, ["train.deepspeed=configs/ds_zero3.json"])
    assert deepspeed_config(c, 1)["zero_optimization"]["stage"] == 3
    assert Path(c.train.deepspeed).name == "ds_zero3.json"


def test_attn_impl_falls_back_to_sdpa():
    import importlib.util

    from vppo.config import resolve_attn_impl

    assert resolve_attn_impl("sdpa") == "sdpa"
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.warns(UserWarning, match="falling back to sdpa"):
            assert resolve_attn_impl("flash_attention_2") == "sdpa"
    else:
        assert resolve_attn_impl("flash_attention_2") == "flash_attention_2"
