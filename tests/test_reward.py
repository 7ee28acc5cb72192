import time

import pytest

from vppo.reward import (
    Grader,
    GradeStats,
    agreement,
    collapse_ops,
    extract_boxed,
    normalize_pair,
)

T, F = 1.0, 0.0

# Golden set: (content of the last box, ground truth, what a correct grader says).
# Wrapped as "<think>...</think> ... \boxed{content}." below.
BOXED = [
    # integers
    ("5", "5", T),
    ("6", "5", F),
    ("-3", "-3", T),
    ("- 3", "-3", T),
    ("3", "-3", F),
    ("05", "5", T),
    ("5.0", "5", T),
    ("10.0", "10", T),
    ("10", "10.0", T),
    ("0", "0", T),
    ("100", "1000", F),
    ("1,000", "1000", T),
    ("1000", "1,000", T),
    ("1{,}000", "1000", T),
    ("12345", "12345", T),
    ("12346", "12345", F),
    ("{5}", "5", T),
    ("x = 5", "5", T),
    ("x=5", "5", T),
    ("5", "x=5", T),
    ("y=7", "5", F),
    ("2^{10}", "1024", F),  # the released grader wants an integer written as an integer
    ("1e3", "1000", T),
    ("7", "7", T),
    ("42", "24", F),
    # fractions and decimals
    ("\\frac{1}{2}", "0.5", T),
    ("0.5", "\\frac{1}{2}", T),
    ("1/2", "\\frac{1}{2}", T),
    ("\\dfrac{1}{2}", "\\frac{1}{2}", T),
    ("\\tfrac{1}{2}", "\\frac{1}{2}", T),
    ("\\frac12", "\\frac{1}{2}", T),
    ("2/4", "\\frac{1}{2}", F),  # unreduced: wrong, as released
    ("0.50", "0.5", T),
    (".5", "0.5", T),
    ("\\frac{1}{3}", "\\frac{1}{3}", T),
    ("0.333", "\\frac{1}{3}", F),
    ("\\frac{2}{3}", "\\frac{1}{3}", F),
    ("1.5", "\\frac{3}{2}", T),
    ("\\frac{3}{2}", "1.5", T),
    ("1\\frac{1}{2}", "\\frac{3}{2}", T),
    ("-0.5", "-\\frac{1}{2}", T),
    ("\\frac{-1}{2}", "-\\frac{1}{2}", T),
    ("-\\frac{1}{2}", "\\frac{1}{2}", F),
    ("0.25", "\\frac{1}{4}", T),
    ("\\frac{1}{4}", "0.25", T),
    ("0.2", "\\frac{1}{4}", F),
    ("\\frac{7}{8}", "0.875", T),
    ("0.875", "\\frac{7}{8}", T),
    ("\\frac{5}{8}", "0.875", F),
    ("2.50", "2.5", T),
    ("2.05", "2.5", F),
    ("3.14", "3.14", T),
    ("\\frac{22}{7}", "3.14", F),
    # nested braces
    ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt{3}}{2}", T),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt3}{2}", T),
    ("\\sqrt{3}/2", "\\frac{\\sqrt{3}}{2}", T),
    ("\\frac{\\sqrt{2}}{2}", "\\frac{\\sqrt{3}}{2}", F),
    ("3\\sqrt{2}", "\\sqrt{18}", T),
    ("\\sqrt{18}", "3\\sqrt{2}", T),
    ("2\\sqrt{2}", "3\\sqrt{2}", F),
    ("\\sqrt{\\frac{1}{4}}", "\\frac{1}{2}", T),
    ("\\frac{1}{\\frac{1}{2}}", "2", F),  # integer ground truth: integer answer required (released)
    ("\\frac{\\pi}{2}", "\\frac{\\pi}{2}", T),
    ("\\pi/2", "\\frac{\\pi}{2}", T),
    ("\\frac{\\pi}{3}", "\\frac{\\pi}{2}", F),
    ("2\\pi", "2\\pi", T),
    ("\\pi", "3.14159", F),
    ("\\frac{{1}}{{3}}", "\\frac{1}{3}", T),
    ("{\\frac{1}{3}}", "\\frac{1}{3}", T),
    # units
    ("5 cm", "5", T),
    ("5\\text{ cm}", "5", T),
    ("5 \\mathrm{cm}", "5", T),
    ("5 meters", "5", T),
    ("5 dollars", "5", T),
    ("12 \\text{apples}", "12", T),
    ("8 \\text{ cm}^2", "8", T),
    ("8 cm^2", "8", T),
    ("24 \\, \\text{cm}^2", "24", T),
    ("24\\,\\text{cm}^{2}", "24", T),
    ("6\\text{ units}", "6", T),
    ("7 cm", "5", F),
    ("5 cm", "7", F),
    ("3.5 \\text{m}", "3.5", T),
    ("3.5 km", "3.5", T),
    ("2 hours", "2", T),
    ("2 hours", "3", F),
    ("\\$5", "5", T),
    ("\\$5.50", "5.5", T),
    ("120 \\text{ km/h}", "120", T),
    # percentages
    ("50\\%", "50", T),
    ("50%", "50\\%", T),
    ("50", "50\\%", T),
    ("0.5", "50\\%", F),  # documented choice
    ("12\\%", "12", T),
    ("2.5\\%", "2.5", T),
    ("25\\%", "20\\%", F),
    ("12.5\\%", "12.5\\%", T),
    ("100\\%", "100", T),
    ("99\\%", "100\\%", F),
    # degrees
    ("30^\\circ", "30", T),
    ("30^{\\circ}", "30", T),
    ("30°", "30", T),
    ("30", "30^\\circ", T),
    ("45°", "45^\\circ", T),
    ("45^{\\circ}", "45^\\circ", T),
    ("60\\text{°}", "60", T),
    ("60\\degree", "60", T),
    ("90^\\circ", "\\frac{\\pi}{2}", F),
    ("40^\\circ", "50^\\circ", F),
    # multiple choice
    ("A", "A", T),
    ("B", "A", F),
    ("(A)", "A", T),
    ("a", "A", T),
    ("\\text{A}", "A", T),
    ("A.", "A", T),
    ("A)", "A", T),
    ("\\text{(B)}", "B", T),
    ("B: 12", "B", T),
    ("B. 12", "B", T),
    ("C: 12", "B", F),
    ("Option A", "A", T),
    ("option C", "C", T),
    ("Option B", "C", F),
    ("(D)", "(D)", T),
    ("D", "(D)", T),
    ("E", "(D)", F),
    ("\\text{C}", "C", T),
    ("C", "\\text{C}", T),
    ("c)", "C", T),
    ("A", "B", F),
    ("AB", "A", F),
    ("apple", "A", F),
    ("(C)", "B", F),
    ("A", "\\text{A}", T),
    # expressions
    ("x^2+2x+1", "(x+1)^2", T),
    ("(x+1)^2", "x^2+2x+1", T),
    ("x^2+1", "(x+1)^2", F),
    ("2x+3", "3+2x", T),
    ("2x+3", "2x-3", F),
    ("\\sqrt{2}", "sqrt(2)", T),
    ("\\sqrt{2}", "\\sqrt{3}", F),
    ("2\\sqrt{3}", "\\sqrt{12}", T),
    ("\\infty", "\\infty", T),
    ("-\\infty", "\\infty", F),
    ("\\frac{x}{2}", "0.5x", T),
    ("a+b", "b+a", T),
    ("a-b", "b-a", F),
    ("2(x+1)", "2x+2", T),
    ("\\log_2 8", "3", F),  # not evaluated by the released grader; a known limitation
    ("e^{2}", "e^2", T),
    ("\\sin x", "\\sin(x)", T),
    ("\\cos x", "\\sin(x)", F),
    ("\\log x", "\\log(x)", T),
    ("x^3", "x^2", F),
    ("\\frac{1}{x}", "x^{-1}", T),
    ("y=2x+1", "y=2x+1", T),
    # tuples and intervals
    ("(1,2)", "(1,2)", T),
    ("(1, 2)", "(1,2)", T),
    ("(1,2)", "[1,2]", F),
    ("(2,1)", "(1,2)", F),
    ("[1,2)", "[1,2)", T),
    ("\\left(1,2\\right)", "(1,2)", T),
    ("(1,3)", "(1,2)", F),
    ("(0.5, 2)", "(\\frac{1}{2}, 2)", T),
    ("1, 2", "1, 2", T),
    ("2, 1", "1, 2", F),
    # inequalities (whitespace around < > collapsed)
    ("x < 5", "x<5", T),
    ("x<5", "x < 5", T),
    ("x > 5", "x>5", T),
    ("x > 5", "x<5", F),
    ("x \\leq 3", "x \\leq 3", T),
    ("3 / 4", "\\frac{3}{4}", T),
    ("3 /4", "3/4", T),
    ("x < 6", "x<5", F),
    ("x>-1", "x > -1", T),
    ("1 / 3", "1/3", T),
    # text answers
    ("Yes", "yes", T),
    ("yes", "Yes", T),
    ("No", "Yes", F),
    ("\\text{yes}", "yes", T),
    ("True", "true", T),
    ("red", "red", T),
    ("blue", "red", F),
    ("\\text{square}", "square", T),
    ("circle", "square", F),
    ("Tuesday", "tuesday", T),
    # empty / degenerate boxes
    ("", "5", F),
    (" ", "5", F),
    ("None", "5", F),
    ("5 or 6", "5", F),
    ("5, 6", "5", F),
    # Unicode look-alikes (mapped to ASCII on both sides; plain mathruler scores these 0)
    ("\u22123", "-3", T),  # U+2212 minus sign
    ("-3", "\u22123", T),
    ("\uff0d3", "-3", T),  # U+FF0D fullwidth hyphen-minus
    ("-3", "\uff0d3", T),
    ("\u20133", "-3", T),  # U+2013 en dash
    ("-3", "\u20133", T),
    ("\u2212\\frac{1}{2}", "-0.5", T),
    ("\u22123", "3", F),  # the minus still counts
    ("3", "\u22123", F),
    ("\uff0d3", "3", F),
    ("\uff11\uff12", "12", T),  # fullwidth digits
    ("12", "\uff11\uff12", T),
    ("\uff11\uff13", "12", F),
    ("\uff22", "B", T),  # fullwidth letter (multiple choice)
    ("B", "\uff22", T),
    ("\uff22", "A", F),
    ("x\uff1d5", "5", T),  # fullwidth equals sign
    ("2 \u00d7 3", "2 \\times 3", T),  # multiplication sign
    ("2 \\times 3", "2\u00d73", T),
    ("2 \u00d7 3", "2 \\times 4", F),
    ("1\u00a0000", "1000", T),  # no-break space as a thousands separator
    ("1000", "1\u202f000", T),  # narrow no-break space
    ("x\u2009=\u20095", "5", T),  # thin spaces
    ("1\u00a0001", "1000", F),
]

