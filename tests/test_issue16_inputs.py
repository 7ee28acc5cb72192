import json
import warnings

import pytest

from vppo.benchmarks import load_benchmark, sharegpt_rows
from vppo.data import load_problems


def test_role_content_messages_without_tags_are_read():
    recs = [{"messages": [{"role": "user", "content": "what is x?"}, {"role": "assistant", "content": "2"}]}]
    rows = sharegpt_rows(recs, {"formatting": "sharegpt", "columns": {"messages": "messages"}}, "w")
    assert rows[0]["problem"] == "what is x?" and rows[0]["answer"] == "2"


def test_unknown_message_keys_are_named():
    recs = [{"messages": [{"speaker": "user", "text": "q"}]}]
    with pytest.raises(ValueError, match="speaker"):
        sharegpt_rows(recs, {"formatting": "sharegpt", "columns": {"messages": "messages"}}, "w")


def test_non_string_answers_are_counted_and_integral_floats_read_as_ints():
    rows = [
        {"problem": "a", "answer": 3.0},
        {"problem": "b", "answer": [1, 2]},
        {"problem": "c", "answer": "x"},
    ]
    with pytest.warns(UserWarning, match="not strings"):
        ps = load_problems(rows, image_key=None)
    assert [p.answer for p in ps] == ["3", "[1, 2]", "x"] and ps.stats.non_string_answers == 2


def test_limit_reports_skipped_rows(tmp_path):
    # from / value keys, which the loader has always read: this test is about --limit alone
    recs = [
        {
            "messages": [
                {"from": "human", "value": f"q{i}"},
                {"from": "gpt", "value": "" if i == 1 else "1"},
            ]
        }
        for i in range(4)
    ]
    (tmp_path / "g.json").write_text(json.dumps(recs))
    info = {"geo3k": {"file_name": "g.json", "formatting": "sharegpt", "columns": {"messages": "messages"}}}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    with pytest.warns(UserWarning):
        b = load_benchmark("geo3k", tmp_path, limit=2)
    assert [p.meta["row"] for p in b.problems] == [0, 2] and b.skipped_in_limit == 1


def _geo3k_with_a_broken_row(d):
    """Geo3k in LLaMA-Factory's default ShareGPT keys (from / value, human / gpt), 4 text-only
    records; record 1 has an empty answer (broken)."""
    recs = [
        {
            "messages": [
                {"from": "human", "value": f"what is x{i}?"},
                {"from": "gpt", "value": "" if i == 1 else str(i)},
            ]
        }
        for i in range(4)
    ]
    (d / "g.json").write_text(json.dumps(recs))
    info = {"geo3k": {"file_name": "g.json", "formatting": "sharegpt", "columns": {"messages": "messages"}}}
    (d / "dataset_info.json").write_text(json.dumps(info))
    return d


def test_limit_line_in_results_md(tmp_path):
    """`python -m vppo.eval --limit N` says in results.md that broken rows were passed over to keep N
    problems (here row 1, so rows 0, 2 are evaluated), and says nothing when none were."""
    from vppo import eval as ev
    from vppo.tiny import build_processor, build_tokenizer

    model = tmp_path / "proc-only"  # the CLI with a sample_fn needs only the processor
    tok = build_tokenizer(["what is x? \\boxed{1}", "think boxed"] * 10, vocab_size=300)
    build_processor(tok).save_pretrained(model)
    (tmp_path / "data").mkdir()
    data = _geo3k_with_a_broken_row(tmp_path / "data")
    seen = []

    def sample_fn(batch, seeds):
        seen.extend(p.meta["row"] for p in batch)
        return [f"\\boxed{{{p.answer}}}" for p, s in zip(batch, seeds) for _ in s]

    def run(out, *extra):
        argv = ["--model", str(model), "--benchmarks", "geo3k", "--data-dir", str(data), "--out", str(out),
                "--samples", "1", "--no-progress", *extra]  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the broken row's load warning (tested elsewhere)
            r = ev.main(argv, sample_fn=sample_fn)
        return r, (out / "results.md").read_text()

    r, md = run(tmp_path / "limited", "--limit", "2")
    assert seen == [0, 2] and r["summary"]["geo3k"]["problems"] == 2
    lines = [ln for ln in md.splitlines() if ln.startswith("--limit")]
    assert len(lines) == 1, md
    line = lines[0]
    assert line.startswith("--limit 2:") and "skipped" in line and "Geo3k: 1" in line, md
    _, md = run(tmp_path / "limit1", "--limit", "1")  # row 0 alone: nothing passed over
    _, whole = run(tmp_path / "whole")  # no --limit: the broken row is in the load statistics only
    assert "--limit" not in md and "--limit" not in whole
