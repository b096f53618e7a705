"""Calibrated dynamic exit (soft_ds/inference/calibrate.py): the threshold rule on hand-made
statistics, and the requested agreement on held-out prompts of a tiny model whose exits agree with
its full model only some of the time (test_inference's float64 "debug" model with a scaled
embedding and head)."""

from statistics import mean

import pytest
import torch
from test_inference import exits_taken, hf_model, ours, random_prompts

from soft_ds.inference.calibrate import (CALIBRATION_FIRST, ExitStatistics, calibrate, calibrate_thresholds,
                                         calibration_records, check_target_agreement, prefix_agreement,
                                         wilson_lower_bound)
from soft_ds.model import preset_config

NEW = 16  # tokens generated per prompt
TOLERANCE = 0.03  # held-out agreement may fall this far below the target (384 held-out tokens)


def statistics(**exits) -> ExitStatistics:
    """exits: name 'e<layer>' -> (confidences, agrees)."""
    return ExitStatistics("max_prob", {int(name[1:]): torch.tensor(c, dtype=torch.float64)
                                       for name, (c, _) in exits.items()},
                          {int(name[1:]): torch.tensor(a) for name, (_, a) in exits.items()})


def test_thresholds_shallow_to_deep_on_the_tokens_left():
    stats = statistics(e2=([0.9, 0.8, 0.7, 0.6, 0.5], [True, True, False, True, False]),
                       e4=([0.1, 0.2, 0.9, 0.3, 0.8], [True, True, True, False, True]))
    # Raw rates (level 0.5). Exit 2's prefixes by confidence agree 1, 1, 2/3, 3/4, 3/5: target
    # 0.75 takes the top 4 (threshold 0.5, the highest confidence left out).
    calibration = calibrate_thresholds(stats, 0.75, 8, confidence_level=0.5)
    assert calibration.thresholds[2] == 0.5
    # Exit 4 sees only token 4 (confidence 0.8, agrees): it stops it, at threshold 0 (all left).
    assert calibration.thresholds[4] == 0.0 and calibration.stopped == {2: 4, 4: 1, 8: 0}
    assert calibration.agreement == pytest.approx(4 / 5) and calibration.mean_exit_layer == pytest.approx(12 / 5)
    # Target 0.8: exit 2 keeps its top 2 (threshold 0.7); exit 4 then sees tokens 2, 3, 4 with
    # confidences 0.9 (agrees), 0.3 (no), 0.8 (agrees): top 2 agree, so threshold 0.3.
    calibration = calibrate_thresholds(stats, 0.8, 8, confidence_level=0.5)
    assert calibration.thresholds == {2: 0.7, 4: 0.3} and calibration.stopped == {2: 2, 4: 2, 8: 1}
    assert calibration.agreement == 1.0 and calibration.agreement >= calibration.target


def test_ties_cannot_be_split_and_target_one_or_unreachable_never_stops():
    # The two most confident tokens tie: a threshold stops both or neither.
    tied = statistics(e2=([0.9, 0.9, 0.5], [True, False, True]))
    assert calibrate_thresholds(tied, 0.9, 4, confidence_level=0.5).thresholds == {2: 1.0}
    assert calibrate_thresholds(tied, 0.6, 4, confidence_level=0.5).thresholds == {2: 0.0}
    everything_agrees = statistics(e2=([0.99] * 500, [True] * 500), e4=([0.99] * 500, [True] * 500))
    never = calibrate_thresholds(everything_agrees, 1.0, 8)  # a bound below 1 never reaches 1
    assert never.thresholds == {2: 1.0, 4: 1.0} and never.stopped == {2: 0, 4: 0, 8: 500}
    assert never.agreement == 1.0 and never.mean_exit_layer == 8


def test_target_zero_stops_every_token_at_the_first_exit():
    stats = statistics(e2=([0.1, 0.0, 0.5], [False, False, False]), e4=([0.9, 0.9, 0.9], [True] * 3))
    calibration = calibrate_thresholds(stats, 0.0, 8)
    assert calibration.thresholds[2] == 0.0 and calibration.stopped == {2: 3, 4: 0, 8: 0}
    assert calibration.agreement == 0.0


def test_the_wilson_margin():
    """n tokens that all agree: the bound is n / (n + z^2), z = 1.645 at 0.95, so target 0.97
    needs 88 of them; at level 0.5 (z = 0, the raw rate) one is enough."""
    assert wilson_lower_bound(torch.tensor([1]), torch.tensor([1]), 0.5).item() == 1.0
    bound = wilson_lower_bound(torch.tensor([88, 87]), torch.tensor([88, 87]), 0.95)
    assert bound[0] >= 0.97 > bound[1]
    assert wilson_lower_bound(torch.tensor([3]), torch.tensor([4]), 0.5).item() == pytest.approx(0.75)
    for n, stops in ((88, 88), (87, 0)):
        stats = statistics(e2=([0.9] * n, [True] * n))
        assert calibrate_thresholds(stats, 0.97, 4).stopped[2] == stops


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), True, "0.9"])
def test_bad_targets_are_refused(bad):
    with pytest.raises(ValueError, match="target agreement must be a number in \\[0, 1\\]"):
        check_target_agreement(bad)
    with pytest.raises(ValueError, match="target agreement"):
        calibrate_thresholds(statistics(e2=([0.5], [True])), bad, 4)