# Whole responses: box forms, several boxes, no box.
RAW = [
    ("The answer is \\boxed{5}.", "5", T),
    ("\\boxed{5}", "5", T),
    ("\\fbox{5}", "5", T),
    ("so \\fbox{\\frac{1}{3}}", "\\frac{1}{3}", T),
    ("\\fbox{7}", "5", F),
    ("first \\boxed{3}, then \\fbox{5}", "5", T),
    ("first \\fbox{5}, then \\boxed{3}", "5", F),
    ("\\boxed {5}", "5", T),
    ("\\boxed 5", "5", T),
    ("\\boxed{3} wait, no: \\boxed{5}", "5", T),
    ("\\boxed{5} wait, no: \\boxed{3}", "5", F),
    ("<think>maybe \\boxed{4}</think> \\boxed{5}", "5", T),
    ("<think>maybe \\boxed{5}</think> \\boxed{4}", "5", F),
    ("\\boxed{1}\\boxed{2}\\boxed{3}", "3", T),
    ("\\boxed{\\boxed{5}}", "5", T),
    ("The answer is 5.", "5", F),  # no box scores 0
    ("5", "5", F),
    ("", "5", F),
    ("The answer is \\boxed{5", "5", F),  # never closed
    ("\\boxed{", "5", F),
    ("None", "None", F),  # mathruler's extractor returns "None" for no box; we do not
    ("boxed{5}", "5", F),
    ("\\boxed{\\frac{1}{2}} and more text after", "0.5", T),
    ("$\\boxed{x < 5}$", "x<5", T),
    ("<think> x > 1 </think> \\boxed{ x >  1 }", "x>1", T),
    ("\\boxed{\\text{(A)}}", "A", T),
    ("I choose \\boxed{B}", "A", F),
    ("\\boxed{\\frac{1}{3}}\n\nFinal: \\boxed{0.5}", "\\frac{1}{2}", T),
    ("answer: \\boxed{\\left\\{1, 2\\right\\}}", "\\{1, 2\\}", T),
    ("\\boxed{} \\boxed{5}", "5", T),
]


