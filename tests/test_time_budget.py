"""docs/time_budget.py: the work it counts per token, checked by hand for the default shapes."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("time_budget", REPO / "docs" / "time_budget.py")
time_budget = importlib.util.module_from_spec(spec)
spec.loader.exec_module(time_budget)

SMOLLM2 = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3,
           "vocab_size": 49152}
MINILM = {"hidden_size": 384, "intermediate_size": 1536}


def test_flops_per_token_of_the_default_models():
    block, head = time_budget.decoder_costs(SMOLLM2)
    # q and o: 576x576; k and v: 576x192 (3 of 9 heads); gate, up, down: 576x1536; 2 FLOPs per multiply-add
    assert block == 2 * (576 * 576 * 2 + 576 * 192 * 2 + 576 * 1536 * 3) == 7_077_888
    assert head == 2 * 576 * 49152
    assert time_budget.encoder_block_cost(MINILM) == 2 * (4 * 384 * 384 + 2 * 384 * 1536)


def test_backward_of_the_trained_blocks():
    assert time_budget.backward_blocks(2, 30) == 3       # the lowest trained block needs no input gradient
    assert time_budget.backward_blocks(30, 30) == 60
    assert time_budget.backward_blocks(0, 30) == 0
    assert time_budget.trained(-1, 6) == 6 and time_budget.trained(8, 6) == 6


def test_a_folder_without_a_finished_run_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="expected a finished default run"):
        time_budget.main([str(tmp_path)])
