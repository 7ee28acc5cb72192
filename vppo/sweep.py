"""Arms x seeds of the one training loop at an equal budget, evaluated, tabulated and plotted.

    python -m vppo.sweep                          # the spotlight sweep: 7 arms, seeds 1-5 (4 arms) or 1-3
    python -m vppo.sweep --testbed default        # the embedded default: VPPO and GRPO, seeds 1-3
    python -m vppo.sweep --testbed multiread      # several values read per response: 4 arms, seeds 1-3
    python -m vppo.sweep --testbed default_qwen3_vl  # the default on the tiny Qwen3-VL base, seeds 1-3
    python -m vppo.sweep --testbed default_lora   # the default with LoRA r=8, seeds 1-3
    python -m vppo.sweep --testbed spotlight_diag # VPPO with the diagnostic at every validation, seeds 1-3
    python -m vppo.sweep --arms grpo,vppo --seeds 1
    python -m vppo.sweep --quick                  # two arms, one seed, 2 steps (runs/sweep_quick_<testbed>)
    python -m vppo.sweep --aggregate-only         # the table and curves from <results>/raw/*.json

A testbed is a synthetic task family (`data.synth`) with its shipped base (vppo.bases, sha256 checked;
every run of a sweep starts from those committed weights, so anyone can rerun it), its arms, its seeds
per arm and its budget. Each run is `python -m vppo.train` in its own process (run.resume=auto: a
killed sweep continues from the newest checkpoint of the unfinished run; finished runs, evaluations and
diagnostics are skipped), then `python -m vppo.eval` on its export (test avg@n on the synthetic test
split; the evaluation's own cache makes it resumable too) and, on the spotlight families,
`python -m vppo.spotlight` (dependency precision / recall against the ground-truth visual tokens, and
a picture). Every finished run writes one raw JSON (RESULTS/raw/<arm>_s<seed>.json: its validation
curve, rewards, generations, test accuracy per task, spotlight summary, the overrides it ran with, the
base's weights fingerprint, the machine and package versions); a run whose raw JSON is there with the
same overrides (bar run.output_dir) counts as finished even when its run folder is gone, so a sweep
continues across sittings from the committed results. `aggregate` rebuilds RESULTS/table.md,
RESULTS/paired.md (paired differences with a 95 % t interval), RESULTS/summary.json and
RESULTS/curves.png (mean over seeds with a +-1 std band) from those files alone. Any failed run makes
the sweep exit non-zero (after the others ran).

Arms of the spotlight testbed (docs: README, "Spotlight sweep"), all on the same steps, prompts per
step and samples per prompt:
  grpo       GRPO: symmetric clip 0.2, no online filtering
  dapo       DAPO: clip-higher 0.28, dynamic sampling (online filtering; more generations per step)
  vppo       VPPO on the DAPO base: + TAS (released shaping) + TGF (top 40 % tokens by k3 dependency)
  tas_only   DAPO + TAS
  tgf_only   DAPO + TGF
  random40   DAPO + 40 % of tokens chosen at random (seeded)
  entropy40  DAPO + the 40 % highest-entropy tokens
Everything else (lr, entropy penalty 0.06, token-mean loss, dual clip) is the tiny default's.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from vppo.paths import REPO_ROOT

DAPO = ["rollout.online_filter=true", "algo.clip_high=0.28"]
NO_DEP = ["algo.shaping=none", "algo.topk_ratio=1.0"]
ARMS: dict[str, list[str]] = {
    "grpo": ["algo.name=grpo", *NO_DEP, "algo.clip_high=0.2", "rollout.online_filter=false"],
    "dapo": ["algo.name=dapo", *NO_DEP, *DAPO],
    "vppo": ["algo.name=vppo", "algo.shaping=released", "algo.topk_ratio=0.4", *DAPO],
    "tas_only": ["algo.name=vppo", "algo.shaping=released", "algo.topk_ratio=1.0", *DAPO],
    "tgf_only": ["algo.name=vppo", "algo.shaping=none", "algo.topk_ratio=0.4", *DAPO],
    "random40": [
        "algo.name=vppo",
        "algo.shaping=none",
        "algo.topk_ratio=0.4",
        "algo.token_select=random",
        *DAPO,
    ],
    "entropy40": [
        "algo.name=vppo",
        "algo.shaping=none",
        "algo.topk_ratio=0.4",
        "algo.token_select=entropy",
        *DAPO,
    ],
}
LABELS = {
    "grpo": "GRPO",
    "dapo": "DAPO",
    "vppo": "VPPO",
    "tas_only": "TAS only",
    "tgf_only": "TGF only",
    "random40": "random 40 %",
    "entropy40": "entropy 40 %",
}
DONE = "SWEEP_DONE"
# the spotlight diagnostic's numbers averaged over seeds (vppo.spotlight.summarize)
SPOT_KEYS = tuple(
    f"{k}_{m}" for k in ("k3", "kl", "entropy", "random") for m in ("precision", "recall", "rprec")
)
SPOT_KEYS += ("base_rate", "k3_dep_mass", "kl_dep_mass")


@dataclass(frozen=True)
class Budget:
    """The equal budget of every run (and its evaluation)."""

    steps: int = 50
    prompts: int = 16  # rollout.rollout_batch_size
    n: int = 8  # rollout.n
    global_batch: int = 8  # prompts per optimizer step: two optimizer steps per rollout batch
    val_every: int = 10
    val_samples: int = 64
    val_n: int = 4
    save_every: int = 5
    eval_samples: int = 8  # test avg@n
    eval_limit: int | None = None  # first N test problems (None: all)
    spot_problems: int = 48  # spotlight diagnostic: first N test problems ...
    spot_samples: int = 2  # ... x responses each
    micro_batch: int | None = None  # train.micro_batch / logprob_micro_batch (None: the config's)

    def overrides(self) -> list[str]:
        micro = [] if self.micro_batch is None else [
            f"train.micro_batch={self.micro_batch}", f"train.logprob_micro_batch={self.micro_batch}"
        ]  # fmt: skip
        return [
            *micro,
            f"train.total_steps={self.steps}",
            f"rollout.rollout_batch_size={self.prompts}",
            f"rollout.n={self.n}",
            f"train.global_batch={self.global_batch}",
            f"run.val_every={self.val_every}",
            f"run.val_samples={self.val_samples}",
            f"rollout.val_n={self.val_n}",
            f"run.save_every={self.save_every}",
            "run.keep_last=1",
            "run.loggers=[]",
            f"run.plot_every={max(self.steps, 1)}",
        ]


QUICK = Budget(
    steps=2,
    prompts=2,
    n=4,
    global_batch=2,
    val_every=1,
    val_samples=2,
    val_n=2,
    save_every=1,
    eval_samples=2,
    eval_limit=4,
    spot_problems=2,
    spot_samples=1,
    micro_batch=4,  # the mini-batch is 2 prompts x 4 samples: the default 32 does not divide it
)


# vppo.eval --regroup-after: a test response still running after twice the training length (64) is
# finished on its own, so one that never stops does not hold its batch of 128 to 2048 tokens (the same
# responses either way; an evaluation took 89 min without it, vppo_s1 of docs/default_qwen3_vl).
REGROUP_AFTER = 128

# The claims rest on GRPO, VPPO, TGF only and random 40 %: five seeds each; the other arms three.
KEY_ARMS = ("grpo", "vppo", "tgf_only", "random40")
# the embedded default's budget (configs/tiny.yaml): 100 steps, val avg@8 on 128 problems every 25
DEFAULT_BUDGET = Budget(steps=100, val_every=25, val_samples=128, val_n=8, save_every=25, spot_problems=0)
DEFAULT_ARMS = {  # the embedded default (configs/tiny.yaml) and its GRPO baseline, as the README runs them
    "grpo": ["algo.name=grpo", "algo.shaping=none", "algo.topk_ratio=1.0"],
    "vppo": [],
}


@dataclass(frozen=True)
class Testbed:
    """A task family with its shipped base, arms, seeds per arm, budget and results folder."""

    synth: str  # data.synth: the synthetic family, and the shipped base (vppo.bases.SHIPPED)
    arms: dict[str, list[str]]
    seeds: dict[str, tuple[int, ...]]  # the planned seeds of each arm
    budget: Budget
    results: str  # default --results
    spotlight: bool  # run the dependency diagnostic (the family has known visual tokens)
    family: str = "qwen2_5_vl"  # model.tiny_family: which shipped base (vppo.bases.SHIPPED)
    common: tuple[str, ...] = ()  # overrides of every arm (the family's own keys)


TESTBEDS = {
    "spotlight": Testbed(
        "spotlight", ARMS, {a: (1, 2, 3, 4, 5) if a in KEY_ARMS else (1, 2, 3) for a in ARMS},
        Budget(), "docs/sweep", True,
    ),
    "default": Testbed(
        "default", DEFAULT_ARMS, {a: (1, 2, 3) for a in DEFAULT_ARMS},
        DEFAULT_BUDGET,
        "docs/default", False,
    ),
    # several values read per response (about a fifth of the tokens): does ranking by dependency
    # beat a random 40 % where there is something to choose? Its own base and results folder.
    "multiread": Testbed(
        "multiread", {a: ARMS[a] for a in KEY_ARMS}, {a: (1, 2, 3) for a in KEY_ARMS},
        Budget(), "docs/sweep_multiread", True,
    ),
    # the diagnostic during training (configs/spotlight.yaml: the sweep's VPPO arm with the spotlight
    # measured at every validation) over three seeds; it leaves the training as it is
    "spotlight_diag": Testbed(
        "spotlight", {"vppo": [*ARMS["vppo"], "run.spotlight_problems=8"]}, {"vppo": (1, 2, 3)},
        Budget(), "docs/spotlight_run", False,
    ),
    # the embedded default on the tiny Qwen3-VL base (configs/tiny_qwen3_vl.yaml): does it learn?
    "default_qwen3_vl": Testbed(
        "default", {"vppo": []}, {"vppo": (1, 2, 3)},
        DEFAULT_BUDGET,
        "docs/default_qwen3_vl", False, "qwen3_vl", ("model.tiny_family=qwen3_vl", "algo.patch_size=16"),
    ),
    # the embedded default with LoRA r=8 on the language model (vppo/lora.py): does it learn? The
    # learning rate is five times the full-weight one (2e-4). Ten times (the usual ratio for LoRA at a
    # small rank) collapsed seed 1 at step 78 (one update of policy KL 0.2, then responses that never
    # stop; val avg@8 27.7 at step 75, 14.8 at 100): README, "LoRA".
    "default_lora": Testbed(
        "default", {"vppo": []}, {"vppo": (1, 2, 3)},
        DEFAULT_BUDGET,
        "docs/default_lora", False, "qwen2_5_vl", ("model.lora_rank=8", "train.lr=1.0e-3"),
    ),
}  # fmt: skip


def _env(threads: int) -> dict:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        VPPO_TINY_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _cpu_children() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _run(cmd: list[str], log: Path, threads: int) -> float:
    """Run `cmd` with its output appended to `log`; returns the CPU seconds it used (user + system: on a
    shared machine the wall time also counts the other jobs, the CPU time does not)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    cpu = _cpu_children()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env(threads), cwd=REPO_ROOT)
    if r.returncode:
        raise RuntimeError(f"{cmd[2]} failed (exit {r.returncode}); see {log}")
    return _cpu_children() - cpu