def _wrap(c: str) -> str:
    return f"<think>Look at the figure and compute.</think> So the answer is \\boxed{{{c}}}."


GOLDEN = [(_wrap(c), g, e) for c, g, e in BOXED] + RAW


@pytest.fixture(scope="module")
def grader():
    with Grader(num_workers=2, timeout=1.0) as g:
        yield g


def test_golden_set_size():
    assert len(GOLDEN) >= 200


def test_golden_set(grader):
    responses = [r for r, _, _ in GOLDEN]
    answers = [g for _, g, _ in GOLDEN]
    scores, stats = grader.grade(responses, answers)
    wrong = [(r[-60:], g, e, s) for (r, g, e), s in zip(GOLDEN, scores) if s != e]
    assert not wrong, wrong
    assert stats.n == len(GOLDEN) and stats.failures == 0
    assert stats.correct == sum(e for _, _, e in GOLDEN)
    assert stats.no_box == 9  # 7 RAW cases without a closed box, 2 empty boxes


def test_extract_boxed():
    assert extract_boxed("a \\boxed{\\frac{1}{3}} b") == "\\frac{1}{3}"
    assert extract_boxed("\\boxed{1} \\fbox{2} \\boxed{{3}}") == "{3}"
    assert extract_boxed("no box") is None
    assert extract_boxed("\\boxed{unclosed {}") is None
    assert extract_boxed("\\boxed{a}}}") == "a"
    assert collapse_ops("x  <  5 / 2 >1") == "x<5/2>1"


