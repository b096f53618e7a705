"""tools/reproduce_small.sh end to end on a 2-step budget (SFT, SoFT, SFT+ICT through the real
launcher, export, evaluation, report), the report's claim verdicts on fixed numbers, and
`soft-ds eval claims` refusing an unfinished run."""

import json
import os
import subprocess

import pytest

from conftest import REPO, run_cli

from soft_ds.eval.claims import check_claims


def test_whole_chain_on_a_two_step_budget(tmp_path):
    out = tmp_path / "repro"
    result = subprocess.run(["bash", "tools/reproduce_small.sh", str(out), "--train_steps", "2", "--warmup_steps", "1"],
                            cwd=REPO, capture_output=True, text=True, timeout=1500,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
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
                           timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
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


def test_claims_of_an_unfinished_run_is_one_error_line(tmp_path, capsys):
    out = run_cli(capsys, "eval", "claims", tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.startswith(f"error: {tmp_path / 'eval' / 'lm.json'}: ") and "did tools/reproduce_small.sh" in \
        out.stderr
    assert not (tmp_path / "report.md").exists()
