"""soft_ds.eval.judge (PandaLM prompt, verdict parsing, order swapping, scoring) on fixed judge outputs,
a tiny random Hugging Face judge for the plumbing, and `soft-ds eval judge`."""

import json

import pytest
import transformers
from _eval_checkpoints import assert_cli_refuses, one_thread, save_checkpoint  # noqa: F401
from conftest import run_cli

from soft_ds.eval import judge

RECORDS = [{"instruction": "Name a colour.", "input": ""},
           {"instruction": "Translate to French.", "input": "cat"},
           {"instruction": "Add the numbers.", "input": "2 and 3"}]


# --- prompt and parsing --------------------------------------------------------------------------


def test_prompt_is_pandalms_text():
    """Literal texts of WeOpenML/PandaLM pandalm/utils/pandalm_inference.py build_pandalm_prompt."""
    assert judge.build_prompt("Translate to French.", "cat", " chat</s> ", "<s>le chien") == (
        "Below are two responses for a given task. The task is defined by the Instruction with an Input that "
        "provides further context. Evaluate the responses and generate a reference answer for the task.\n\n"
        "### Instruction:\nTranslate to French.\n\n### Input:\ncat\n\n"
        "### Response 1:\nchat\n\n### Response 2:\nle chien\n\n### Evaluation:\n")
    assert judge.build_prompt("Name a colour.", "", "red", "blue") == (
        "Below are two responses for a given task. The task is defined by the Instruction. Evaluate the "
        "responses and generate a reference answer for the task.\n\n"
        "### Instruction:\nName a colour.\n\n### Response 1:\nred\n\n### Response 2:\nblue\n\n### Evaluation:\n")


@pytest.mark.parametrize("text,verdict", [
    ("1\n\n### Reason: Response 1 names a colour.\n\n### Reference: red\n", 1),
    ("2", 2),
    ("  2\n\n### Reason: ...", 2),
    ("Tie\n\n### Reason: both fine", judge.TIE),
    ("tie", judge.TIE),
    ("</s>1\n", 1),  # PandaLM filters special tokens before parsing
    ("Response 1 is better", None),
    ("12\n", None),
    ("1.", None),
    ("", None),
    ("\n\n", None),
])
def test_parse_verdict(text, verdict):
    assert judge.parse_verdict(text) == verdict


def test_outcome_for_a_maps_the_swapped_order_back():
    assert [judge.outcome_for_a(v, a_first=True) for v in (1, 2, judge.TIE, None)] == \
        ["wins", "losses", "ties", "unparsed"]
    assert [judge.outcome_for_a(v, a_first=False) for v in (1, 2, judge.TIE, None)] == \
        ["losses", "wins", "ties", "unparsed"]


def test_score_orders_on_fixed_judge_outputs():
    # A first: A wins, loses, ties, unparsed; B first: "2" twice = A wins twice, "1" = A loses, a tie.
    result = judge.score_orders(["1", "2", "Tie", "I cannot decide"], ["2\n\nReason", "2", "1", "tie"])
    assert {k: result["a_first"][k] for k in ("wins", "losses", "ties", "unparsed", "total")} == \
        {"wins": 1, "losses": 1, "ties": 1, "unparsed": 1, "total": 4}
    assert {k: result["b_first"][k] for k in ("wins", "losses", "ties", "unparsed", "total")} == \
        {"wins": 2, "losses": 1, "ties": 1, "unparsed": 0, "total": 4}
    assert result["a_first"]["score"] == 0.0  # (1 - 1) / 4
    assert result["b_first"]["score"] == 0.25  # (2 - 1) / 4
    assert result["score"] == 0.125 and result["unparsed"] == 1
    assert result["outcomes"]["b_first"] == ["wins", "wins", "losses", "ties"]
    with pytest.raises(ValueError, match="2 judgements with A first but 1"):
        judge.score_orders(["1", "2"], ["1"])


def test_compare_asks_both_orders_and_averages():
    better = ["a good answer"] * 3
    worse = ["bad", "bad", "bad"]
    seen = []

    def fair(prompts):  # prefers the response that says "good", wherever it stands
        seen.extend(prompts)
        return ["1" if "### Response 1:\na good" in p else "2" for p in prompts]

    result = judge.compare(RECORDS, better, worse, fair)
    assert result["score"] == 1.0 and result["a_first"]["wins"] == result["b_first"]["wins"] == 3
    assert len(seen) == 6 and all("### Response 1:\na good" in p for p in seen[:3])
    assert all("### Response 2:\na good" in p for p in seen[3:])
    assert "### Input:\ncat" in seen[1] and "### Input:" not in seen[0]
    assert judge.compare(RECORDS, worse, better, fair)["score"] == -1.0

    def first_always(prompts):  # pure position bias: each order cancels the other
        return ["1"] * len(prompts)

    biased = judge.compare(RECORDS, better, worse, first_always)
    assert biased["a_first"]["score"] == 1.0 and biased["b_first"]["score"] == -1.0 and biased["score"] == 0.0
    assert biased["judgements"]["a_first"] == ["1"] * 3

    with pytest.raises(judge.JudgeError, match="returned 2 outputs for 6 prompts"):
        judge.compare(RECORDS, better, worse, lambda prompts: ["1", "2"])


