"""soft_ds.partition: exit-aligned stage boundaries, checked by hand and against brute force."""

import itertools
import random

import pytest
import transformers

from soft_ds.partition import Stage, balance_ratio, decoder_layer_flops, head_flops, partition


def spans(stages):
    return [(s.first_layer, s.last_layer) for s in stages]


def stage_cost(first, last, exits, layer_cost, head_cost):
    return (last - first + 1) * layer_cost + head_cost * sum(first <= e <= last for e in exits)


def brute_force_best(num_layers, exits, num_stages, layer_cost, head_cost):
    """Min over every valid cut set of the slowest stage's cost (the reference objective)."""
    exits = sorted(exits)
    cuts = exits[:-1] if len(exits) > 1 else list(range(1, num_layers))
    best = None
    for chosen in itertools.combinations(cuts, num_stages - 1):
        ends = list(chosen) + [num_layers]
        firsts = [1] + [e + 1 for e in chosen]
        worst = max(stage_cost(f, l, exits, layer_cost, head_cost) for f, l in zip(firsts, ends))
        best = worst if best is None else min(best, worst)
    return best


def assert_well_formed(stages, num_layers, exits, num_stages, layer_cost=1.0, head_cost=0.0):
    assert len(stages) == num_stages
    assert stages[0].first_layer == 1 and stages[-1].last_layer == num_layers
    for before, after in zip(stages, stages[1:]):
        assert after.first_layer == before.last_layer + 1
    for s in stages:
        assert s.first_layer <= s.last_layer
        assert s.exits == tuple(e for e in sorted(exits) if s.first_layer <= e <= s.last_layer)
        assert s.cost == pytest.approx(stage_cost(s.first_layer, s.last_layer, exits, layer_cost, head_cost))
        if len(exits) > 1:
            assert s.last_layer in exits, f"stage {s} does not end on an exit"
    assert [e for s in stages for e in s.exits] == sorted(exits)


@pytest.mark.parametrize("num_stages, expected", [
    (1, [(1, 8)]),
    (2, [(1, 4), (5, 8)]),
    (4, [(1, 2), (3, 4), (5, 6), (7, 8)]),
])
def test_eight_layers_four_exits(num_stages, expected):
    exits = [2, 4, 6, 8]
    stages = partition(8, exits, num_stages)
    assert spans(stages) == expected
    assert_well_formed(stages, 8, exits, num_stages)
    if num_stages == 4:
        assert [s.exits for s in stages] == [(2,), (4,), (6,), (8,)]
        assert list(stages[1].layers) == [3, 4]


def test_exits_given_unsorted():
    assert spans(partition(8, [8, 4, 2, 6], 2)) == [(1, 4), (5, 8)]


def test_head_cost_changes_the_answer():
    """6 layers, exits {1, 2, 3, 6}, 2 stages. Layers only: cut after 3 (3 | 3).
    With each head costing 2 layers: after 3 costs (3 + 3*2 | 3 + 2) = (9 | 5); after 2 costs
    (2 + 2*2 | 4 + 2*2) = (6 | 8), so the best cut moves to after layer 2 (max 8 < 9)."""
    exits = [1, 2, 3, 6]
    layers_only = partition(6, exits, 2)
    assert spans(layers_only) == [(1, 3), (4, 6)]
    with_heads = partition(6, exits, 2, layer_cost=1.0, head_cost=2.0)
    assert spans(with_heads) == [(1, 2), (3, 6)]
    assert [s.cost for s in with_heads] == [6.0, 8.0]
    assert max(s.cost for s in with_heads) == brute_force_best(6, exits, 2, 1.0, 2.0) == 8.0
    # Under the head-aware cost, the layers-only answer really is worse.
    assert max(stage_cost(f, l, exits, 1.0, 2.0) for f, l in spans(layers_only)) == 9.0


def test_llama2_13b_paper_exits_with_heads_matches_brute_force():
    config = llama2_13b()
    layer, head = decoder_layer_flops(config, 512), head_flops(config)
    for num_stages in range(1, 9):
        stages = partition(40, (12, 16, 20, 24, 28, 32, 36, 40), num_stages, layer, head)
        assert_well_formed(stages, 40, (12, 16, 20, 24, 28, 32, 36, 40), num_stages, layer, head)
        best = brute_force_best(40, (12, 16, 20, 24, 28, 32, 36, 40), num_stages, layer, head)
        assert max(s.cost for s in stages) == pytest.approx(best, rel=1e-12)


