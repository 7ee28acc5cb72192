"""The multiread family (issue 24): every response reads several values off the image, and
vppo.synth.visual_spans finds each of them, in the reference and in the policy's own responses."""

import json

import pytest

from vppo import spotlight, synth
from vppo.config import load_config


def test_every_read_value_is_a_visual_span():
    rows = synth.make_split(synth.SynthConfig(tasks=synth.MULTIREAD_TASKS, n_train=60), "train")
    assert {r["task"] for r in rows} == set(synth.MULTIREAD_TASKS)
    for r in rows:
        spans = json.loads(r["visual_spans"])
        read = r["response"].split("<think> ")[1].split(" . ")[0]
        assert [r["response"][a:b] for a, b in spans] == [w for w in read.split() if w != ","]
        assert len(spans) >= 2  # several values a response, where spotlight has one


def test_spans_in_a_policy_response_and_a_broken_one():
    text = "<think> red 3 , blue 22 . 3 + 22 = 25 </think> \\boxed{25}"
    spans = synth.visual_spans("bars_sum", text)
    assert [text[a:b] for a, b in spans] == ["red", "3", "blue", "22"]
    assert synth.visual_spans("bars_sum", "no format at all") is None
    assert synth.visual_spans("count_most", "<think> . 2 </think>") is None


def test_answers_follow_from_the_read_values():
    rows = synth.make_split(synth.SynthConfig(tasks=synth.MULTIREAD_TASKS, n_train=30), "train")
    for r in rows:
        read = [w for w in r["response"].split("<think> ")[1].split(" . ")[0].split() if w != ","]
        nums = [int(w) for w in read if w.isdigit()]
        words = [w for w in read if not w.isdigit()]
        if r["task"] == "bars_sum":
            want = sum(nums)
        elif r["task"] == "bars_max":
            want = max(nums)
        else:
            want = words[nums.index(max(nums))]
        assert len(set(nums)) == len(nums) or r["task"] == "bars_sum"  # one greatest
        assert r["answer"] == str(want) and r["response"].endswith(f"\\boxed{{{want}}}")


def test_the_family_is_a_config_choice_with_its_own_base_config():
    assert load_config(None, ["data.synth=multiread"]).data.synth == "multiread"
    s, t = spotlight.variant("multiread")
    assert s.tasks == synth.MULTIREAD_TASKS and t.synth == s and t.accept == (0.35, 0.45)
    with pytest.raises(ValueError, match="unknown synthetic variant"):
        spotlight.variant("nope")
