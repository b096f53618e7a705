"""soft_ds.exit_schedule: which exits train at each step and with what share; its config errors.
(That the pipeline trains exactly the chosen exits' weighted mean: test_pipeline_exact.py's
random-k and warm-up cases; that a resumed random-k run repeats the uninterrupted one:
test_train.py.)"""

import os
import subprocess
import sys

import pytest

from conftest import REPO
from soft_ds.config import ConfigError, load_config, override
from soft_ds.exit_schedule import ExitSchedule
from soft_ds.exits import make_exits

EXITS = make_exits([2, 4, 6, 8, 10, 12], 12)
LAYERS = [e.layer for e in EXITS]
TINY = os.path.join(REPO, "ds_configs", "tiny_pp2.json")


def test_all_is_every_exit_at_its_weight():
    exits = make_exits([2, 4, 8], 8, weights=[1.0, 3.0, 4.0])
    for step in (None, 0, 7):
        assert ExitSchedule().shares(exits, step) == {2: 0.125, 4: 0.375, 8: 0.5}
    # Uniform weights (the default): the paper's plain mean.
    assert ExitSchedule().shares(make_exits([4, 6, 8], 8), None) == pytest.approx({4: 1 / 3, 6: 1 / 3, 8: 1 / 3})


def test_random_k_draws_k_exits_with_the_last_layer_from_seed_and_step_only():
    schedule = ExitSchedule("random-k", k=3, seed=7)
    draws = [schedule.active(LAYERS, step) for step in range(200)]
    assert all(len(d) == 3 and d[-1] == 12 and d == sorted(set(d)) and set(d) <= set(LAYERS) for d in draws)
    # Deterministic: another schedule object (as on another rank, or after a resume) draws the same.
    assert draws == [ExitSchedule("random-k", k=3, seed=7).active(LAYERS, step) for step in range(200)]
    # It really varies with the step and the seed, and reaches every exit.
    assert len({tuple(d) for d in draws}) == 10  # C(5, 2): every pair of the 5 other exits
    assert draws != [ExitSchedule("random-k", k=3, seed=8).active(LAYERS, step) for step in range(200)]


def test_random_k_is_the_same_in_another_process():
    """The draw must not depend on the process (hash randomisation, import order): every rank and
    a resumed run compute it on their own."""
    code = ("from soft_ds.exit_schedule import ExitSchedule; "
            "print([ExitSchedule('random-k', k=3, seed=7).active(list(range(2, 13, 2)), s) for s in range(50)])")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": "123"}).stdout.strip()
    assert other == str([ExitSchedule("random-k", k=3, seed=7).active(LAYERS, s) for s in range(50)])


def test_random_k_shares_are_the_chosen_exits_weighted_mean():
    exits = make_exits([2, 4, 6, 8], 8, weights=[1.0, 2.0, 3.0, 4.0])
    schedule = ExitSchedule("random-k", k=2, seed=1)
    for step in range(20):
        shares = schedule.shares(exits, step)
        (chosen,) = set(shares) - {8}
        weight = {2: 1.0, 4: 2.0, 6: 3.0}[chosen]
        assert shares == pytest.approx({chosen: weight / (weight + 4.0), 8: 4.0 / (weight + 4.0)}, abs=1e-15)
    assert schedule.shares(exits, None) == {2: 0.1, 4: 0.2, 6: 0.3, 8: 0.4}  # validation: every exit


def test_rotate_takes_every_exit_in_turn():
    schedule = ExitSchedule("rotate", k=3)
    assert [schedule.active(LAYERS, step) for step in range(4)] == [[2, 4, 12], [6, 8, 12], [2, 10, 12],
                                                                     [4, 6, 12]]


def test_k_equal_to_the_exit_count_is_all():
    assert ExitSchedule("random-k", k=6).active(LAYERS, 3) == LAYERS


def test_warmup_ramps_intermediate_weights_from_zero():
    exits = make_exits([2, 4, 8], 8, weights=[1.0, 1.0, 2.0])
    schedule = ExitSchedule(warmup_steps=4)
    # Step 0: the intermediate exits weigh 0, so they are skipped (their heads do not run).
    assert schedule.weights(exits, 0) == {8: 2.0}
    assert schedule.shares(exits, 0) == {8: 1.0}
    assert schedule.weights(exits, 1) == {2: 0.25, 4: 0.25, 8: 2.0}
    assert schedule.shares(exits, 1) == pytest.approx({2: 0.1, 4: 0.1, 8: 0.8}, abs=1e-15)
    for step in (4, 5, 100):
        assert schedule.weights(exits, step) == {2: 1.0, 4: 1.0, 8: 2.0}
    # With random-k, the warm-up applies to the exits drawn.
    combined = ExitSchedule("random-k", k=2, warmup_steps=2, seed=3)
    shares = combined.shares(exits, 1)
    assert len(shares) == 2 and shares[8] == pytest.approx(2.0 / 2.5)


@pytest.mark.parametrize("values, message", [
    (dict(exit_schedule="sometimes"), "--exit-schedule must be one of all, random-k, rotate, got 'sometimes'"),
    (dict(exit_schedule="random-k"), "it must be 1..4, got 0"),
    (dict(exit_schedule="random-k", exit_sample_k=5), "out of 4 exits: it must be 1..4, got 5"),
    (dict(exit_schedule="rotate", exit_sample_k=-1), "got -1"),
    (dict(exit_sample_k=2), "exit_sample_k 2 applies to exit_schedule random-k or rotate"),
    (dict(exit_schedule="random-k", exit_sample_k=2, mode="sft"), "needs mode soft: mode sft has one exit"),
    (dict(exit_warmup_steps=3, mode="ict"), "needs mode soft: mode ict has a head of its own per exit"),
    (dict(exit_warmup_steps=-1), "--exit-warmup-steps must be >= 0, got -1"),
    (dict(exit_warmup_steps=101), "exit_warmup_steps=101 exceeds train_steps=100"),
])
def test_config_errors_name_the_problem(values, message):
    config = load_config(TINY)  # exits 2, 4, 6, 8; 100 steps
    with pytest.raises(ConfigError) as error:
        override(config, **values)
    assert message in str(error.value)


def test_config_gives_the_schedule():
    config = override(load_config(TINY), exit_schedule="random-k", exit_sample_k=2,
                      exit_warmup_steps=10, seed=9)
    assert config.exit_schedule() == ExitSchedule("random-k", 2, 10, 9)
