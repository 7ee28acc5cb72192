"""bench/case_lora.py: the counts it reports are the models' own (issue 25)."""

import pytest

from bench import case_lora


@pytest.mark.parametrize("name, billions", [("Qwen2.5-VL-7B", 8.29), ("Qwen3-VL-8B", 8.77)])
def test_meta_models_have_the_published_sizes_and_lora_counts_by_hand(name, billions):
    m = case_lora.meta_model(name)
    assert sum(p.numel() for p in m.parameters()) / 1e9 == pytest.approx(billions, abs=0.01)
    t = m.config.get_text_config()
    h, i, layers = t.hidden_size, t.intermediate_size, t.num_hidden_layers
    d = getattr(t, "head_dim", None) or h // t.num_attention_heads
    q, kv = t.num_attention_heads * d, t.num_key_value_heads * d
    per_layer = (h + q) + 2 * (h + kv) + (q + h) + 2 * (h + i) + (i + h)  # q k v o, gate up, down
    assert case_lora.lora_params(m, 8) == 8 * layers * per_layer


def test_state_bytes_and_the_fit_estimate():
    st = case_lora.state_bytes(100, 10, frozen_base=True)
    assert st == {"weights": 220, "grads": 20, "optimizer": 120}
    assert case_lora.state_bytes(100, 100, frozen_base=False)["optimizer"] == 1200


def test_measured_on_the_tiny_base():
    r = case_lora.measured(8)
    lora, full = r["lora r=8"], r["full"]
    assert lora["trainable"] == 77_824 and full["trainable"] == full["params"] == 1_725_056
    assert lora["grad_bytes"] == 4 * lora["trainable"] and lora["optimizer_bytes"] == 8 * lora["trainable"]
    assert full["optimizer_bytes"] == 2 * full["grad_bytes"]  # AdamW: two fp32 moments a gradient