@dataclass
class Sweep:
    out: Path  # run folders (outside git)
    results: Path  # raw JSON, table, curves (docs/sweep)
    budget: Budget
    extra: tuple[str, ...] = ()  # overrides applied to every arm (after the arm's)
    model: str | None = None  # explicit model / data (tests); default: the testbed's shipped base / set
    data: str | None = None
    testbed: Testbed = TESTBEDS["spotlight"]
    threads: int = 1
    python: str = sys.executable

    def run_dir(self, arm: str, seed: int) -> Path:
        return self.out / arm / f"seed{seed}"

    def data_dir(self) -> Path:
        if self.data is not None:
            return Path(self.data)
        from vppo.spotlight import variant
        from vppo.synth import ensure_synth_data

        return Path(ensure_synth_data(variant(self.testbed.synth)[0]))

    def overrides(self, arm: str, seed: int) -> list[str]:
        src = [f"data.synth={self.testbed.synth}", *self.testbed.common]
        if self.model is not None:
            src.append(f"model.path={self.model}")
        if self.data is not None:
            src += [
                f"data.train={Path(self.data) / 'train.parquet'}",
                f"data.val={Path(self.data) / 'val.parquet'}",
            ]
        return [
            *src,
            *self.budget.overrides(),
            *self.testbed.arms[arm],
            f"train.seed={seed}",
            f"run.output_dir={self.run_dir(arm, seed)}",
            "run.resume=auto",
            *self.extra,
        ]

    def _eval_data(self) -> Path:
        """A folder holding the test split as synth.parquet (how vppo.eval takes a parquet benchmark)."""
        d = self.out / "_eval_data"
        d.mkdir(parents=True, exist_ok=True)
        link = d / "synth.parquet"
        target = (self.data_dir() / "test.parquet").resolve()
        if not link.exists() or link.resolve() != target:
            link.unlink(missing_ok=True)
            link.symlink_to(target)
        return d

    def run_one(self, arm: str, seed: int) -> dict:
        """Train, evaluate, diagnose one (arm, seed), each phase skipped when already done."""
        rd = self.run_dir(arm, seed)
        log, b = rd / "sweep.log", self.budget
        raw_path = self.results / "raw" / f"{arm}_s{seed}.json"
        prev = _read_json(raw_path)
        same = prev is not None and _same_run(prev["overrides"], self.overrides(arm, seed))
        if same and not (rd / DONE).exists():
            # finished in an earlier sitting whose run folders are gone: its committed result stands,
            # if it started from this sitting's base
            check_base(prev, self.base_sha, raw_path)
            print(f"[sweep] {arm} seed {seed}: finished in an earlier sitting ({raw_path})", flush=True)
            return prev
        times = _read_json(rd / "sweep_times.json") or {}  # seconds of each phase; "code": training commit
        if not (rd / DONE).exists():
            t0 = time.time()
            cpu = _run([self.python, "-m", "vppo.train", *self.overrides(arm, seed)], log, self.threads)
            times["train_s"] = times.get("train_s", 0) + time.time() - t0
            times["train_cpu_s"] = times.get("train_cpu_s", 0) + cpu  # CPU time, as train_s: since the resume
            times["code"] = _git_commit()  # the commit that trained it, not the one collecting it later
            (rd / DONE).write_text("trained\n")
            _write_json(rd / "sweep_times.json", times)
        if not (rd / "eval" / "manifest.json").exists():
            t0 = time.time()
            cmd = [
                self.python,
                "-m",
                "vppo.eval",
                "--model",
                str(rd / "export"),
                "--benchmarks",
                "synth",
                "--data-dir",
                str(self._eval_data()),
                "--samples",
                str(b.eval_samples),
                "--out",
                str(rd / "eval"),
                "--threads",
                str(self.threads),
                "--no-progress",
                "--batch-size",
                "16",
                "--regroup-after",
                str(REGROUP_AFTER),
            ]
            if b.eval_limit:
                cmd += ["--limit", str(b.eval_limit)]
            _run(cmd, log, self.threads)
            times["eval_s"] = time.time() - t0
            _write_json(rd / "sweep_times.json", times)
        if self.testbed.spotlight and not (rd / "spotlight" / "spotlight.json").exists():
            t0 = time.time()
            cmd = [
                self.python,
                "-m",
                "vppo.spotlight",
                "--model",
                str(rd / "export"),
                "--out",
                str(rd / "spotlight"),
                "--data",
                str(self.data_dir() / "test.parquet"),
                "--problems",
                str(b.spot_problems),
                "--samples",
                str(b.spot_samples),
                "--threads",
                str(self.threads),
                "--seed",
                str(seed),
            ]
            _run(cmd, log, self.threads)
            times["spotlight_s"] = time.time() - t0
            _write_json(rd / "sweep_times.json", times)
        raw = collect(rd, arm, seed, self.overrides(arm, seed), b, self.data_dir() / "test.parquet")
        raw["base_sha"] = self.base_sha
        raw["testbed"] = self.testbed.synth
        # the machine (CPU model, vector ISA) and package versions the numbers ran on, and the threads
        raw["packages"] = _read_json(rd / "eval" / "manifest.json").get("packages")
        raw["threads"] = self.threads
        # the training commit; a run trained before it was recorded keeps what its raw JSON said
        raw["code"] = times.get("code") or (prev or {}).get("code") or _git_commit()
        raw["seconds"] = {k: round(v, 1) for k, v in times.items() if k != "code"}
        _write_json(self.results / "raw" / f"{arm}_s{seed}.json", raw)
        return raw

    def base_model(self) -> str:
        """The base every arm starts from: --model, else the testbed's shipped base (sha256 checked)."""
        if self.model is not None:
            return self.model
        from vppo.bases import shipped_base

        return str(shipped_base(self.testbed.synth, self.testbed.family))

    @functools.cached_property
    def base_sha(self) -> str:
        from vppo.bases import weights_fingerprint

        return weights_fingerprint(self.base_model())

    def run_base(self) -> dict:
        """Test avg@n of the base every arm starts from (once; RESULTS/base.json)."""
        d, b = self.out / "base" / "eval", self.budget
        prev = _read_json(self.results / "base.json")
        if prev is not None:
            check_base(prev, self.base_sha, self.results / "base.json")
            if prev.get("base_sha") is None and not (d / "manifest.json").exists():
                return prev  # recorded before fingerprints: the committed evaluation stands
        if not (d / "manifest.json").exists():
            cmd = [
                self.python, "-m", "vppo.eval", "--model", self.base_model(), "--benchmarks", "synth",
                "--data-dir", str(self._eval_data()), "--samples", str(b.eval_samples), "--out", str(d),
                "--threads", str(self.threads), "--no-progress", "--batch-size", "16",
                "--regroup-after", str(REGROUP_AFTER),
            ]  # fmt: skip
            if b.eval_limit:
                cmd += ["--limit", str(b.eval_limit)]
            _run(cmd, self.out / "base" / "sweep.log", self.threads)
        res = {
            "model": _repo_relative(self.base_model()),
            "base_sha": self.base_sha,
            "test": eval_result(d, self.data_dir() / "test.parquet"),
            "packages": _read_json(d / "manifest.json").get("packages"),  # what the numbers ran on
        }
        _write_json(self.results / "base.json", res)
        return res

    def run(self, plan: dict[str, tuple[int, ...]]) -> tuple[dict, list[tuple[str, int]]]:
        """Run `plan` ({arm: seeds}) in seed-major order (every arm of seed 1, then seed 2, ...), so a
        partial sweep has whole seeds; returns the summary and the runs that failed."""
        self.results.mkdir(parents=True, exist_ok=True)
        _write_json(
            self.results / "budget.json",
            {
                **asdict(self.budget),
                "testbed": self.testbed.synth,
                "arms": {a: self.testbed.arms[a] for a in plan},
                "seeds": {a: list(v) for a, v in plan.items()},
                "extra": list(self.extra),
            },
        )
        self.run_base()
        failed: list[tuple[str, int]] = []
        for seed in sorted({s for v in plan.values() for s in v}):
            for arm in [a for a in plan if seed in plan[a]]:
                t0 = time.time()
                print(f"[sweep] {arm} seed {seed} ...", flush=True)
                try:
                    raw = self.run_one(arm, seed)
                except RuntimeError as e:  # one broken run does not stop the sweep; a rerun resumes it
                    print(f"[sweep] {arm} seed {seed} FAILED: {e}", flush=True)
                    failed.append((arm, seed))
                    continue
                acc = raw["test"]["accuracy"]
                print(
                    f"[sweep] {arm} seed {seed}: test avg@{self.budget.eval_samples} {100 * acc:.1f} "
                    f"({time.time() - t0:.0f} s)",
                    flush=True,
                )
                aggregate(self.results)
        if failed:
            print(f"[sweep] failed runs (rerun the same command to resume them): {failed}", flush=True)
        return aggregate(self.results), failed


