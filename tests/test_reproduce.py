"""tools/reproduce_small.sh end to end on a 2-step budget (SFT, SoFT, SFT+ICT through the real
launcher, export, evaluation, report), the report's claim verdicts on fixed numbers, and
`soft-ds eval claims` refusing an unfinished run."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, run_cli

from soft_ds.eval.claims import check_claims, check_real_goals


def all_cores() -> dict:
    """The environment without OMP_NUM_THREADS: the scripts then give their one training process every
    core (the suite runs one test at a time, so the others would idle)."""
    return {name: value for name, value in os.environ.items() if name != "OMP_NUM_THREADS"}


def test_whole_chain_on_a_two_step_budget(tmp_path):
    out = tmp_path / "repro"
    env = {**all_cores(), "KL_PROMPTS": "4", "NEW_TOKENS": "8"}
    result = subprocess.run(["bash", "tools/reproduce_small.sh", str(out), "--train-steps", "2", "--warmup-steps", "1",
                             "--train-epochs", "0"], cwd=REPO, capture_output=True, text=True, timeout=1500, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in ("sft", "soft", "ict"):
        assert (out / "hf" / name / "config.json").is_file()
    assert (out / "hf" / "ict" / "exit_heads.safetensors").is_file()
    assert (out / "eval" / "ppl_vs_exit.png").stat().st_size > 0
    assert (out / "eval" / "kl_vs_position.png").stat().st_size > 0
    lm = json.loads((out / "eval" / "lm.json").read_text())
    report = (out / "report.md").read_text()
    for n in (2, 4, 6, 8):
        row = next(line for line in report.splitlines() if line.startswith(f"| {n} |"))
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert [float(c) for c in cells[1:4]] == [round(lm["models"][m]["exits"][str(n)]["ppl"], 2)
                                                  for m in ("sft", "ict", "soft")]
    claims = [line for line in report.splitlines() if line[:3] in ("1. ", "2. ", "3. ", "4. ")]
    assert len(claims) == 4 and all(line.endswith(("**PASS**", "**MISS**")) for line in claims)
    # Running it again finds every stage done and only re-evaluates.
    again = subprocess.run(["bash", "tools/reproduce_small.sh", str(out)], cwd=REPO, capture_output=True, text=True,
                           timeout=900, env=env)
    assert again.returncode == 0 and again.stdout.count("done already") == 3, again.stdout[-2000:]


@pytest.mark.parametrize("soft, verdicts", [
    ({2: 40.0, 4: 30.0, 6: 26.0, 8: 24.0}, ["PASS", "PASS", "PASS", "PASS"]),
    ({2: 90.0, 4: 80.0, 6: 70.0, 8: 40.0}, ["MISS", "MISS", "MISS", "MISS"]),
])
def test_claim_verdicts(soft, verdicts):
    ppl = {"sft": {2: 400.0, 4: 200.0, 6: 90.0, 8: 23.0}, "ict": {2: 60.0, 4: 45.0, 6: 35.0, 8: 23.0}, "soft": soft}
    lines = check_claims(ppl, extra_parameters=123)
    assert [line.rsplit("**", 2)[-2] for line in lines] == verdicts
    assert "exit 6 of 8" in lines[2] and "123" in lines[3]


@pytest.mark.parametrize("soft, verdicts", [
    ({10: 5.0, 15: 4.0, 20: 3.4, 25: 2.7, 30: 1.80}, ["PASS", "PASS", "PASS", "PASS", "PASS"]),
    ({10: 9.0, 15: 7.5, 20: 3.6, 25: 2.9, 30: 1.90}, ["PASS", "MISS", "MISS", "MISS", "MISS"]),
])
def test_real_goal_verdicts(soft, verdicts):
    loss = {"sft": {10: 20.9, 15: 20.9, 20: 19.6, 25: 9.2, 30: 1.76}, "ict": {10: 8.0, 15: 7.0, 20: 5.0, 25: 3.5, 30: 1.76},
            "soft": soft}
    lines = check_real_goals(loss, extra_parameters=123)
    assert [line.rsplit("**", 2)[-2] for line in lines] == verdicts
    assert "exit 20 of 30" in lines[1] and "exit 25 of 30" in lines[2] and "123" in lines[4]
    loss["sft"][25] = 7.9  # SFT's exit 25 no longer gibberish
    assert check_real_goals(loss, 123)[0].endswith("**MISS**")


def test_claims_of_an_unfinished_run_is_one_error_line(tmp_path, capsys):
    out = run_cli(capsys, "eval", "claims", tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.startswith(f"error: {tmp_path / 'eval' / 'lm.json'}: ") and "did tools/reproduce_small.sh" in \
        out.stderr
    assert not (tmp_path / "report.md").exists()


def test_real_model_chain_on_a_one_step_budget(tmp_path, smollm2_dir):
    """tools/reproduce_real.sh end to end on the imported SmolLM2 with a tiny budget: one step per
    run, 12 held-out records, 128-token rows. What it checks is the chain and the report's numbers
    (each row is lm.json's), not the goals. The import stage finds the session's import in place
    (test_gguf_import tests the import itself)."""
    config = json.loads((Path(REPO) / "ds_configs" / "reproduce_real.json").read_text())
    config["soft"].update(train_steps=1, warmup_steps=0, val_size=12, seq_len=128, eval_batches=1, log_interval=1)
    (tmp_path / "tiny.json").write_text(json.dumps(config))
    out = tmp_path / "real"
    (out / "hf").mkdir(parents=True)
    (out / "hf" / "base").symlink_to(smollm2_dir)  # read only: every stage writes elsewhere
    env = {**all_cores(), "CONFIG": str(tmp_path / "tiny.json"), "KL_PROMPTS": "2", "ANSWERS": "1",
           "NEW_TOKENS": "8"}
    result = subprocess.run(["bash", "tools/reproduce_real.sh", str(out)], cwd=REPO, capture_output=True, text=True,
                            timeout=1500, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lm = json.loads((out / "eval" / "lm.json").read_text())
    assert list(lm["models"]) == ["base", "sft", "soft", "ict"] and lm["records"] == 12
    report = (out / "report.md").read_text()
    exits = config["soft"]["exits"]
    for n in exits:
        row = next(line for line in report.splitlines() if line.startswith(f"| {n} |"))
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        losses = [round(lm["models"][m]["exits"][str(n)]["loss"], 4) for m in ("base", "sft", "ict", "soft")]
        assert [float(c) for c in cells[5:9]] == losses
    goals = [line for line in report.splitlines() if line[:3] in ("1. ", "2. ", "3. ", "4. ", "5. ")]
    assert len(goals) == 5 and all(line.endswith(("**PASS**", "**MISS**")) for line in goals)
    answers = json.loads((out / "eval" / "answers.json").read_text())
    assert set(answers["models"]) == {"base", "sft", "soft", "ict"} and len(answers["records"]) == 1
    assert all(len(texts) == 1 for by_exit in answers["models"].values() for texts in by_exit.values())
    assert "eval/answers.md" in report and (out / "eval" / "kl_vs_position.png").stat().st_size > 0


def test_real_demo_on_a_one_step_budget(tmp_path, smollm2_dir):
    """tools/demo.sh (the README's demo) with one training step on the imported SmolLM2: the per-exit
    table, then each exit's answer before and after, side by side."""
    config = json.loads((Path(REPO) / "ds_configs" / "demo_real.json").read_text())
    config["soft"].update(train_steps=1, warmup_steps=0, val_size=12, seq_len=128, eval_batches=1)
    (tmp_path / "tiny.json").write_text(json.dumps(config))
    out = tmp_path / "demo"
    env = {**all_cores(), "CONFIG": str(tmp_path / "tiny.json"), "MODEL": smollm2_dir, "OUT": str(out), "ANSWERS": "1",
           "NEW_TOKENS": "8"}
    result = subprocess.run(["bash", "tools/demo.sh"], cwd=REPO, capture_output=True, text=True, timeout=900,
                            env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Per-exit results" in result.stdout and "| exit | before | after |" in result.stdout
    answers = json.loads((out / "answers" / "answers.json").read_text())
    assert set(answers["models"]) == {"before", "after"}
    assert sorted(map(int, answers["models"]["after"])) == config["soft"]["exits"]
    assert answers["val_size"] == 12  # the split this run held out
