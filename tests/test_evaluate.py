"""soft_ds.eval.metrics (per-exit loss/perplexity, KL by position) and `soft-ds eval lm|kl`, on tiny
random checkpoints, against hand computations."""

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from _eval_checkpoints import (NUM_LAYERS, assert_cli_refuses, one_thread, record_chat_template,  # noqa: F401
                               save_checkpoint, write_alpaca)
from conftest import REPO, run_cli

from soft_ds.data.splits import build_datasets
from soft_ds.data.targets import IGNORE_INDEX
from soft_ds.data.templates import encode_prompt, format_prompt
from soft_ds.data.tokenizer import load_tokenizer
from soft_ds.eval import metrics
from soft_ds.exits import check_exit_layers
from soft_ds.hf_io import load_model
from soft_ds.inference import SoftGenerator

EXITS = list(range(1, NUM_LAYERS + 1))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    return {"soft": save_checkpoint(root / "soft", seed=3), "other": save_checkpoint(root / "other", seed=4),
            "data": write_alpaca(root / "alpaca.json", count=16)}


@pytest.fixture(scope="module")
def model(files):
    return load_model(files["soft"])


@pytest.fixture(scope="module")
def tokenizer(files):
    return load_tokenizer(files["soft"])


@pytest.fixture(scope="module")
def val_set(files, tokenizer):
    # max_length 96 cuts some records (their eos and the end of the response), as training would.
    return build_datasets(files["data"], tokenizer, max_length=96, val_size=6, seed=0)[1]


# --- loss and perplexity -------------------------------------------------------------------------


def test_lm_metrics_equal_a_hand_computation(model, tokenizer, val_set):
    """Batched, padded, all exits from one forward == one record at a time, one token at a time."""
    by_exit = metrics.lm_metrics(model, val_set, EXITS, tokenizer.pad_token_id, batch_size=4)  # batches of 4 and 1
    expected_tokens = 0
    for record in val_set:
        # Counted tokens from the text alone: response + eos, after the cut at max_length.
        full = 1 + len(tokenizer.encode(format_prompt(record) + record["output"], add_special_tokens=False)) + 1
        expected_tokens += min(full, 96) - len(encode_prompt(record, tokenizer))
    assert any(len(record["input_ids"]) == 96 for record in val_set), "no record exercises the cut"
    for n in EXITS:
        total, tokens = 0.0, 0
        for record in val_set:
            with torch.no_grad():
                logits = model(torch.tensor([record["input_ids"]]), exit_layer=n)[0]  # (T, V)
            for position, target in enumerate(record["targets"]):
                if target != IGNORE_INDEX:
                    total += F.cross_entropy(logits[position:position + 1], torch.tensor([target])).item()
                    tokens += 1
        assert tokens == expected_tokens == by_exit[n]["tokens"]
        assert by_exit[n]["loss"] == pytest.approx(total / tokens, abs=1e-5)
        assert by_exit[n]["ppl"] == pytest.approx(math.exp(total / tokens), rel=1e-5)
    assert len({round(by_exit[n]["loss"], 6) for n in EXITS}) == len(EXITS), "the exits should differ"


def test_exit_checks_name_the_problem(model, val_set):
    with pytest.raises(ValueError, match=r"exit\(s\) \[5\] out of range .* 1..4"):
        metrics.lm_metrics(model, val_set, [2, 5], pad_id=0)
    with pytest.raises(ValueError, match="out of range"):
        check_exit_layers([0], 4)
    assert check_exit_layers([4, 2, 2], 4) == (2, 4)


# --- KL by position ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prompts(val_set, tokenizer):
    return [encode_prompt(record, tokenizer) for record in val_set][:4]


def test_kl_is_zero_against_own_last_layer_and_positive_elsewhere(files, model, prompts):
    responses = metrics.generate_responses(SoftGenerator(model), prompts, None, max_new_tokens=6,
                                            eos_token_id=None, batch_size=3)
    assert [len(r) for r in responses] == [6] * 4
    own = metrics.kl_by_position(model, model, prompts, responses, EXITS, batch_size=3)
    assert own[NUM_LAYERS]["kl"] == [0.0] * 6 and own[NUM_LAYERS]["mean"] == 0.0
    for n in EXITS[:-1]:
        assert min(own[n]["kl"]) > 0 and own[n]["count"] == [4] * 6
    # The same checkpoint loaded twice is the same model: exactly 0 again.
    # Same batch size as `own`: kernels of other shapes sum in other orders (fp32 rounding).
    twin = metrics.kl_by_position(model, load_model(files["soft"]), prompts, responses, EXITS, batch_size=3)
    assert twin[NUM_LAYERS]["kl"] == [0.0] * 6
    assert twin[1]["kl"] == pytest.approx(own[1]["kl"], rel=1e-5)
    other = metrics.kl_by_position(model, load_model(files["other"]), prompts, responses, EXITS)
    assert all(min(other[n]["kl"]) > 0 for n in EXITS)