def test_normalize_pair_choices():
    assert normalize_pair("B: 12", "(B)") == ("B", "B")
    assert normalize_pair("5 dollars", "5") == ("5", "5")
    assert normalize_pair("5 dollars", "\\frac{1}{2}")[0] == "5 dollars"  # units only against numbers
    assert normalize_pair("30°", "30^{\\circ}") == ("30", "30")


def test_adversarial_answer_scores_zero_fast(grader):
    # 10,000 characters: deeply nested braces around a huge exponent tower.
    core = "9**9**9^{9^{9^{9}}}"
    depth = (10_000 - len(core)) // 2
    bad = "\\boxed{" + "{" * depth + core + "}" * depth + "}"
    assert len(bad) >= 10_000
    t = time.perf_counter()
    scores, stats = grader.grade([bad, _wrap("5")], ["x", "5"])
    assert time.perf_counter() - t < 1.0
    assert scores == [0.0, 1.0] and stats.too_long == 1


def test_hung_grade_is_killed_and_counted():
    # Without the length cap the same answer reaches sympy, which hangs on 9**9**9: the worker
    # must be killed at the time limit, the sample scores 0, the timeout is counted, and the
    # pool keeps working afterwards.
    with Grader(num_workers=1, timeout=0.5, max_answer_chars=None) as g:
        g.grade([_wrap("1")], ["1"])  # warm (worker started)
        depth = 5000
        bad = "\\boxed{" + "{" * depth + "9**9**9" + "}" * depth + "}"
        t = time.perf_counter()
        scores, stats = g.grade([bad], ["x"])
        elapsed = time.perf_counter() - t
        assert scores == [0.0] and stats.timeouts == 1 and stats.failures == 1
        assert elapsed < 1.0, elapsed
        assert "timeout" in stats.examples[0]
        scores, stats = g.grade([_wrap("2"), _wrap("3")], ["2", "4"])
        assert scores == [1.0, 0.0] and stats.failures == 0
        assert g.totals.timeouts == 1 and g.totals.n == 4


