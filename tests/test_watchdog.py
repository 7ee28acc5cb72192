import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from vppo.watchdog import PhaseTimer

REPO = Path(__file__).resolve().parent.parent


def test_phase_timings():
    with PhaseTimer(install_signal=False) as t:
        with t.phase("generate"):
            time.sleep(0.05)
        with t.phase("update"):
            with t.phase("micro"):
                time.sleep(0.02)
        with t.phase("generate"):
            time.sleep(0.01)
        last = t.last()
        assert set(last) == {"generate", "update", "micro"}
        assert 0.06 <= last["generate"] < 1.0 and last["update"] >= last["micro"] >= 0.02
        assert t.counts["generate"] == 2 and t.last() == {}  # reset after reading
        with t.phase("update"):
            pass
        assert set(t.last()) == {"update"} and t.counts["update"] == 2


def test_phase_records_time_when_it_raises():
    t = PhaseTimer(install_signal=False)
    with pytest.raises(RuntimeError):
        with t.phase("reward"):
            raise RuntimeError("boom")
    assert t.counts["reward"] == 1 and t.open_phases() == []


def test_watchdog_dumps_stacks_of_a_slow_phase(tmp_path):
    log = open(tmp_path / "stacks.log", "w+")
    fired = []
    with PhaseTimer(
        watchdog_seconds=0.3, file=log, on_timeout=lambda n, s: fired.append((n, s)), install_signal=False
    ) as t:
        with t.phase("generate"):
            time.sleep(0.1)  # within the limit: no dump
        assert fired == []

        def stuck_in_collective():
            time.sleep(1.0)

        with t.phase("score"):
            stuck_in_collective()
    log.seek(0)
    text = log.read()
    assert "watchdog: phase 'score' has run" in text and "limit 0.3 s" in text
    assert "stuck_in_collective" in text and "test_watchdog.py" in text  # the stuck frame
    assert "generate" not in text
    assert [n for n, _ in fired][:1] == ["score"] and 1 <= len(fired) <= 4  # repeats every 0.3 s
    assert t.timeouts["score"] == len(fired)


def test_sigusr1_dumps_every_thread(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys, threading, time
        sys.path.insert(0, {str(REPO)!r})
        from vppo.watchdog import PhaseTimer
        t = PhaseTimer()
        def background_worker_loop():
            time.sleep(30)
        threading.Thread(target=background_worker_loop, daemon=True).start()
        def main_waiting_here():
            print("ready", flush=True)
            time.sleep(30)
        main_waiting_here()
        """
    )
    p = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert p.stdout.readline().strip() == "ready"
        time.sleep(0.2)
        os.kill(p.pid, signal.SIGUSR1)
        time.sleep(0.5)
        assert p.poll() is None  # the dump does not stop the process
    finally:
        p.kill()
        _, err = p.communicate()
    assert "background_worker_loop" in err and "main_waiting_here" in err
    assert err.count("hread 0x") >= 2  # "Current thread 0x..." and "Thread 0x..."


def test_bad_argument():
    with pytest.raises(ValueError, match="watchdog_seconds"):
        PhaseTimer(watchdog_seconds=-1, install_signal=False)