def test_kl_by_position_equals_a_hand_computation(files, model, prompts):
    """Responses of lengths 3, 5, 1, 5 (as an eos would cut them): position t averages only the
    responses that reach it, and each term is sum_v p_ref (log p_ref - log p_exit)."""
    reference = load_model(files["other"])
    generator = torch.Generator().manual_seed(5)
    responses = [torch.randint(3, 4096, (length,), generator=generator).tolist() for length in (3, 5, 1, 5)]
    got = metrics.kl_by_position(model, reference, prompts, responses, [2], batch_size=3)[2]
    sums, counts = [0.0] * 5, [0] * 5
    for prompt, response in zip(prompts, responses):
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            p = torch.softmax(reference(ids)[0].double(), -1)  # (T, V)
            q = torch.softmax(model(ids, exit_layer=2)[0].double(), -1)
        for t in range(len(response)):
            column = len(prompt) - 1 + t
            sums[t] += float((p[column] * (p[column].log() - q[column].log())).sum())
            counts[t] += 1
    assert got["count"] == counts == [4, 3, 3, 2, 2]
    assert got["kl"] == pytest.approx([s / c for s, c in zip(sums, counts)], rel=1e-4)
    assert got["mean"] == pytest.approx(sum(sums) / sum(counts), rel=1e-4)


def test_kl_refuses_different_vocabularies(files, model, tmp_path, prompts):
    small = load_model(save_checkpoint(tmp_path / "small", seed=1, vocab_size=512))
    with pytest.raises(ValueError, match="vocabulary"):
        metrics.kl_by_position(model, small, prompts[:1], [[5]], [2])


# --- the CLI -------------------------------------------------------------------------------------


def test_lm_cli_writes_json_table_and_plot(files, model, tokenizer, tmp_path, capsys):
    out = tmp_path / "out"
    result = run_cli(capsys, "eval", "lm", "--model", f"soft={files['soft']}", "--model", f"other={files['other']}",
                     "--exits", "2,4", "--data", str(files["data"]), "--val_size", "6", "--seed", "0",
                     "--seq_len", "96", "--batch-size", "4", "--out", str(out))
    assert result.returncode == 0, result.stderr
    written = json.loads((out / "lm.json").read_text())
    assert set(written["models"]) == {"soft", "other"} and set(written["models"]["soft"]["exits"]) == {"2", "4"}
    # The CLI's held-out split is training's: the same build_datasets call gives the same numbers
    # (6 held out, one dropped: its prompt alone fills max_length 96).
    val_set = build_datasets(files["data"], tokenizer, max_length=96, val_size=6, seed=0)[1]
    assert written["records"] == len(val_set) == 5
    direct = metrics.lm_metrics(model, val_set, [2, 4], tokenizer.pad_token_id)
    for n in (2, 4):
        assert written["models"]["soft"]["exits"][str(n)]["loss"] == pytest.approx(direct[n]["loss"], rel=1e-6)
    table = (out / "lm.md").read_text()
    assert table in result.stdout  # what it prints is what it writes
    assert "| exit | soft loss | soft ppl | other loss | other ppl |" in table
    assert f"{written['models']['other']['exits']['4']['ppl']:.4f}" in table
    assert (out / "ppl_vs_exit.png").read_bytes()[:4] == b"\x89PNG"


def test_lm_cli_scores_in_the_template_the_export_records(files, tmp_path, capsys):
    # An export trained with --template chat is scored on its held-out records in the chat template,
    # unless --template says otherwise; a model of another template is not mixed in silently.
    import shutil
    chat = record_chat_template(shutil.copytree(files["soft"], tmp_path / "chat"))
    common = ["--exits", "4", "--data", str(files["data"]), "--val_size", "6", "--seed", "0", "--seq_len", "96"]
    tokenizer = load_tokenizer(chat)
    model = load_model(chat)
    for override, template in ((None, "chat"), ("alpaca", "alpaca")):
        out = tmp_path / f"out-{template}"
        result = run_cli(capsys, "eval", "lm", "--model", f"chat={chat}", *common, "--out", out,
                         *(["--template", override] if override else []))
        assert result.returncode == 0, result.stderr
        written = json.loads((out / "lm.json").read_text())
        val_set = build_datasets(files["data"], tokenizer, 96, 6, 0, template=template)[1]
        expected = metrics.lm_metrics(model, val_set, [4], tokenizer.pad_token_id)[4]["loss"]
        assert written["template"] == template
        assert written["models"]["chat"]["exits"]["4"]["loss"] == pytest.approx(expected, rel=1e-6)
    assert_cli_refuses(["lm", "--model", f"chat={chat}", "--model", f"soft={files['soft']}", *common,
                        "--out", tmp_path / "mixed"], capsys, tmp_path / "mixed",
                       "the models were trained with different prompt templates")
    assert_cli_refuses(["lm", "--model", f"soft={files['soft']}", "--template", "chat", *common,
                        "--out", tmp_path / "none"], capsys, tmp_path / "none",
                       "template 'chat' needs a tokenizer with a chat template")