def test_timeouts_do_not_block_other_samples():
    with Grader(num_workers=2, timeout=0.5) as g:
        resp = [_wrap("9**9**9"), _wrap("4"), _wrap("9**9**9"), _wrap("\\frac{1}{2}")] + [_wrap("7")] * 20
        ans = ["x", "4", "y", "0.5"] + ["7"] * 20
        scores, stats = g.grade(resp, ans)
        assert scores == [0.0, 1.0, 0.0, 1.0] + [1.0] * 20
        assert stats.timeouts == 2 and stats.correct == 22


def test_worker_crash_is_counted(grader, monkeypatch):
    # A worker that dies mid-sample (segfault, OOM kill) scores 0, counts as a crash and is replaced.
    import vppo.reward as R

    with Grader(num_workers=1, timeout=5.0) as g:
        g.grade([_wrap("1")], ["1"])
        w = g._workers[0]
        orig = w.send

        def die_then_send(payload):
            w.proc.kill()  # dies with the sample assigned (killing after the send would race its answer)
            w.proc.wait()
            orig(payload)

        monkeypatch.setattr(w, "send", die_then_send)
        scores, stats = g.grade([_wrap("1")], ["1"])
        assert scores == [0.0] and stats.crashes == 1
        assert g.grade([_wrap("1")], ["1"])[0] == [1.0]
    assert R.GradeStats is GradeStats


def test_bad_input(grader):
    with pytest.raises(ValueError, match="differ in length"):
        grader.grade(["a"], [])
    with pytest.raises(ValueError, match="responses\\[0\\]"):
        grader.grade([None], ["1"])
    with pytest.raises(ValueError, match="num_workers"):
        Grader(num_workers=0)


def test_closed_pool_refuses():
    g = Grader(num_workers=1)
    g.close()
    with pytest.raises(RuntimeError, match="closed"):
        g.grade([_wrap("1")], ["1"])


def test_math_verify_agreement(grader):
    resp = [r for r, _, _ in GOLDEN]
    ans = [g for _, g, _ in GOLDEN]
    a = agreement(resp, ans, grader)
    assert a.n == len(GOLDEN) and a.agree + len(a.disagreements) == a.n
    assert a.both_correct + a.ruler_only == sum(e for _, _, e in GOLDEN)
    # The two graders agree on the clear cases; the rate is reported, not pinned.
    assert a.rate > 0.7
    print(f"\nmath-verify agreement on the golden set: {a.agree}/{a.n} = {a.rate:.1%}")


def test_hung_worker_dies_with_its_parent(tmp_path):
    # A parent killed while a worker is stuck in sympy must not leave the worker spinning.
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    script = (
        f"import sys; sys.path.insert(0, {str(repo)!r})\n"
        "from vppo.reward import Grader\n"
        "g = Grader(num_workers=1, timeout=60)\n"
        "g.grade(['\\\\boxed{1}'], ['1'])\n"
        "print(g._workers[0].proc.pid, flush=True)\n"
        "g.grade(['\\\\boxed{9**9**9}'], ['x'])\n"
    )
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    worker = int(p.stdout.readline())
    time.sleep(0.3)  # the worker is now inside the hung sympy call
    p.send_signal(signal.SIGKILL)
    p.wait()
    for _ in range(50):
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            break
        with open(f"/proc/{worker}/stat") as f:
            if f.read().split(")")[-1].split()[0] == "Z":
                break  # a zombie waiting for init to reap it: dead
        time.sleep(0.1)
    else:
        os.kill(worker, signal.SIGKILL)
        raise AssertionError("grader worker outlived its parent")
