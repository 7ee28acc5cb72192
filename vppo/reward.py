"""Boxed-answer reward: the last \\boxed{...} of a response graded against the ground truth.

The grader is the released one (mathruler's `grade_answer`, sympy underneath) behind three
guards, because sympy can hang or blow up on what a policy writes:
- extraction is a linear scan (the LAST \\boxed{...} or \\fbox{...}, balanced braces; an
  unclosed box is no answer), and an extracted answer longer than `max_answer_chars` scores 0
  without being parsed;
- grading runs in worker processes with a hard time limit per sample: a worker that overruns
  is killed (SIGKILL) and replaced, and the sample scores 0;
- every timeout, exception and worker crash is counted in GradeStats and logged, never
  swallowed silently.

    with Grader(num_workers=2, timeout=1.0) as g:       # reuse across steps
        scores, stats = g.grade(responses, answers)    # list[float] in {0, 1}, GradeStats

Normalisation (where plain mathruler disagrees with what a correct grader should say; each is
pinned by a golden case in tests/test_reward.py):
- whitespace around `<`, `>` and `/` is collapsed in the whole response first (as released);
- LaTeX spacing commands (`\\,` `\\;` `\\!` `\\quad` ...) are dropped, so `24 \\, \\text{cm}^2`
  is 24;
- degree signs (`°`, `^\\circ`, `^{\\circ}`, `\\degree`) are dropped on both sides: `30°` is 30;
- a number followed by a unit word (`5 dollars`, `12 \\text{apples}`, `8 cm^2`) is the number
  when the ground truth is a plain number;
- multiple choice: when the ground truth is one capital letter (optionally `(B)` or
  `\\text{B}`), answers written `B.`, `B)`, `(B)`, `B: 12`, `Option B` are the letter;
- a trailing full stop is dropped;
- `\\sin x` is read as `\\sin(x)` (one-character arguments of sin, cos, tan, log, ln, exp);
- Unicode look-alikes are mapped to ASCII on both sides before anything else: the minus-like
  characters (U+2212 minus, U+FF0D fullwidth hyphen-minus, U+2013 en dash, U+2012, U+2014,
  U+2010, U+2011, U+FE63) to `-`; `×` to `\\times` and `÷` to `\\div`; fullwidth ASCII
  (U+FF01-U+FF5E: digits, letters, punctuation) to ASCII; non-breaking and thin spaces (U+00A0,
  U+2009, U+202F, U+2007, U+200A, U+3000) to a space; zero-width space (U+200B) removed. This is
  an explicit table, not NFKC (which would also turn `x²` into `x2`). Plain mathruler scores
  `\\boxed{−3}` against `-3` as 0; here it is 1. Paper parity: only answers that mathruler
  scores 0 because of a look-alike character can change, and only from 0 to 1 (an answer with
  no such character is graded exactly as before; `−3` against `3` still scores 0).
Kept as mathruler decides (documented choices, also pinned by golden cases): an unreduced
fraction (`2/4` against `\\frac{1}{2}`) is wrong; `0.5` is not `50\\%` (the percent sign is
dropped, so `50` is `50\\%`); ordered tuples keep their order and bracket type; an integer
ground truth needs an answer written as an integer (`2^{10}`, `\\log_2 8` against 1024, 3 score
0: the released reward does not reward unsimplified answers, and parity with it matters more
here than leniency). math-verify is more lenient on exactly these, and stricter on answer forms
(`B: 12`, `5 dollars`, `30°`) and on several boxes (it does not always take the last one).

`Grader.grade_released(...)` scores exactly as the authors' harness does (xhguo7/PAPO-Eval
`papo_eval/eval_utils.py`): whitespace around `< > /` collapsed, mathruler's
`extract_boxed_content` (the last `\\boxed{`, braces balanced; the string "None" when there is
none), mathruler's `grade_answer` against the label as stored; none of the normalisation above. It
runs in the same worker pool, so a sympy hang costs one timeout (scored 0, counted) where the
authors' loop would wait.

`agreement(...)` grades the same pairs with math-verify (optional extra) in the same pool and
reports how often the two agree, for the evaluation report.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import logging
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

_REPO_ROOT = str(Path(__file__).resolve().parent.parent)

# ---------------------------------------------------------------------------------------------
# Extraction and normalisation (run in the caller's process; all linear time).

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BOX_BARE_RE = re.compile(r"\\boxed +([^\s$]+)")
_WS_OPS_RE = re.compile(r"\s*(<|>|/)\s*")


def collapse_ops(text: str) -> str:
    """Whitespace around `< > /` removed (the released recipe does this to the whole response)."""
    return _WS_OPS_RE.sub(r"\1", text)


def extract_boxed(text: str) -> str | None:
    """Content of the LAST \\boxed{...} / \\fbox{...} (balanced braces), or of a trailing
    `\\boxed x`; None when there is no box or the last one never closes."""
    last = None
    for last in _BOX_RE.finditer(text):  # noqa: B007 - we want the last match
        pass
    bare = None
    for bare in _BOX_BARE_RE.finditer(text):  # noqa: B007
        pass
    if bare is not None and (last is None or bare.start() > last.start()):
        return bare.group(1).strip()
    if last is None:
        return None
    depth = 1
    start = last.end()
    for i in range(start, len(text)):
        c = text[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start:i].strip()
    return None


_SPACING_RE = re.compile(r"\\(?:,|;|:|!|>| |quad|qquad)")
_DEGREE_RE = re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\degree|°|\\text\{\s*°\s*\}")
_NUMBER_RE = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")
_NUM_UNIT_RE = re.compile(
    r"^(?P<num>-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+)\s*"
    r"(?:\\(?:text|mathrm|mbox)\s*\{\s*[A-Za-z][A-Za-z .]*\}|[A-Za-z]{2,}(?: [A-Za-z]{2,})*)"
    r"\s*(?:\^\s*\{?\s*[23]\s*\}?)?$"
)
_LETTER_GT_RE = re.compile(r"^(?:\\text\s*\{\s*)?\(?\s*([A-Z])\s*\)?(?:\s*\})?$")
_LETTER_PRED_RE = re.compile(
    r"^(?:\\text\s*\{\s*)?(?:(?:option|choice|answer)\s*:?\s*)?\(?\s*([A-Za-z])\s*(?:\)|\.|:|\}|$)", re.I
)


_FUNC_ARG_RE = re.compile(r"\\(sin|cos|tan|cot|sec|csc|ln|log|exp)\s+([A-Za-z0-9])(?![A-Za-z0-9])")


_LOOKALIKES = {
    **{c: "-" for c in "\u2212\uff0d\u2013\u2012\u2014\u2010\u2011\ufe63"},
    **{c: " " for c in "\u00a0\u2009\u202f\u2007\u200a\u3000"},
    "\u200b": "",
    "\u00d7": " \\times ",
    "\u00f7": " \\div ",
    **{chr(c): chr(c - 0xFEE0) for c in range(0xFF01, 0xFF5F) if c != 0xFF0D},
}
_LOOKALIKE_TABLE = str.maketrans(_LOOKALIKES)


def unicode_to_ascii(s: str) -> str:
    """Unicode look-alikes a model writes (minus signs, ×, fullwidth forms, odd spaces) as ASCII."""
    return s.translate(_LOOKALIKE_TABLE)


def _clean(s: str) -> str:
    s = unicode_to_ascii(s)
    s = _SPACING_RE.sub(" ", s).replace("~", " ")
    s = _FUNC_ARG_RE.sub(r"\\\1(\2)", s)  # \sin x -> \sin(x): sympy reads "sinx" as s*i*n*x
    s = _DEGREE_RE.sub("", s).strip()
    if s.endswith(".") and not s.endswith(".."):
        s = s[:-1].rstrip()
    return s


def normalize_pair(pred: str, gt: str) -> tuple[str, str]:
    """The (prediction, ground truth) handed to grade_answer; see the module docstring."""
    pred, gt = _clean(pred), _clean(gt)
    m = _LETTER_GT_RE.match(gt)
    if m is not None:
        p = _LETTER_PRED_RE.match(pred)
        # "A: 12" is choice A; a lower-case single letter only counts when it stands alone.
        if p is not None and (p.group(1).isupper() or len(pred.strip("(){}. ")) == 1):
            return p.group(1).upper(), m.group(1)
        return pred, m.group(1)
    if _NUMBER_RE.fullmatch(gt):
        u = _NUM_UNIT_RE.match(pred)
        if u is not None:
            pred = u.group("num")
    return pred, gt


def extract_boxed_released(text: str) -> str | None:
    """What the authors' harness grades: mathruler's extract_boxed_content of the response with the
    whitespace around `< > /` collapsed; None where it finds no box (its "None" sentinel)."""
    from mathruler.grader import extract_boxed_content  # sympy: ~1 s, on first use only

    content = extract_boxed_content(collapse_ops(text))
    return None if content == "None" else content


# ---------------------------------------------------------------------------------------------
# Worker processes (a fresh interpreter each: no torch, no CUDA, no inherited threads).


def _worker_main() -> None:
    """Read JSON lines [id, kind, pred, gt] from stdin, answer [id, score, error] on stdout."""
    mem_mb = int(os.environ.get("VPPO_GRADER_MEM_MB", "0"))
    if mem_mb > 0:
        import resource  # in the worker process only

        resource.setrlimit(resource.RLIMIT_AS, (mem_mb << 20, mem_mb << 20))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    if sys.platform.startswith("linux"):
        # Die with the parent: a worker stuck in sympy would never see its stdin close.
        import ctypes  # in the worker process only

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
        if os.getppid() != int(os.environ.get("VPPO_GRADER_PARENT", os.getppid())):
            return  # the parent died before prctl took effect
    from mathruler.grader import extract_boxed_content, grade_answer  # in the worker only: sympy, ~0.3 s

    out = sys.stdout
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        tid, kind, a, b = json.loads(line)
        err = None
        try:
            if kind == "ruler":
                score = float(grade_answer(a, b))
            elif kind == "released":  # PAPO-Eval eval_utils.compute_accuracy_boxed_math, exactly
                score = float(grade_answer(extract_boxed_content(collapse_ops(a)), b))
            elif kind == "verify":
                score = float(_math_verify(a, b))
            else:
                raise ValueError(f"unknown task kind {kind!r}")
        except Exception as e:  # counted and reported by the parent
            score, err = 0.0, f"{type(e).__name__}: {str(e)[:200]}"
        out.write(json.dumps([tid, score, err]) + "\n")
        out.flush()


def _math_verify(response: str, gt: str) -> bool:
    from math_verify import parse, verify  # optional extra, in the worker

    # Our pool enforces the time limit; math-verify's own signal.alarm timeouts are switched off.
    gold = parse(f"${gt}$", parsing_timeout=None)
    pred = parse(response, parsing_timeout=None)
    return bool(verify(gold, pred, timeout_seconds=None))


class _Worker:
    def __init__(self, mem_mb: int):
        env = dict(os.environ)
        env["PYTHONPATH"] = _REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
        env["VPPO_GRADER_MEM_MB"] = str(mem_mb)
        env["VPPO_GRADER_PARENT"] = str(os.getpid())
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from vppo.reward import _worker_main; _worker_main()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            env=env,
            start_new_session=True,  # a terminal's Ctrl-C does not reach it mid-grade
        )
        self.fd = self.proc.stdout.fileno()
        os.set_blocking(self.fd, False)
        self.buf = b""
        self.ready = False
        self.task: int | None = None  # index of the sample being graded
        self.deadline = 0.0

    def send(self, payload: list) -> None:
        self.proc.stdin.write((json.dumps(payload) + "\n").encode())
        self.proc.stdin.flush()

    def read_lines(self) -> list[str] | None:
        """Complete lines available now; None on EOF (the worker died)."""
        try:
            chunk = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return []
        if not chunk:
            return None
        self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        return [ln.decode() for ln in lines]

    def stderr_tail(self) -> str:
        try:
            self.stderr.seek(0)
            return self.stderr.read()[-2000:].decode(errors="replace")
        except (OSError, ValueError):
            return ""

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout, self.stderr):
            try:
                f.close()
            except OSError:
                pass


# ---------------------------------------------------------------------------------------------
# The pool.


@dataclass
class GradeStats:
    """Counts of one grade() call (also accumulated over the Grader's life in Grader.totals)."""

    n: int = 0
    correct: int = 0
    no_box: int = 0  # no \boxed{...} (or an unclosed one): scored 0
    too_long: int = 0  # extracted answer longer than max_answer_chars: scored 0 without parsing
    timeouts: int = 0  # worker killed after the time limit: scored 0
    errors: int = 0  # exception inside the grader: scored 0
    crashes: int = 0  # worker died (segfault, out of memory): scored 0
    seconds: float = 0.0
    examples: list[str] = field(default_factory=list)  # a few of the failures, for the log

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    @property
    def failures(self) -> int:
        return self.timeouts + self.errors + self.crashes

    def add(self, other: GradeStats) -> None:
        for k in ("n", "correct", "no_box", "too_long", "timeouts", "errors", "crashes", "seconds"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        self.examples = (self.examples + other.examples)[-10:]

    def as_dict(self) -> dict:
        keys = ("n", "correct", "no_box", "too_long", "timeouts", "errors", "crashes", "seconds")
        return {f"grader/{k}": getattr(self, k) for k in keys} | {"grader/accuracy": self.accuracy}


class Grader:
    """A pool of grading processes with a hard per-sample time limit; reusable, close() when done.

    num_workers: processes (each ~60 MB, started once, replaced when killed);
    timeout: seconds one sample may take in a worker before it is killed and scores 0;
    max_answer_chars: longer extracted answers score 0 unparsed (None = no limit);
    memory_mb: address-space limit per worker (an exhausted one raises MemoryError: scored 0).
    """

    def __init__(
        self,
        num_workers: int = 2,
        timeout: float = 1.0,
        max_answer_chars: int | None = 1000,
        memory_mb: int = 2048,
        start_timeout: float = 60.0,
    ):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        self.num_workers, self.timeout = num_workers, float(timeout)
        self.max_answer_chars, self.memory_mb, self.start_timeout = max_answer_chars, memory_mb, start_timeout
        self.totals = GradeStats()
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._closed = False

    # -- public ---------------------------------------------------------------------------------

    def grade(self, responses: list[str], answers: list[str]) -> tuple[list[float], GradeStats]:
        """Score each response 1.0 / 0.0 against its ground truth. -> (scores [N], GradeStats)."""
        if len(responses) != len(answers):
            raise ValueError(f"responses ({len(responses)}) and answers ({len(answers)}) differ in length")
        t0 = time.perf_counter()
        stats = GradeStats(n=len(responses))
        scores = [0.0] * len(responses)
        todo = []
        for i, (resp, gt) in enumerate(zip(responses, answers)):
            if not isinstance(resp, str) or not isinstance(gt, str):
                raise ValueError(f"responses[{i}] and answers[{i}] must be str")
            pred = extract_boxed(collapse_ops(resp))
            if pred is None or not pred:
                stats.no_box += 1
                continue
            if self.max_answer_chars is not None and len(pred) > self.max_answer_chars:
                stats.too_long += 1
                continue
            pred, gt = normalize_pair(pred, collapse_ops(gt).strip())
            todo.append((i, "ruler", pred, gt))
        self._run(todo, scores, stats)
        stats.correct = int(sum(s > 0 for s in scores))
        stats.seconds = time.perf_counter() - t0
        self.totals.add(stats)
        if stats.failures:
            log.warning(
                "grader: %d timeouts, %d errors, %d crashes in %d samples (scored 0); e.g. %s",
                stats.timeouts,
                stats.errors,
                stats.crashes,
                stats.n,
                stats.examples[:3],
            )
        return scores, stats

    def grade_released(self, responses: list[str], answers: list[str]) -> tuple[list[float], GradeStats]:
        """Score each response exactly as the authors' harness does (module docstring), with this
        pool's time limit. -> (scores [N], GradeStats); `no_box` counts responses without a box."""
        if len(responses) != len(answers):
            raise ValueError(f"responses ({len(responses)}) and answers ({len(answers)}) differ in length")
        t0 = time.perf_counter()
        stats = GradeStats(n=len(responses))
        scores = [0.0] * len(responses)
        for i, (resp, gt) in enumerate(zip(responses, answers)):
            if not isinstance(resp, str) or not isinstance(gt, str):
                raise ValueError(f"responses[{i}] and answers[{i}] must be str")
        # The authors grade every response, boxed or not (mathruler gets "None"); so does this.
        stats.no_box = sum("\\boxed{" not in collapse_ops(r) for r in responses)
        self._run(
            [(i, "released", r, gt) for i, (r, gt) in enumerate(zip(responses, answers))], scores, stats
        )
        stats.correct = int(sum(s > 0 for s in scores))
        stats.seconds = time.perf_counter() - t0
        self.totals.add(stats)
        if stats.failures:
            log.warning("grader (released): %d timeouts, %d errors, %d crashes in %d samples (scored 0)",
                        stats.timeouts, stats.errors, stats.crashes, stats.n)  # fmt: skip
        return scores, stats

    def grade_math_verify(self, responses: list[str], answers: list[str]) -> tuple[list[float], GradeStats]:
        """The same pairs graded by math-verify (whole response, its own extraction), same limits."""
        t0 = time.perf_counter()
        stats = GradeStats(n=len(responses))
        scores = [0.0] * len(responses)
        todo = []
        for i, (resp, gt) in enumerate(zip(responses, answers)):
            if self.max_answer_chars is not None and len(resp) > 50 * self.max_answer_chars:
                stats.too_long += 1
                continue
            todo.append((i, "verify", resp, gt))
        self._run(todo, scores, stats)
        stats.correct = int(sum(s > 0 for s in scores))
        stats.seconds = time.perf_counter() - t0
        return scores, stats

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for w in self._workers:
                w.kill()
            self._workers = []

    def __enter__(self) -> Grader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # -- the scheduler ----------------------------------------------------------------------------

    def _spawn(self) -> _Worker:
        w = _Worker(self.memory_mb)
        w.deadline = time.monotonic() + self.start_timeout
        return w

    def _run(self, todo: list[tuple[int, str, str, str]], scores: list[float], stats: GradeStats) -> None:
        if not todo:
            return
        with self._lock:
            if self._closed:
                raise RuntimeError("Grader is closed")
            while len(self._workers) < min(self.num_workers, len(todo)):
                self._workers.append(self._spawn())
            queue = list(reversed(todo))
            pending = {}  # task index -> (kind, pred, gt) of tasks sent and not answered
            while queue or pending:
                for w in self._workers:
                    if w.ready and w.task is None and queue:
                        i, kind, a, b = queue.pop()
                        w.task, w.deadline = i, time.monotonic() + self.timeout
                        pending[i] = (kind, a, b)
                        try:
                            w.send([i, kind, a, b])
                        except (BrokenPipeError, OSError):
                            pass  # seen as EOF below
                now = time.monotonic()
                wait = min(1.0, max(0.0, min(w.deadline for w in self._workers) - now))
                readable, _, _ = select.select([w.fd for w in self._workers], [], [], wait)
                for k, w in enumerate(list(self._workers)):
                    lines = w.read_lines() if w.fd in readable else []
                    if lines is None:  # EOF: the worker died
                        if not w.ready:
                            w.kill()
                            raise RuntimeError(f"grader worker failed to start:\n{w.stderr_tail()}")
                        i = w.task
                        if i is not None:
                            stats.crashes += 1
                            stats.examples.append(f"crash (exit {w.proc.poll()}) on {pending[i][1][:80]!r}")
                            pending.pop(i)
                        w.kill()
                        self._workers[k] = self._spawn()
                        continue
                    for line in lines:
                        if line == "ready":
                            w.ready = True
                            w.deadline = float("inf")
                            continue
                        try:
                            i, score, err = json.loads(line)
                        except ValueError:
                            continue  # stray output from a library; the answer line follows
                        if i in pending:
                            scores[i] = float(score)
                            if err is not None:
                                stats.errors += 1
                                stats.examples.append(f"{err} on {pending[i][1][:80]!r}")
                            pending.pop(i)
                        w.task, w.deadline = None, float("inf")
                    if time.monotonic() >= w.deadline:
                        if not w.ready:
                            w.kill()
                            msg = f"grader worker did not start within {self.start_timeout} s"
                            raise RuntimeError(f"{msg}:\n{w.stderr_tail()}")
                        i = w.task
                        stats.timeouts += 1
                        stats.examples.append(f"timeout ({self.timeout} s) on {pending[i][1][:80]!r}")
                        pending.pop(i)
                        w.kill()  # the only way to stop a hung sympy call
                        self._workers[k] = self._spawn()


# ---------------------------------------------------------------------------------------------
# Agreement with math-verify (for the evaluation report).


@dataclass
class Agreement:
    n: int
    agree: int
    both_correct: int
    ruler_only: int  # the boxed-answer grader says correct, math-verify says wrong
    verify_only: int
    rate: float
    disagreements: list[tuple[int, float, float]]  # (index, ruler score, math-verify score)


def agreement(responses: list[str], answers: list[str], grader: Grader) -> Agreement:
    """How often the boxed-answer grader and math-verify agree on these pairs."""
    if importlib.util.find_spec("math_verify") is None:
        raise RuntimeError("math-verify is not installed: pip install 'vppo[verify]'")
    r, _ = grader.grade(responses, answers)
    v, _ = grader.grade_math_verify(responses, answers)
    dis = [(i, a, b) for i, (a, b) in enumerate(zip(r, v)) if (a > 0) != (b > 0)]
    n = len(r)
    return Agreement(
        n=n,
        agree=n - len(dis),
        both_correct=sum(a > 0 and b > 0 for a, b in zip(r, v)),
        ruler_only=sum(a > 0 and b == 0 for a, b in zip(r, v)),
        verify_only=sum(a == 0 and b > 0 for a, b in zip(r, v)),
        rate=(n - len(dis)) / n if n else 1.0,
        disagreements=dis,
    )


# A process-wide default pool for callers that do not manage one (closed at exit).
_default: Grader | None = None


def default_grader() -> Grader:
    global _default
    if _default is None or _default._closed:
        _default = Grader()
        atexit.register(_default.close)
    return _default


def grade(responses: list[str], answers: list[str]) -> tuple[list[float], GradeStats]:
    """Grade with the process-wide default pool (see Grader for a managed one)."""
    return default_grader().grade(responses, answers)