def test_random_cases_match_brute_force():
    rng = random.Random(0)
    for _ in range(300):
        num_layers = rng.randint(1, 12)
        exits = sorted(rng.sample(range(1, num_layers), rng.randint(0, num_layers - 1))) + [num_layers]
        max_stages = len(exits) if len(exits) > 1 else num_layers
        num_stages = rng.randint(1, max_stages)
        layer_cost = rng.choice([1.0, 2.5])
        head_cost = rng.choice([0.0, 0.5, 1.3, 4.0])
        stages = partition(num_layers, exits, num_stages, layer_cost, head_cost)
        assert_well_formed(stages, num_layers, exits, num_stages, layer_cost, head_cost)
        best = brute_force_best(num_layers, exits, num_stages, layer_cost, head_cost)
        assert max(s.cost for s in stages) == pytest.approx(best), (num_layers, exits, num_stages, head_cost)


def test_sft_single_exit_cuts_anywhere():
    stages = partition(8, [8], 4)
    assert spans(stages) == [(1, 2), (3, 4), (5, 6), (7, 8)]
    assert [s.exits for s in stages] == [(), (), (), (8,)]
    three = partition(8, [8], 3)
    assert_well_formed(three, 8, [8], 3)
    assert max(s.cost for s in three) == 3.0  # 8 layers over 3 stages: 3 + 3 + 2
    every_layer = partition(8, [8], 8)
    assert spans(every_layer) == [(i, i) for i in range(1, 9)]
    # The head on the last stage pushes layers forward: 7 layers, head = 2 layers, 3 stages -> 3|3|1+2.
    with_head = partition(7, [7], 3, head_cost=2.0)
    assert spans(with_head) == [(1, 3), (4, 6), (7, 7)]
    assert [s.cost for s in with_head] == [3.0, 3.0, 3.0]


def test_too_many_stages():
    with pytest.raises(ValueError, match=r"5 pipeline stages.*\[2, 4, 6, 8\].*at most 4 stages"):
        partition(8, [2, 4, 6, 8], 5)
    with pytest.raises(ValueError, match=r"9 pipeline stages.*8-layer.*at most 8"):
        partition(8, [8], 9)


def test_invalid_arguments():
    with pytest.raises(ValueError, match=r">= 1, got 0"):
        partition(8, [2, 8], 0)
    with pytest.raises(ValueError, match=r"last layer \(8\).*\[2, 4\]"):
        partition(8, [2, 4], 2)
    with pytest.raises(ValueError, match=r"last layer \(8\)"):
        partition(8, [], 1)


def llama2_13b():
    return transformers.LlamaConfig(hidden_size=5120, intermediate_size=13824, num_attention_heads=40,
                                    num_key_value_heads=40, vocab_size=32000, num_hidden_layers=40)


def test_flops_llama2_13b():
    config = llama2_13b()
    h, i, s, v = 5120, 13824, 512, 32000
    # q, k, v, o: 4 h x h matmuls; MLP: 3 h x i; attention: QK^T and AV over the causal half (h*s/2 each).
    layer = 2 * (4 * h * h + 3 * h * i + 2 * h * s / 2)
    assert decoder_layer_flops(config, s) == layer == 639_631_360
    assert head_flops(config) == 2 * h * v == 327_680_000
    assert head_flops(config) / decoder_layer_flops(config, s) == pytest.approx(0.5123, abs=1e-4)
    # Longer sequences cost more attention.
    assert decoder_layer_flops(config, 2048) - decoder_layer_flops(config, 512) == 2 * h * (2048 - 512)


def test_flops_grouped_query_attention():
    # LLaMA 3 8B shape: 32 query heads over 8 kv heads of 128.
    config = transformers.LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                      num_key_value_heads=8, vocab_size=128256)
    h, i, kv_dim, s = 4096, 14336, 8 * 128, 1024
    expected = 2 * (2 * h * h + 2 * h * kv_dim + 3 * h * i + h * s)
    assert decoder_layer_flops(config, s) == expected
    assert head_flops(config) == 2 * h * 128256


def test_balance_ratio():
    def stage(cost):
        return Stage(1, 1, (), cost)
    assert balance_ratio([stage(2.0), stage(2.0)]) == 1.0
    assert balance_ratio([stage(3.0), stage(3.0), stage(2.0)]) == pytest.approx(3 / (8 / 3))
    assert balance_ratio([stage(5.0)]) == 1.0
    assert balance_ratio(partition(8, [2, 4, 6, 8], 4)) == 1.0
    # 3 stages over exits {2,4,6,8}: best is 2|2|4 layers -> 4 / (8/3) = 1.5.
    assert balance_ratio(partition(8, [2, 4, 6, 8], 3)) == pytest.approx(1.5)