# --- a real (tiny, random) Hugging Face judge ----------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("judge")
    return {"a": save_checkpoint(root / "a", seed=5), "b": save_checkpoint(root / "b", seed=6),
            "judge": save_checkpoint(root / "judge", seed=7, num_hidden_layers=2)}


def test_hf_judge_plumbing(files):
    """Batched (left-padded) judge outputs equal one-at-a-time outputs and plain HF greedy generate."""
    prompts = [judge.build_prompt(r["instruction"], r["input"], "red", "blue") for r in RECORDS]
    batched = judge.HFJudge(files["judge"], max_new_tokens=4, batch_size=3)(prompts)
    single = judge.HFJudge(files["judge"], max_new_tokens=4, batch_size=1)(prompts)
    assert batched == single and len(batched) == 3 and all(isinstance(t, str) for t in batched)
    tokenizer = transformers.AutoTokenizer.from_pretrained(files["judge"])
    model = transformers.AutoModelForCausalLM.from_pretrained(files["judge"]).eval()
    ids = tokenizer(prompts[0], return_tensors="pt")["input_ids"]
    expected = model.generate(ids, do_sample=False, max_new_tokens=4, pad_token_id=0)[0, ids.shape[1]:]
    assert single[0] == tokenizer.decode(expected, skip_special_tokens=True)
    # A random judge says nothing parseable: every output is counted, none dropped.
    result = judge.compare(RECORDS, ["red"] * 3, ["blue"] * 3, judge.HFJudge(files["judge"], max_new_tokens=4))
    counts = [result[order][k] for order in ("a_first", "b_first") for k in ("wins", "losses", "ties", "unparsed")]
    assert sum(counts) == 6 and result["unparsed"] == sum(judge.parse_verdict(t) is None for order in
                                                          ("a_first", "b_first") for t in result["judgements"][order])


def test_hf_judge_bad_directory(tmp_path):
    with pytest.raises(judge.JudgeError, match="no config.json"):
        judge.HFJudge(tmp_path)


# --- the CLI -------------------------------------------------------------------------------------


def test_judge_cli_grid(files, tmp_path, capsys):
    out = tmp_path / "out"
    instructions = tmp_path / "instructions.json"
    instructions.write_text(json.dumps(RECORDS))
    result = run_cli(capsys, "eval", "judge", "--a", f"soft={files['a']}", "--b", f"sft={files['b']}", "--a-exits",
                     "2,4", "--judge", files["judge"], "--instructions", instructions, "--limit", "2",
                     "--max-new-tokens", "3", "--judge-max-new-tokens", "2", "--out", out)
    assert result.returncode == 0, result.stderr
    written = json.loads((out / "judge.json").read_text())
    assert written["records"] == 2 and written["a"]["exits"] == [2, 4] and written["b"]["exits"] == [4]
    assert [(c["a_exit"], c["b_exit"]) for c in written["cells"]] == [(2, 4), (4, 4)]
    outputs = json.loads((out / "judge_outputs.json").read_text())
    for cell, raw in zip(written["cells"], outputs):
        # The written counts are the scoring of the written raw judge outputs.
        rescored = judge.score_orders(raw["a_first"], raw["b_first"])
        assert cell["score"] == rescored["score"] and cell["unparsed"] == rescored["unparsed"]
        assert cell["a_first"]["total"] == cell["b_first"]["total"] == 2
    responses = json.loads((out / "judge_responses.json").read_text())
    assert set(responses["a"]) == {"2", "4"} and len(responses["b"]["4"]) == 2
    table = (out / "judge.md").read_text()
    assert table in result.stdout and "| soft exit | sft exit | score |" in table
    assert (out / "judge_grid.png").read_bytes()[:4] == b"\x89PNG"
    if written["unparsed"]:
        assert "could not be parsed" in result.stderr


@pytest.mark.parametrize("extra,message", [
    (["--a-exits", "5"], "--a-exits 5: exit(s) [5] out of range for system A (soft)"),
    (["--judge", "/nonexistent"], "no config.json"),
    (["--instructions", "/nonexistent.json"], "no such file"),
    (["--limit", "0"], "--limit must be a positive integer"),
])
def test_judge_cli_bad_input(files, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    args = ["judge", "--a", f"soft={files['a']}", "--b", f"sft={files['b']}", "--judge", str(files["judge"]),
            "--out", str(out)]
    assert_cli_refuses(args + extra, capsys, out, message)