def check_base(recorded: dict, sha: str, where: Path) -> None:
    """A committed result counts for this sitting only if it started from the same base weights (a
    tiny base rebuilt on another machine can differ: README, "Reproducing the numbers")."""
    theirs = recorded.get("base_sha")
    if theirs is None:
        print(f"[sweep] note: {where} has no base fingerprint (recorded before fingerprints), so it "
              f"cannot be checked against this sitting's base {sha}; kept as it is", flush=True)  # fmt: skip
    elif theirs != sha:
        raise ValueError(
            f"{where} was measured from base weights {theirs}, this sitting's base is {sha}: runs from "
            "different bases are not one sweep. Use another --results folder, or rebuild that base."
        )


def _repo_relative(path: str) -> str:
    """`path` relative to the repository when inside it (a checkout's location is not a result)."""
    p = Path(path).resolve()
    return str(p.relative_to(REPO_ROOT.resolve())) if p.is_relative_to(REPO_ROOT.resolve()) else path


def _git_commit() -> str | None:
    """The commit the sweep's code is at ("+dirty" with uncommitted changes); None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "vppo", "kernels"], cwd=REPO_ROOT,
                               capture_output=True, text=True)  # fmt: skip
    except OSError:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if head.returncode == 0 else None


def _read_json(p: Path):
    """The JSON of `p`, None when it does not exist; a truncated or broken file is a ValueError naming it."""
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON ({e}); delete it to rerun that step") from None


def _write_json(p: Path, obj) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, p)


def eval_result(eval_dir: Path, test_parquet: Path) -> dict:
    """Test avg@n of a vppo.eval output folder, overall and per synthetic task."""
    import pyarrow.parquet as pq

    res = json.loads((eval_dir / "manifest.json").read_text())["results"]["benchmarks"]["synth"]
    samples = json.loads((eval_dir / "samples.json").read_text())["synth"]
    tasks = pq.read_table(test_parquet, columns=["task"]).column("task").to_pylist()
    per_task: dict[str, list[float]] = {}
    for s in samples:
        per_task.setdefault(tasks[s["index"]], []).append(s["score"])
    return {
        "accuracy": res["accuracy"],
        "stderr": res["stderr"],
        "problems": res["problems"],
        "samples": res["samples"],
        "per_task": {t: sum(v) / len(v) for t, v in sorted(per_task.items())},
    }


def _same_run(a: list[str], b: list[str]) -> bool:
    """The same run but for keys that cannot change its results (config.RESUME_FREE: where its folder
    is, logging, intervals): a result recorded with `run.tensorboard=false` stands for one asked with
    `run.loggers=[]`."""
    from vppo.config import RESUME_FREE  # light, but keeps --aggregate-only free of the config module

    # a resume may extend a run or change its validation interval; a sweep result is its budget
    free = RESUME_FREE - {"train.total_steps", "train.epochs", "run.val_every"}
    here = lambda o: [x for x in o if x.partition("=")[0] not in free]  # noqa: E731
    return here(a) == here(b)


def collect(rd: Path, arm: str, seed: int, overrides: list[str], budget: Budget, test_parquet: Path) -> dict:
    """The raw result of one finished run folder (small: committed under docs/sweep/raw/)."""
    recs = [json.loads(line) for line in (rd / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in recs if "reward" in r]
    curve = [  # with the diagnostic during training (run.spotlight_problems), its spot_* numbers too
        {"step": r["step"], "val_accuracy": r["val_accuracy"], "val_stderr": r.get("val_stderr"),
         **{k: round(v, 4) for k, v in r.items() if k.startswith("spot_") and v is not None}}
        for r in recs
        if "val_accuracy" in r
    ]  # fmt: skip
    per_step = budget.prompts * budget.n
    tries = sum(r.get("tries", 1) for r in steps)
    spot = _read_json(rd / "spotlight" / "spotlight.json") or {}
    return {
        "arm": arm,
        "seed": seed,
        "overrides": overrides,
        "curve": curve,
        "reward": [round(r["reward"], 4) for r in steps],
        "kept_frac": [round(r.get("kept_frac", 1.0), 4) for r in steps],
        "steps": len(steps),
        "generated_samples": tries * per_step,
        "trained_samples": len(steps) * per_step,
        "test": eval_result(rd / "eval", test_parquet),
        "spotlight": spot.get("summary", {}),
    }


def _mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


# two-sided 95 % quantiles of Student's t by degrees of freedom (1-10; 2.0 is a bound beyond)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
# the comparisons the claims rest on: (arm, minus arm)
PAIRS = (
    ("vppo", "grpo"), ("tgf_only", "grpo"), ("random40", "grpo"), ("vppo", "tgf_only"),
    ("tgf_only", "random40"), ("vppo", "random40"), ("vppo", "dapo"), ("dapo", "grpo"),
)  # fmt: skip


def paired(by_arm: dict[str, list[dict]], a: str, b: str) -> dict | None:
    """Test accuracy of arm `a` minus arm `b` on the seeds both ran (same seed = same data order and
    sampling seeds): mean, sample std, the 95 % interval of the mean by the paired t-test (Student's t
    with n - 1 degrees of freedom; None with one seed), and on how many seeds `a` was higher."""
    xa = {r["seed"]: r["test"]["accuracy"] for r in by_arm.get(a, [])}
    xb = {r["seed"]: r["test"]["accuracy"] for r in by_arm.get(b, [])}
    seeds = sorted(set(xa) & set(xb))
    if not seeds:
        return None
    d = [xa[k] - xb[k] for k in seeds]
    m, sd = _mean_std(d)
    half = T975.get(len(d) - 1, 2.0) * sd / math.sqrt(len(d)) if len(d) > 1 else None
    return {
        "seeds": seeds, "diffs": d, "mean": m, "std": sd,
        "ci95": [m - half, m + half] if half is not None else None,
        "higher": sum(x > 0 for x in d),
    }  # fmt: skip


def paired_table(pairs: dict[str, dict]) -> str:
    """Markdown: one row per comparison, in points of test accuracy."""
    lines = [
        "| comparison | seeds | per-seed difference | mean ± std | 95 % interval (paired t) | higher on |",
        "|---|---|---|---|---|---|",
    ]
    for name, p in pairs.items():
        per = ", ".join(f"{100 * x:+.1f}" for x in p["diffs"])
        ci = f"[{100 * p['ci95'][0]:+.1f}, {100 * p['ci95'][1]:+.1f}]" if p["ci95"] else "–"
        lines.append(
            f"| {name} | {len(p['seeds'])} | {per} | {100 * p['mean']:+.1f} ± {100 * p['std']:.1f} | {ci} "
            f"| {p['higher']} of {len(p['seeds'])} |"
        )
    return "\n".join(lines) + "\n"


def load_raw(results: Path) -> dict[str, list[dict]]:
    by_arm: dict[str, list[dict]] = {}
    for p in sorted((Path(results) / "raw").glob("*.json")):
        r = _read_json(p)
        if not isinstance(r, dict) or not {"arm", "seed", "test"} <= set(r):
            raise ValueError(f"{p}: not a raw sweep result (needs arm, seed, test)")
        by_arm.setdefault(r["arm"], []).append(r)
    order = [a for a in ARMS if a in by_arm] + sorted(a for a in by_arm if a not in ARMS)
    return {a: sorted(by_arm[a], key=lambda r: r["seed"]) for a in order}


def aggregate(results: str | Path, plot: bool = True) -> dict:
    """table.md, summary.json (and curves.png) of RESULTS from RESULTS/raw/*.json alone."""
    results = Path(results)
    by_arm = load_raw(results)
    shas = {r.get("base_sha") for runs in by_arm.values() for r in runs} - {None}
    if len(shas) > 1:
        raise ValueError(f"{results}/raw holds runs from {len(shas)} different bases {sorted(shas)}")
    summary: dict[str, dict] = {}
    grpo = {r["seed"]: r["test"]["accuracy"] for r in by_arm.get("grpo", [])}
    for arm, runs in by_arm.items():
        accs = [r["test"]["accuracy"] for r in runs]
        m, sd = _mean_std(accs)
        tasks = sorted({t for r in runs for t in r["test"]["per_task"]})
        s = {
            "seeds": [r["seed"] for r in runs],
            "test_mean": m,
            "test_std": sd,
            "test": accs,
            # validation: the first and last point of each seed's curve, and the gain between them
            "val_first": [r["curve"][0]["val_accuracy"] for r in runs if r["curve"]],
            "val_last": [r["curve"][-1]["val_accuracy"] for r in runs if r["curve"]],
            "per_task": {
                t: _mean_std([r["test"]["per_task"][t] for r in runs if t in r["test"]["per_task"]])
                for t in tasks
            },
            "generated_x": sum(r["generated_samples"] for r in runs)
            / max(1, sum(r["trained_samples"] for r in runs)),
        }
        vs = [r["test"]["accuracy"] - grpo[r["seed"]] for r in runs if r["seed"] in grpo]
        if vs and arm != "grpo":
            s["vs_grpo_mean"], s["vs_grpo_std"] = _mean_std(vs)
        for k in SPOT_KEYS:
            vals = [r["spotlight"].get("all", {}).get(k) for r in runs]
            vals = [v for v in vals if v is not None]
            if vals:
                s[k] = _mean_std(vals)[0]
        summary[arm] = s
    pairs = {}
    for a, b in PAIRS:
        if a in by_arm and b in by_arm and (p := paired(by_arm, a, b)) is not None:
            pairs[f"{LABELS.get(a, a)} - {LABELS.get(b, b)}"] = p
    base = _read_json(results / "base.json")
    extra = {"_base": base["test"]} if base else {}
    _write_json(results / "summary.json", {**summary, **extra, "_paired": pairs})
    (results / "table.md").write_text(markdown_table(summary, base["test"] if base else None))
    (results / "paired.md").write_text(paired_table(pairs))
    spot = spot_curve_table(by_arm)
    if spot:
        (results / "spot_curve.md").write_text(spot)
    if plot and by_arm:
        plot_curves(by_arm, results / "curves.png")
    return summary


# the diagnostic during training, per validation step: (column, spot_* keys shown with a slash)
SPOT_CURVE = (
    ("responses in format", ("spot_parsed_frac",)),
    ("top-40% recall k3", ("spot_k3_recall",)),
    ("R-precision k3 / KL / entropy / random",
     ("spot_k3_rprec", "spot_kl_rprec", "spot_entropy_rprec", "spot_random_rprec")),
    ("k3 mass on visual", ("spot_k3_dep_mass",)),
)  # fmt: skip


def spot_curve_table(by_arm: dict[str, list[dict]]) -> str:
    """The diagnostic during training of every arm that ran it: per validation step, val accuracy and
    the spot_* numbers as mean ± std over the seeds that have that step ('' when no run has them)."""
    lines = []
    for arm, runs in by_arm.items():
        runs = [r for r in runs if any("spot_k3_rprec" in c for c in r["curve"])]
        if not runs:
            continue
        steps = sorted({c["step"] for r in runs for c in r["curve"]})
        head = ["step", "seeds", "val", *(name for name, _ in SPOT_CURVE)]
        lines += [f"{LABELS.get(arm, arm)}, seeds {', '.join(str(r['seed']) for r in runs)} (mean ± std "
                  "over seeds):", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]  # fmt: skip
        for step in steps:
            at = [c for r in runs for c in r["curve"] if c["step"] == step and "spot_k3_rprec" in c]
            cells = [str(step), str(len(at)), _over_seeds([c["val_accuracy"] for c in at])]
            for _, keys in SPOT_CURVE:
                cells.append(" / ".join(_over_seeds([c[k] for c in at if k in c]) for k in keys))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _over_seeds(vals: list[float]) -> str:
    """mean ± std in percent; one value alone; '' for none."""
    if not vals:
        return ""
    m, sd = _mean_std(vals)
    return _pct(m, sd if len(vals) > 1 else None)


def _pct(m: float, sd: float | None = None) -> str:
    return f"{100 * m:.1f}" + (f" ± {100 * sd:.1f}" if sd is not None else "")


def _slash(s: dict, *keys: str) -> str:
    return " / ".join(f"{100 * s[k]:.0f}" for k in keys) if all(k in s for k in keys) else ""


def _val_gain(s: dict, many: bool) -> str:
    first, last = s.get("val_first") or [], s.get("val_last") or []
    if not first or len(first) != len(last):
        return ""
    m, sd = _mean_std([b - a for a, b in zip(first, last)])
    spread = f" ± {100 * sd:.1f}" if many else ""
    return f"{100 * sum(first) / len(first):.1f} → {100 * sum(last) / len(last):.1f} ({100 * m:+.1f}{spread})"


def markdown_table(summary: dict[str, dict], base: dict | None = None) -> str:
    """Test avg@n per arm: mean ± std over seeds, per task, paired gain over GRPO, generations,
    and the spotlight diagnostic (precision / recall of the k3 top-40 % mask)."""
    if not summary:
        return "(no finished runs yet)\n"
    tasks = sorted({t for s in summary.values() for t in s["per_task"]})
    head = [
        "arm",
        "seeds",
        "test (mean ± std)",
        "per seed",
        "val first → last (gain ± std)",
        *tasks,
        "vs GRPO (paired)",
        "generations",
        "visual share",
        "top-40% recall k3 / KL",
        "R-precision k3 / KL / entropy / random",
        "k3 mass on visual",
    ]
    rows = []
    for arm, s in summary.items():
        many = len(s["seeds"]) > 1  # a spread only where there are seeds to spread over
        rows.append([
            LABELS.get(arm, arm),
            str(len(s["seeds"])),
            _pct(s["test_mean"], s["test_std"] if many else None),
            ", ".join(f"{100 * x:.1f}" for x in s["test"]),
            _val_gain(s, many),
            *[
                _pct(s["per_task"][t][0], s["per_task"][t][1] if many else None) if t in s["per_task"] else ""
                for t in tasks
            ],
            (f"{100 * s['vs_grpo_mean']:+.1f}" + (f" ± {100 * s['vs_grpo_std']:.1f}" if many else ""))
            if "vs_grpo_mean" in s
            else "",
            f"{s['generated_x']:.2f}x",
            f"{100 * s['base_rate']:.0f} %" if "base_rate" in s else "",
            _slash(s, "k3_recall", "kl_recall"),
            _slash(s, "k3_rprec", "kl_rprec", "entropy_rprec", "random_rprec"),
            f"{100 * s['k3_dep_mass']:.0f} %" if "k3_dep_mass" in s else "",
        ])  # fmt: skip
    if base is not None:  # the starting point (one evaluation, no seeds)
        per = [_pct(base["per_task"][t]) if t in base["per_task"] else "" for t in tasks]
        cells = ["tiny base (no RL)", "–", _pct(base["accuracy"]) + " (base)", "", "", *per]
        rows.insert(0, cells + [""] * (len(head) - len(cells)))
    # the diagnostic's columns only where a run has them (the default testbed has no visual tokens)
    keep = [i for i in range(len(head)) if i < 5 + len(tasks) or any(r[i] for r in rows[base is not None :])]
    lines = ["| " + " | ".join(head[i] for i in keep) + " |", "|" + "---|" * len(keep)]
    lines += ["| " + " | ".join(r[i] for i in keep) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot_curves(by_arm: dict[str, list[dict]], out: Path) -> Path:
    """Val avg@n and training reward per arm: mean over seeds, +-1 std band."""
    import matplotlib  # heavy: the plot only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg")

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for arm, runs in by_arm.items():
        steps = sorted({p["step"] for r in runs for p in r["curve"]})
        xs, ms, sds = [], [], []
        for st in steps:
            v = [p["val_accuracy"] for r in runs for p in r["curve"] if p["step"] == st]
            if v:
                m, sd = _mean_std(v)
                xs.append(st)
                ms.append(100 * m)
                sds.append(100 * sd)
        (line,) = axes[0].plot(xs, ms, marker="o", ms=3, label=f"{LABELS.get(arm, arm)} ({len(runs)})")
        axes[0].fill_between(
            xs,
            [a - b for a, b in zip(ms, sds)],
            [a + b for a, b in zip(ms, sds)],
            color=line.get_color(),
            alpha=0.15,
        )
        n = min(len(r["reward"]) for r in runs)
        if n:
            k = max(1, n // 10)
            rew = [
                [
                    sum(r["reward"][max(0, i - k + 1) : i + 1]) / len(r["reward"][max(0, i - k + 1) : i + 1])
                    for i in range(n)
                ]
                for r in runs
            ]
            stats = [_mean_std([x[i] for x in rew]) for i in range(n)]
            axes[1].plot(range(1, n + 1), [100 * a for a, _ in stats], color=line.get_color())
            axes[1].fill_between(
                range(1, n + 1),
                [100 * (a - b) for a, b in stats],
                [100 * (a + b) for a, b in stats],
                color=line.get_color(),
                alpha=0.12,
            )
    axes[0].set(xlabel="step", ylabel="val avg@n (%)", title="validation (mean ± std over seeds)")
    axes[1].set(xlabel="step", ylabel="train reward (%)", title="training reward (smoothed)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _seeds(text: str) -> list[int]:
    """'1,2,3' -> [1, 2, 3]; anything else (empty items, non-integers, < 0, repeats) is an error."""
    items = text.split(",")
    if not all(x.strip().isdigit() for x in items):
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated non-negative integers, e.g. 1,2,3")
    seeds = [int(x) for x in items]
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"{text!r}: a seed is repeated")
    return seeds


def _positive(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a positive integer (a run of 0 steps trains nothing)")
    return int(text)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--testbed", default="spotlight", choices=sorted(TESTBEDS), help="task family, base, arms"
    )
    ap.add_argument("--out", default=None, help="run folders (default runs/sweep[_<testbed>], gitignored)")
    ap.add_argument("--results", default=None, help="raw JSON, tables, curves (default: the testbed's)")
    ap.add_argument("--arms", default=None, help="comma-separated (default: the testbed's arms)")
    ap.add_argument("--seeds", type=_seeds, default=None, help="for every arm (default: the testbed's plan)")
    ap.add_argument(
        "--quick", action="store_true",
        help="CI: arms grpo,vppo, seed 1, 2 steps, tiny eval; runs, results: runs/sweep_quick_<testbed>",
    )  # fmt: skip
    ap.add_argument("--steps", type=_positive, default=None, help="override the budget's steps")
    ap.add_argument("--set", action="append", default=[], help="extra override key=value for every arm")
    ap.add_argument("--model", default=None, help="model folder for every arm (default: the shipped base)")
    ap.add_argument(
        "--data", default=None, help="folder with train/val/test parquet (default: the testbed's set)"
    )
    ap.add_argument(
        "--threads", type=_positive, default=1, help="torch threads per run (1 leaves a core free)"
    )
    ap.add_argument("--aggregate-only", action="store_true")
    args = ap.parse_args(argv)
    tb = TESTBEDS[args.testbed]
    # --quick never writes into a committed results folder: its runs and results stay under runs/
    default_out = "runs/sweep" if args.testbed == "spotlight" else f"runs/sweep_{args.testbed}"
    out = Path(args.out or (f"runs/sweep_quick_{args.testbed}" if args.quick else default_out))
    results = Path(args.results or (out / "results" if args.quick else tb.results))
    try:
        if args.aggregate_only:
            s = aggregate(results)
            print(markdown_table(s))
            return s
        budget = QUICK if args.quick else tb.budget
        if args.steps is not None:
            budget = Budget(**{**asdict(budget), "steps": args.steps})
        arms = args.arms.split(",") if args.arms else (["grpo", "vppo"] if args.quick else list(tb.arms))
        if unknown := [a for a in arms if a not in tb.arms]:
            ap.error(f"unknown arms {unknown} for --testbed {args.testbed}; known: {list(tb.arms)}")
        seeds = args.seeds or ([1] if args.quick else None)
        plan = {a: tuple(seeds) if seeds else tb.seeds[a] for a in arms}
        sw = Sweep(
            out, results, budget, tuple(args.set), args.model, args.data, testbed=tb, threads=args.threads
        )
        summary, failed = sw.run(plan)
    except (ValueError, OSError) as e:  # results of another base, an unreadable raw file: named, no traceback
        print(f"vppo.sweep: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(markdown_table(summary))
    if failed:
        print(f"vppo.sweep: {len(failed)} run(s) failed: {failed}", file=sys.stderr)
        sys.exit(1)
    return summary


if __name__ == "__main__":
    main()