def test_kl_cli_default_and_shared_reference(files, tmp_path, capsys):
    out = tmp_path / "own"
    common = ["--data", str(files["data"]), "--val_size", "6", "--seed", "0", "--num-prompts", "3",
              "--max-new-tokens", "4", "--exits", "2,4"]
    assert run_cli(capsys, "eval", "kl", "--model", f"soft={files['soft']}", "--out", out, *common).returncode == 0
    own = json.loads((out / "kl.json").read_text())
    exits = own["models"]["soft"]["exits"]
    assert own["prompts"] == 3 and exits["4"]["kl"] == [0.0] * 4 and exits["4"]["count"] == [3] * 4
    assert min(exits["2"]["kl"]) > 0
    assert len(json.loads((out / "kl_responses.json").read_text())["soft"]) == 3
    assert "| exit | soft mean KL |" in (out / "kl.md").read_text()
    assert (out / "kl_vs_position.png").read_bytes()[:4] == b"\x89PNG"

    out = tmp_path / "shared"
    assert run_cli(capsys, "eval", "kl", "--model", f"soft={files['soft']}", "--model", f"other={files['other']}",
                   "--reference", f"other={files['other']}", "--out", out, *common).returncode == 0
    shared = json.loads((out / "kl.json").read_text())
    assert shared["reference"]["name"] == "other"
    assert shared["models"]["other"]["exits"]["4"]["kl"] == [0.0] * 4  # the reference against itself
    assert min(shared["models"]["soft"]["exits"]["4"]["kl"]) > 0
    assert list(json.loads((out / "kl_responses.json").read_text())) == ["other"]  # generated once