def test_bad_confidence_levels_are_refused():
    for level in (0.4, 1.0):
        with pytest.raises(ValueError, match="confidence level must be in \\[0.5, 1\\)"):
            calibrate_thresholds(statistics(e2=([0.5], [True])), 0.9, 4, confidence_level=level)


def test_calibration_records_are_disjoint_from_the_measured_ones():
    from soft_ds.data.records import BUNDLED_INSTRUCTIONS as PANDALM, load_instructions
    records = load_instructions(PANDALM)
    calibration = calibration_records(85)
    assert calibration == records[CALIBRATION_FIRST:]
    assert not [record for record in records[:CALIBRATION_FIRST] if record in calibration]
    with pytest.raises(ValueError, match="fewer than the 86 asked for"):
        calibration_records(86)


# --- on a model ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    """Exits agree with the full model on 75-79 % of the greedy tokens (teacher-forced), and are
    often confident (peaked head)."""
    torch.set_num_threads(1)
    return ours(hf_model(preset_config("debug")), embed_scale=5.0, head_scale=30.0)


@pytest.fixture(scope="module")
def calibration_set():
    return random_prompts(24, seed=21)


@pytest.fixture(scope="module")
def held_out():
    return random_prompts(24, seed=22)


@pytest.mark.parametrize("target", [0.8, 0.9])
def test_requested_agreement_holds_on_held_out_prompts(model, calibration_set, held_out, target):
    calibration = calibrate(model, calibration_set, target, exits=model.exits, max_new_tokens=NEW)
    assert calibration.tokens == 24 * NEW and calibration.agreement >= target
    result = model.generate_dynamic(held_out, calibration.thresholds, max_new_tokens=NEW)
    agreeing, total = prefix_agreement(model, held_out, result)
    assert total == 24 * NEW
    assert agreeing / total >= target - TOLERANCE, calibration.summary()
    # It pays: a good share of the tokens stop early...
    assert mean(exits_taken(result)) < 7
    # ...and the check above can fail: every token at the first exit misses both targets.
    first_exit = model.generate_dynamic(held_out, 0.0, max_new_tokens=NEW)
    assert prefix_agreement(model, held_out, first_exit)[0] / total < 0.8 - TOLERANCE


def test_target_one_is_the_full_model_and_zero_the_first_exit(model, calibration_set, held_out):
    full = model.generate(held_out, max_new_tokens=NEW).tokens
    strict = calibrate(model, calibration_set, 1.0, exits=model.exits, max_new_tokens=NEW)
    assert set(strict.thresholds.values()) == {1.0}
    assert model.generate_dynamic(held_out, strict.thresholds, max_new_tokens=NEW).tokens == full
    loose = calibrate(model, calibration_set, 0.0, exits=model.exits, max_new_tokens=NEW)
    assert loose.thresholds[model.exits[0]] == 0.0 and loose.mean_exit_layer == model.exits[0]
    first = model.generate(held_out, exit_layer=model.exits[0], max_new_tokens=NEW).tokens
    assert model.generate_dynamic(held_out, loose.thresholds, max_new_tokens=NEW).tokens == first != full


def test_prefix_agreement_counts_disagreements(model, held_out):
    full = model.generate(held_out, max_new_tokens=NEW)
    assert prefix_agreement(model, held_out, full) == (24 * NEW, 24 * NEW)
    first = model.generate(held_out, exit_layer=2, max_new_tokens=NEW)
    agreeing, total = prefix_agreement(model, held_out, first)
    # Reference: each token against the full model's argmax after the same tokens, uncached.
    expected = 0
    for prompt, tokens in zip(held_out, first.tokens):
        with torch.inference_mode():
            logits = model.model(torch.tensor([prompt + tokens]))[0, len(prompt) - 1:-1]
        expected += int((logits.argmax(-1) == torch.tensor(tokens)).sum())
    assert (agreeing, total) == (expected, 24 * NEW) and 0 < agreeing < total


# --- soft-ds generate --target-agreement -----------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """test_inference's tiny export with the bundled tokenizer, its embedding and head scaled as
    `model`'s so that exits are sometimes confident and right."""
    import shutil
    from test_inference import REPO
    directory = tmp_path_factory.mktemp("ckpt") / "soft"
    config = preset_config("debug", vocab_size=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    hf = hf_model(config, seed=2).float()
    with torch.no_grad():
        hf.model.embed_tokens.weight.mul_(5.0)
        hf.lm_head.weight.mul_(30.0)
    hf.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        if (REPO / "data" / "tokenizer" / name).is_file():
            shutil.copy(REPO / "data" / "tokenizer" / name, directory / name)
    return directory


def test_generate_cli_target_agreement(checkpoint, capsys, tmp_path):
    import json
    from soft_ds.data.templates import encode_prompt
    from soft_ds.inference import SoftGenerator
    from soft_ds.inference import command as generate_command
    from test_inference import REPO
    records = json.loads((REPO / "data" / "pandalm_testset_inference_v1.json").read_text())[:4]
    file = tmp_path / "instructions.json"
    file.write_text(json.dumps(records))
    base = ["--model", str(checkpoint), "--max-new-tokens", "8", "--instructions", str(file),
            "--calibration-prompts", "6", "--stats"]
    texts = generate_command.main(base + ["--target-agreement", "0.9"])
    err = capsys.readouterr().err
    assert "calibrated for agreement >= 0.9 (max_prob, Wilson bound at 0.95)" in err
    assert "agreement with the full model's greedy token after the same prefix" in err
    # The same thresholds, through the library: the command's calibration is calibrate() on
    # PandaLM records 85.. in the training template.
    generator = SoftGenerator.from_pretrained(checkpoint)
    tokenizer = generator.tokenizer
    calibration = calibrate(generator, [encode_prompt(r, tokenizer) for r in calibration_records(6)], 0.9,
                            exits=generator.exits, max_new_tokens=8, eos_token_id=2)
    assert calibration.summary() in err
    prompts = [encode_prompt(r, tokenizer) for r in records]
    expected = generator.generate_dynamic(prompts, calibration.thresholds, max_new_tokens=8, eos_token_id=2).tokens
    assert texts == [tokenizer.decode(tokens, skip_special_tokens=True).strip() for tokens in expected]
    # Target 1 is the full model.
    assert generate_command.main(base + ["--target-agreement", "1"]) == generate_command.main(base[:-1])


@pytest.mark.parametrize("extra,message", [
    (["--target-agreement", "1.5"], "--target-agreement must be a number in [0, 1], got 1.5"),
    (["--target-agreement", "-0.1"], "--target-agreement must be a number in [0, 1]"),
    (["--target-agreement", "0.9", "--temperature", "0.7"], "--target-agreement calibrates greedy decoding"),
    (["--target-agreement", "0.9", "--calibration-level", "1"], "--calibration-level must be in [0.5, 1)"),
    (["--target-agreement", "0.9", "--calibration-prompts", "0"], "--calibration-prompts must be a positive integer"),
    (["--target-agreement", "0.9", "--calibration-prompts", "86"], "fewer than the 86 asked for"),
    (["--target-agreement", "0.9", "--dynamic-threshold", "0.5"], "not allowed with argument"),
])
def test_generate_cli_rejects_bad_calibration(checkpoint, capsys, extra, message):
    from conftest import run_cli
    result = run_cli(capsys, "generate", "--model", checkpoint, "--prompt", "hi", *extra)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_generate_cli_refuses_answering_a_calibration_prompt(checkpoint, capsys, tmp_path):
    import json
    from conftest import run_cli
    file = tmp_path / "instructions.json"
    file.write_text(json.dumps([{"instruction": "Add 2 and 3."}, calibration_records(3)[2]]))
    result = run_cli(capsys, "generate", "--model", checkpoint, "--instructions", file,
                     "--target-agreement", "0.9", "--calibration-prompts", "4")
    assert result.returncode == 2
    assert "instruction record(s) [1] are also calibration prompts" in result.stderr
    # Not among the first 2 calibration prompts: answered.
    assert run_cli(capsys, "generate", "--model", checkpoint, "--instructions", file, "--max-new-tokens", "2",
                   "--target-agreement", "0.9", "--calibration-prompts", "2").returncode == 0


def test_benchmark_calibrated_rows(checkpoint, capsys, tmp_path):
    from soft_ds.bench import inference as benchmark_inference
    benchmark_inference.main([
        "--model", str(checkpoint), "--num-prompts", "2", "--max-new-tokens", "4", "--repeats", "1",
        "--draft-tokens", "2", "--thresholds", "1", "--exits", "2,4,8", "--target-agreements", "0,1",
        "--calibration-prompts", "3", "--no-proxy", "--plot", str(tmp_path / "speed.png")])
    out = capsys.readouterr().out
    assert out.count("calibrated for agreement >= ") == 2
    table = out[out.index("calibrated dynamic exit:"):].splitlines()[2:4]
    # Target 0: every token at exit 2 (its threshold 0); target 1: the full model, positions all agree.
    assert table[0].split()[0] == "0.000" and "2.00/8" in table[0] and table[0].endswith("2:0,4:1")
    assert table[1].split()[0] == "1.000" and "8.00/8" in table[1] and table[1].split()[5] == "100.0%"
    with pytest.raises(ValueError, match="--num-prompts 86: with --target-agreements at most 85"):
        benchmark_inference.main(["--num-prompts", "86", "--target-agreements", "0.9"])
    with pytest.raises(ValueError, match="each of --target-agreements must be a number in \\[0, 1\\]"):
        benchmark_inference.main(["--target-agreements", "1.2"])
