import json

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
    recs = [
        {
            "messages": [
                {"role": "user", "content": f"q{i}"},
                {"role": "assistant", "content": "" if i == 1 else "1"},
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