@pytest.mark.parametrize("extra,message", [
    (["--exits", "2,5"], "exit(s) [5] out of range for soft: it has 4 layers"),
    (["--exits", "two"], "--exits must be comma-separated integers"),
    (["--data", "missing.json"], "no such file"),
    (["--val_size", "0"], "--val-size must be at least 1"),
    (["--model", "missing=/nonexistent/dir"], "does not exist"),
])
def test_lm_cli_bad_input_is_one_error_line_and_writes_nothing(files, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    args = ["lm", "--model", f"soft={files['soft']}", "--data", str(files["data"]), "--val_size", "6",
            "--out", str(out)]
    assert_cli_refuses(args + extra, capsys, out, message)  # a repeated option replaces the first


def test_kl_cli_bad_input(files, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["kl", "--model", f"soft={files['soft']}", "--data", str(files["data"]), "--val_size", "6",
            "--out", str(out)]
    assert_cli_refuses(args + ["--reference", f"soft={files['other']}"], capsys, out,
                       "the name 'soft' is a --model with another path")
    assert_cli_refuses(args + ["--num-prompts", "0"], capsys, out, "--num-prompts must be a positive integer")
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    assert_cli_refuses(args[:-1] + [str(a_file)], capsys, tmp_path / "none", "exists and is not a directory")
    small = save_checkpoint(tmp_path / "small", seed=1, vocab_size=512)
    assert_cli_refuses(args + ["--reference", f"small={small}", "--tokenizer", str(files["soft"])], capsys, out,
                       "vocabulary size differs from the reference small's (512)")


def test_answers_cli_writes_every_exits_greedy_answers_side_by_side(files, model, tokenizer, tmp_path, capsys):
    out = tmp_path / "out"
    result = run_cli(capsys, "eval", "answers", "--model", f"soft={files['soft']}", "--model",
                     f"other={files['other']}", "--exits", "2,4", "--data", str(files["data"]), "--val_size", "6",
                     "--seed", "0", "--num-prompts", "2", "--max-new-tokens", "5", "--out", str(out))
    assert result.returncode == 0, result.stderr
    written = json.loads((out / "answers.json").read_text())
    records = list(build_datasets(files["data"], tokenizer, max_length=512, val_size=6, seed=0)[1])[:2]
    assert [r["instruction"] for r in written["records"]] == [r["instruction"] for r in records]
    generator = SoftGenerator(model, tokenizer)
    for n in (2, 4):  # each exit's answers are its own greedy decoding, decoded to text
        tokens = generator.generate([encode_prompt(r, tokenizer) for r in records], exit_layer=n, max_new_tokens=5,
                                    eos_token_id=tokenizer.eos_token_id).tokens
        assert written["models"]["soft"][str(n)] == [tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
    assert written["models"]["soft"]["2"] != written["models"]["other"]["2"]
    page = (out / "answers.md").read_text()
    assert page in result.stdout and page.count("| exit | soft | other |") == 2
    assert f"### 1. {records[0]['instruction']}" in page and "| 4 | " in page
    assert_cli_refuses(["answers", "--model", f"soft={files['soft']}", "--num-prompts", "0", "--data",
                        str(files["data"]), "--val_size", "6", "--out", tmp_path / "bad"], capsys, tmp_path / "bad",
                       "--num-prompts must be a positive integer")


def test_config_gives_the_held_out_split_and_exits_unless_an_option_does(files, tmp_path, capsys):
    """--config FILE or RUN: the training config's (or run's) val_size, seed, seq_len and exits; a given option
    wins."""
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
                                  "soft": {"exits": [1, 3], "val_size": 5, "seed": 7, "seq_len": 64}}))
    common = ["eval", "lm", "--model", f"soft={files['soft']}", "--data", str(files["data"])]
    result = run_cli(capsys, *common, "--config", str(config), "--out", str(tmp_path / "a"))
    assert result.returncode == 0, result.stderr
    written = json.loads((tmp_path / "a" / "lm.json").read_text())
    assert (written["val_size"], written["seed"], written["seq_len"]) == (5, 7, 64)
    assert list(written["models"]["soft"]["exits"]) == ["1", "3"]
    result = run_cli(capsys, *common, "--config", str(config), "--exits", "2", "--val_size", "4", "--out",
                     str(tmp_path / "b"))
    assert result.returncode == 0, result.stderr
    written = json.loads((tmp_path / "b" / "lm.json").read_text())
    assert (written["val_size"], written["seed"], written["seq_len"]) == (4, 7, 64)
    assert list(written["models"]["soft"]["exits"]) == ["2"]
    config.write_text('{"soft": {"exits": [1, 3]}}')
    assert_cli_refuses(common[1:] + ["--config", str(config), "--out", tmp_path / "c"], capsys, tmp_path / "c",
                       "optimizer")
    # --config RUN: the settings the run's latest checkpoint recorded (a command-line --val_size included).
    from soft_ds.checkpoint import FORMAT_VERSION
    from soft_ds.config import SoftOptions
    run = tmp_path / "run"
    (run / "checkpoints" / "step3").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step3")
    meta = run / "checkpoints" / "step3" / "soft_meta.json"
    saved = vars(SoftOptions(exits=[1, 3], val_size=6, seed=9, seq_len=128))
    meta.write_text(json.dumps({"format_version": FORMAT_VERSION, "soft": saved}))
    result = run_cli(capsys, *common, "--config", str(run), "--out", str(tmp_path / "d"))
    assert result.returncode == 0, result.stderr
    written = json.loads((tmp_path / "d" / "lm.json").read_text())
    assert (written["val_size"], written["seed"], written["seq_len"]) == (6, 9, 128)
    assert list(written["models"]["soft"]["exits"]) == ["1", "3"]
    assert_cli_refuses(common[1:] + ["--config", str(tmp_path / "a"), "--out", tmp_path / "e"], capsys,
                       tmp_path / "e", "checkpoint")
    # A checkpoint of another format version is refused, not read with guesses for what it lacks.
    meta.write_text(json.dumps({"format_version": FORMAT_VERSION - 1, "soft": saved}))
    assert_cli_refuses(common[1:] + ["--config", str(run), "--out", tmp_path / "f"], capsys, tmp_path / "f",
                       f"format_version {FORMAT_VERSION - 1}; this soft-ds reads format_version {FORMAT_VERSION} only")


def test_answers_page_keeps_a_table_cell_one_cell():
    from soft_ds.eval.command import answers_page
    report = {"data": "d.json", "val_size": 1, "seed": 0, "template": "alpaca", "decoding": "greedy",
              "records": [{"instruction": "Say a | b", "input": "", "output": "ok"}],
              "models": {"soft": {"2": ["a | b\n<c>"], "4": [""]}}}
    page = answers_page(report)
    assert "| 2 | a \\| b<br>&lt;c&gt; |" in page and "| 4 | *(nothing)* |" in page


def test_help_lists_the_sub_commands(capsys):
    result = run_cli(capsys, "eval", "--help")
    assert result.returncode == 0
    for command in ("lm", "kl", "answers", "judge", "triviaqa", "claims"):
        assert command in result.stdout


def test_eval_commands_without_a_training_file_start_without_datasets():
    """`soft-ds eval judge`, `claims` and `triviaqa` on JSON read no Alpaca training file, so they do
    not import `datasets` (lm, kl and answers do, for the held-out split: inputs.held_out_records)."""
    code = "import sys\nimport soft_ds.eval.command\nassert 'datasets' not in sys.modules, 'datasets imported'\n"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
