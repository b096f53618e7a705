"""soft_ds.data against hand-computed references, on the bundled tokenizer and Alpaca subset."""

import json
import logging
import os
from pathlib import Path

import datasets
import pytest
import sentencepiece as spm
import torch

from conftest import global_batch, run_cli
from soft_ds.data.batching import batch_iterator, collate, collate_rows
from soft_ds.data.packing import epoch_rows, global_batch_rows, row_fill, step_tokens
from soft_ds.data.records import DataError, load_instructions, load_records
from soft_ds.data.splits import build_datasets
from soft_ds.data.targets import IGNORE_INDEX, tokenize_record
from soft_ds.data.templates import (PROMPT_NO_INPUT, PROMPT_WITH_INPUT, check_template, checkpoint_template, encode_prompt,
                                    encode_text, format_prompt, leading_special_ids)
from soft_ds.data.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = REPO / "data" / "tokenizer"
ALPACA = REPO / "data" / "alpaca_5000.json"
VOCAB_SIZE = 4096

RECORD = {"instruction": "Name a primary colour.", "input": "", "output": "Red is one."}
RECORD_WITH_INPUT = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TOKENIZER_DIR)


def write_records(path, records):
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_loads_from_directory_and_bare_model_file_alike(tmp_path):
    from_dir = load_tokenizer(TOKENIZER_DIR)
    from_model = load_tokenizer(TOKENIZER_DIR / "tokenizer.model")
    # A directory holding nothing but tokenizer.model is the same SentencePiece model.
    (tmp_path / "tokenizer.model").write_bytes((TOKENIZER_DIR / "tokenizer.model").read_bytes())
    from_model_dir = load_tokenizer(tmp_path)
    sentencepiece = spm.SentencePieceProcessor(model_file=str(TOKENIZER_DIR / "tokenizer.model"))
    text = "### Response:\nTabs\tand  two spaces, 12345 digits, café 🦙"
    for tokenizer in (from_dir, from_model, from_model_dir):
        assert type(tokenizer).__name__ == "LlamaTokenizer"
        assert len(tokenizer) == VOCAB_SIZE
        assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
        assert tokenizer.pad_token_id == tokenizer.eos_token_id  # no pad piece: pad with eos
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert ids == sentencepiece.encode(text)
        assert tokenizer.decode(ids) == text
        assert tokenizer.encode(text) == [1] + ids  # prepends <s> like LLaMA's tokenizers


def test_tokenizer_errors_name_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="nowhere: no such file"):
        load_tokenizer(missing)
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"not a sentencepiece model")
    with pytest.raises(DataError, match="garbage.model: cannot be loaded"):
        load_tokenizer(garbage)


def test_train_tokenizer_command_writes_a_loadable_tokenizer(tmp_path, capsys):
    small = write_records(tmp_path / "small.json", json.loads(ALPACA.read_text())[:300])
    out = run_cli(capsys, "train-tokenizer", "--data", small, "--vocab-size", "600", "--out", tmp_path / "tok")
    assert out.returncode == 0 and out.stdout.startswith(f"wrote {tmp_path / 'tok'} (600 pieces"), out.stderr
    tokenizer = load_tokenizer(tmp_path / "tok")
    assert len(tokenizer) == 600
    written = {path.name for path in (tmp_path / "tok").iterdir()}
    assert {"tokenizer.model", "tokenizer.json", "tokenizer_config.json"} <= written
    # Deterministic: a second run writes the same model.
    run_cli(capsys, "train-tokenizer", "--data", small, "--vocab-size", "600", "--out", tmp_path / "again")
    first, second = (tmp_path / name / "tokenizer.model" for name in ("tok", "again"))
    assert first.read_bytes() == second.read_bytes()


@pytest.mark.parametrize("args,message", [
    (["--vocab-size", "259"], "error: --vocab-size 259 is too small: byte fallback alone needs 259"),
    (["--data", "/nonexistent.json"], "error: data file /nonexistent.json: no such file"),
])
def test_train_tokenizer_command_refuses_bad_input(tmp_path, capsys, args, message):
    out = run_cli(capsys, "train-tokenizer", "--out", tmp_path / "tok", *args)
    assert out.returncode == 2 and out.stderr.strip() == message and not (tmp_path / "tok").exists()


def test_bundled_tokenizer_is_small():
    assert sum(p.stat().st_size for p in TOKENIZER_DIR.iterdir()) < 1_000_000


# ---------------------------------------------------------------------------------------------
# Prompts and targets


def test_templates_are_the_alpaca_templates():
    assert PROMPT_WITH_INPUT == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    )
    assert PROMPT_NO_INPUT == (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:\n"
    )
    assert format_prompt(RECORD_WITH_INPUT).endswith(
        "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n"
    )
    assert format_prompt(RECORD) == PROMPT_NO_INPUT.format(instruction="Name a primary colour.")
    assert format_prompt({"instruction": "x", "output": "y"}) == PROMPT_NO_INPUT.format(instruction="x")


@pytest.mark.parametrize("record", [RECORD, RECORD_WITH_INPUT])
def test_targets_are_next_tokens_of_the_response_and_eos(tokenizer, record):
    prompt = format_prompt(record)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    text_ids = tokenizer.encode(prompt + record["output"], add_special_tokens=False)
    response_ids = text_ids[len(prompt_ids):]
    assert text_ids[: len(prompt_ids)] == prompt_ids
    assert tokenizer.decode(response_ids) == record["output"]

    example = tokenize_record(record, tokenizer, max_length=512)

    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert example["input_ids"] == [bos] + prompt_ids + response_ids + [eos]
    # Position t predicts token t+1: the last prompt token predicts the first response token,
    # the last response token predicts eos, eos predicts nothing.
    assert example["targets"] == [IGNORE_INDEX] * len(prompt_ids) + response_ids + [eos] + [IGNORE_INDEX]
    assert example["untruncated_length"] == len(example["input_ids"])
    assert encode_prompt(record, tokenizer) == [bos] + prompt_ids


def test_truncation_drops_eos_then_response_then_prompt(tokenizer):
    full = tokenize_record(RECORD, tokenizer, max_length=512)
    length = len(full["input_ids"])
    prompt_length = len(encode_prompt(RECORD, tokenizer))  # bos + prompt

    # One token short: the eos goes, the response keeps every target it has a next token for.
    cut = tokenize_record(RECORD, tokenizer, max_length=length - 1)
    assert cut["input_ids"] == full["input_ids"][:-1]
    assert cut["targets"] == full["targets"][:-2] + [IGNORE_INDEX]
    assert tokenizer.eos_token_id not in cut["targets"]
    assert cut["untruncated_length"] == length

    # Prompt plus one response token: exactly one counted target, the first response token.
    one = tokenize_record(RECORD, tokenizer, max_length=prompt_length + 1)
    assert [t for t in one["targets"] if t != IGNORE_INDEX] == [full["input_ids"][prompt_length]]

    # Prompt cut: nothing to learn.
    short = tokenize_record(RECORD, tokenizer, max_length=prompt_length - 3)
    assert short["input_ids"] == full["input_ids"][: prompt_length - 3]
    assert set(short["targets"]) == {IGNORE_INDEX}


def test_tokenizer_that_merges_across_the_prompt_boundary_is_rejected():
    class MergingTokenizer:
        """Characters as ids, except that "\\n" and the character after it become one token."""

        bos_token_id, eos_token_id = 1, 2

        def encode(self, text, add_special_tokens=False):
            ids, position = [], 0
            while position < len(text):
                if text[position] == "\n" and position + 1 < len(text):
                    ids.append(100_000 + ord(text[position + 1]))
                    position += 2
                else:
                    ids.append(ord(text[position]))
                    position += 1
            return ids

    with pytest.raises(DataError, match="merges the end of the prompt"):
        tokenize_record(RECORD, MergingTokenizer(), max_length=512)


# ---------------------------------------------------------------------------------------------
# Byte-level BPE and the chat template, on the imported SmolLM2 tokenizer (tests/conftest.py)

SMOLLM2_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_dir):
    return load_tokenizer(smollm2_dir)


def test_special_tokens_are_the_tokenizers_own(tokenizer, smollm2_tokenizer):
    # LLaMA's SentencePiece tokenizer prepends <s>; SmolLM2's byte-level BPE adds nothing, and its
    # bos "<|im_start|>" opens a chat turn, so an Alpaca prompt must not start with it.
    assert leading_special_ids(tokenizer) == [tokenizer.bos_token_id] == [1]
    assert leading_special_ids(smollm2_tokenizer) == []
    for tok in (tokenizer, smollm2_tokenizer):
        text = format_prompt(RECORD)
        assert encode_text(text, tok) == encode_prompt(RECORD, tok) == tok(text)["input_ids"]


def test_alpaca_on_byte_level_bpe_keeps_the_eos_that_is_also_the_pad(smollm2_tokenizer):
    tok = smollm2_tokenizer
    eos = tok.eos_token_id
    assert tok.pad_token_id == eos == tok.convert_tokens_to_ids("<|im_end|>")
    prompt_ids = tok.encode(format_prompt(RECORD_WITH_INPUT), add_special_tokens=False)
    response_ids = tok.encode(RECORD_WITH_INPUT["output"], add_special_tokens=False)
    example = tokenize_record(RECORD_WITH_INPUT, tok, max_length=512)
    assert example["input_ids"] == prompt_ids + response_ids + [eos]
    assert example["targets"] == [IGNORE_INDEX] * (len(prompt_ids) - 1) + response_ids + [eos, IGNORE_INDEX]
    # Padding with the eos id after the targets were built: the closing eos is still a target.
    length = len(example["input_ids"])
    input_ids, targets = collate([example], seq_len=length + 5, pad_id=tok.pad_token_id)
    assert input_ids[0, length:].tolist() == [eos] * 5 and targets[0, length:].tolist() == [IGNORE_INDEX] * 5
    assert targets[0, length - 2].item() == eos
    assert (targets != IGNORE_INDEX).sum().item() == len(response_ids) + 1


def test_chat_template_masks_exactly_the_assistant_turn(smollm2_tokenizer):
    tok = smollm2_tokenizer
    # The SmolLM2 template written out by hand: its default system turn, the user turn, the
    # assistant's header, then the response and the assistant's end token <|im_end|>.
    prompt_text = (SMOLLM2_SYSTEM + "<|im_start|>user\nAdd the numbers.\n\n2 and 3<|im_end|>\n"
                   "<|im_start|>assistant\n")
    prompt_ids = tok.encode(prompt_text, add_special_tokens=False)
    response_ids = tok.encode(RECORD_WITH_INPUT["output"], add_special_tokens=False)
    assert encode_prompt(RECORD_WITH_INPUT, tok, "chat") == prompt_ids
    example = tokenize_record(RECORD_WITH_INPUT, tok, max_length=512, template="chat")
    eos = tok.eos_token_id
    # The template's "\n" after <|im_end|> is not part of the sequence: nothing is learnt after the turn ends.
    assert example["input_ids"] == prompt_ids + response_ids + [eos]
    assert example["targets"] == [IGNORE_INDEX] * (len(prompt_ids) - 1) + response_ids + [eos, IGNORE_INDEX]
    assert tok.decode([t for t in example["targets"] if t != IGNORE_INDEX]) == "5<|im_end|>"


@pytest.mark.parametrize("template", ["alpaca", "chat"])
def test_every_bundled_record_splits_cleanly_into_prompt_and_response_on_bpe(smollm2_tokenizer, template, tmp_path):
    # The prompt-is-a-prefix check holds for byte-level BPE on real data, and the counted targets
    # decode to exactly the record's output and the end token.
    records = json.loads(ALPACA.read_text())[:300]
    train, _ = build_datasets(write_records(tmp_path / "a.json", records), smollm2_tokenizer, 2048, 0, 0, template)
    assert len(train) == len(records)
    for example in train:
        assert example["untruncated_length"] == len(example["input_ids"])
        counted = [t for t in example["targets"] if t != IGNORE_INDEX]
        assert smollm2_tokenizer.decode(counted) == example["output"] + "<|im_end|>"


def test_chat_needs_a_chat_template_and_templates_are_named(tokenizer, tmp_path):
    with pytest.raises(DataError, match="template 'chat' needs a tokenizer with a chat template"):
        encode_prompt(RECORD, tokenizer, "chat")
    with pytest.raises(DataError, match="template 'chat' needs a tokenizer with a chat template"):
        build_datasets(ALPACA, tokenizer, 128, 10, 0, template="chat")
    with pytest.raises(DataError, match="template 'vicuna': choose one of alpaca, chat"):
        check_template("vicuna", tokenizer)


def test_checkpoint_template_reads_the_export_and_defaults_to_alpaca(tmp_path):
    assert checkpoint_template(tmp_path) == "alpaca"  # no config.json
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert checkpoint_template(tmp_path) == "alpaca"  # a model soft-ds did not train
    (tmp_path / "config.json").write_text(json.dumps({"soft_ds_template": "chat"}))
    assert checkpoint_template(tmp_path) == "chat"
    assert checkpoint_template(tmp_path, override="alpaca") == "alpaca"


# ---------------------------------------------------------------------------------------------
# Padding


def test_collate_right_pads_to_a_fixed_shape_with_ignored_targets():
    examples = [
        {"input_ids": [1, 5, 6, 2], "targets": [-100, 6, 2, -100]},
        {"input_ids": [1, 7], "targets": [7, -100]},
    ]
    input_ids, targets = collate(examples, seq_len=6, pad_id=9)
    assert input_ids.dtype == targets.dtype == torch.long
    assert input_ids.tolist() == [[1, 5, 6, 2, 9, 9], [1, 7, 9, 9, 9, 9]]
    assert targets.tolist() == [[-100, 6, 2, -100, -100, -100], [7, -100, -100, -100, -100, -100]]
    # Every padded position is ignored and every real position is as tokenized: right padding
    # leaves real tokens' causal context and loss terms untouched.
    real = torch.tensor([[True] * 4 + [False] * 2, [True] * 2 + [False] * 4])
    assert (input_ids[~real] == 9).all() and (targets[~real] == IGNORE_INDEX).all()
    assert (targets != IGNORE_INDEX).sum() == 3


def test_collate_rejects_examples_longer_than_seq_len():
    with pytest.raises(ValueError, match="example 0 has 3 tokens, more than seq_len=2"):
        collate([{"input_ids": [1, 2, 3], "targets": [2, 3, -100]}], seq_len=2, pad_id=0)


# ---------------------------------------------------------------------------------------------
# Records: loading and validation


def test_json_and_jsonl_load_alike_and_input_is_optional(tmp_path):
    records = [
        {"instruction": "a", "input": "b", "output": "c", "extra": 1},
        {"instruction": "d", "output": "e"},
        {"instruction": "f", "input": None, "output": "g"},
    ]
    as_json = load_records(write_records(tmp_path / "r.json", records))
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    as_jsonl = load_records(tmp_path / "r.jsonl")
    expected = [
        {"instruction": "a", "input": "b", "output": "c"},
        {"instruction": "d", "input": "", "output": "e"},
        {"instruction": "f", "input": "", "output": "g"},
    ]
    assert as_json == as_jsonl == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.jsonl"]  # nothing written


BAD_FILES = [
    # (file name, content, fragment the message must contain)
    ("empty.json", "", "empty.json: file is empty"),
    ("blank.jsonl", "\n  \n", "blank.jsonl: file is empty"),
    ("list.json", "[]", "list.json: holds no records"),
    ("broken.json", '[{"instruction": "a",\n "output": }]',
     "broken.json: malformed JSON at line 2, column 12"),
    ("lines.json", '{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}',
     "name the file .jsonl"),
    ("broken.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "c"\n',
     "broken.jsonl: malformed JSON at line 2"),
    ("object.json", '{"instruction": "a", "output": "b"}', "expected a JSON list of records, found a dict"),
    ("no_instruction.json", '[{"instruction": "a", "output": "b"}, {"output": "c"}]',
     "record 1 has no 'instruction' field"),
    ("no_output.json", '[{"instruction": "a", "output": "b"}, {"input": "a", "instruction": "b"}]',
     "record 1 has no 'output' field"),
    ("no_output.jsonl", '{"instruction": "a", "output": "b"}\n\n{"instruction": "c"}\n',
     "record 1 (line 3) has no 'output' field"),
    ("number.json", '[{"instruction": "a", "output": 5}]',
     "record 0: field 'output' must be a string, not int"),
    ("input.json", '[{"instruction": "a", "input": ["x"], "output": "b"}]',
     "record 0: field 'input' must be a string, not list"),
    ("string.json", '["just text"]', "record 0 is a str, expected an object"),
    ("data.csv", "instruction,output\na,b\n", "expected a .json or .jsonl file"),
]


@pytest.mark.parametrize("name, content, message", BAD_FILES, ids=[case[0] for case in BAD_FILES])
def test_bad_data_files_raise_a_data_error_naming_the_problem(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError) as error:
        load_records(path)
    assert message in str(error.value)
    assert str(path) in str(error.value)


def test_missing_data_file(tmp_path):
    with pytest.raises(DataError, match="absent.json: no such file"):
        load_records(tmp_path / "absent.json")


# ---------------------------------------------------------------------------------------------
# Splits


def test_split_is_deterministic_disjoint_and_complete(tmp_path, tokenizer):
    records = [{"instruction": f"Say {i}.", "input": "", "output": f"{i}"} for i in range(40)]
    path = write_records(tmp_path / "r.json", records)
    train, val = build_datasets(path, tokenizer, max_length=128, val_size=7, seed=3)
    train_again, val_again = build_datasets(path, tokenizer, max_length=128, val_size=7, seed=3)
    _, val_other_seed = build_datasets(path, tokenizer, max_length=128, val_size=7, seed=4)

    assert len(train) == 33 and len(val) == 7
    assert train.to_list() == train_again.to_list() and val.to_list() == val_again.to_list()
    assert set(val["output"]) != set(val_other_seed["output"])
    assert set(train["output"]).isdisjoint(val["output"])
    assert set(train["output"]) | set(val["output"]) == {str(i) for i in range(40)}
    assert train[0]["input_ids"] == tokenize_record(train[0], tokenizer, 128)["input_ids"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # nothing written beside the data

    train_all, val_none = build_datasets(path, tokenizer, max_length=128, val_size=0, seed=3)
    assert len(train_all) == 40 and len(val_none) == 0
    with pytest.raises(DataError, match="val_size=40 must be at least 0 and below the 40 records"):
        build_datasets(path, tokenizer, max_length=128, val_size=40, seed=3)


def test_records_without_targets_are_counted_and_dropped(tmp_path, tokenizer, caplog):
    long_prompt = {"instruction": "word " * 200, "input": "", "output": "x"}
    long_answer = {"instruction": "Talk.", "input": "", "output": "word " * 200}
    path = write_records(tmp_path / "r.json", [RECORD, long_prompt, long_answer])
    with caplog.at_level(logging.INFO, logger="soft_ds.data"):
        train, _ = build_datasets(path, tokenizer, max_length=128, val_size=0, seed=0)
    assert train["output"] == [RECORD["output"], long_answer["output"]]
    assert "2 of 3 train records are longer than max_length=128 and were truncated" in caplog.text
    assert "dropping 1 train records whose prompt alone fills max_length=128" in caplog.text


def test_empty_outputs_are_reported_by_record_and_an_all_empty_file_refused(tmp_path, caplog):
    path = write_records(tmp_path / "r.json", [RECORD, {**RECORD, "output": ""}, RECORD, {**RECORD, "output": " \n"}])
    with caplog.at_level(logging.WARNING, logger="soft_ds.data"):
        assert len(load_records(path)) == 4
    assert "2 of 4 records have an empty output (records 1, 3)" in caplog.text
    empty = write_records(tmp_path / "empty.json", [{**RECORD, "output": ""}] * 3)
    with pytest.raises(DataError, match="every record's output is empty"):
        load_records(empty)


# ---------------------------------------------------------------------------------------------
# Batch order


def toy_dataset(size):
    # Example i is the one-token sequence [i], so a batch names its examples.
    return [{"input_ids": [i], "targets": [i]} for i in range(size)]


def example_ids(micro_batch):
    return micro_batch[0][:, 0].tolist()  # input_ids (B, T)


def test_ranks_split_the_global_batch_disjointly():
    dataset, mbs, accum, dp = toy_dataset(50), 2, 3, 2  # global batch 12: 4 steps an epoch
    for step in range(4):
        micro_batches = global_batch(dataset, step, mbs, accum, dp, seed=0, seq_len=2, pad_id=0)
        assert len(micro_batches) == accum * dp
        assert all(batch[0].shape == (mbs, 2) for batch in micro_batches)
        per_rank = [
            [index for batch in micro_batches[r * accum:(r + 1) * accum] for index in example_ids(batch)]
            for r in range(dp)
        ]
        assert set(per_rank[0]).isdisjoint(per_rank[1])
        union = set(per_rank[0]) | set(per_rank[1])
        assert len(union) == mbs * accum * dp
        # The step reads the next 12 examples of the epoch's permutation, in order.
        permutation = torch.randperm(50, generator=torch.Generator().manual_seed(0)).tolist()
        assert per_rank[0] + per_rank[1] == permutation[step * 12:(step + 1) * 12]


def test_iterator_yields_this_ranks_slice_of_the_global_batch():
    dataset, mbs, accum, dp, seed = toy_dataset(30), 2, 2, 3, 7
    for rank in range(dp):
        iterator = batch_iterator(dataset, mbs, accum, rank, dp, seed, seq_len=1, pad_id=0)
        for step in range(8):  # past the 2-step epoch, so several reshuffles
            slots = global_batch_rows(len(dataset), step, mbs, accum, dp, seed)
            for micro_step in range(accum):
                rows = slots[rank * accum + micro_step]
                expected = collate_rows([[dataset[index] for index in row] for row in rows], seq_len=1, pad_id=0)
                batch = next(iterator)
                assert len(batch) == 3 and all(torch.equal(a, b) for a, b in zip(batch, expected))


def test_start_step_resumes_the_uninterrupted_order():
    dataset, mbs, accum, dp, seed = toy_dataset(23), 3, 2, 2, 1
    uninterrupted = batch_iterator(dataset, mbs, accum, 1, dp, seed, seq_len=1, pad_id=0)
    order = [example_ids(next(uninterrupted)) for _ in range(10 * accum)]
    resumed = batch_iterator(dataset, mbs, accum, 1, dp, seed, seq_len=1, pad_id=0, start_step=4)
    assert [example_ids(next(resumed)) for _ in range(6 * accum)] == order[4 * accum:]


def test_epochs_reshuffle_and_drop_the_remainder():
    size, mbs, accum, dp, seed = 26, 2, 2, 2, 5  # global batch 8: 3 steps an epoch, 2 left over
    steps = [global_batch_rows(size, step, mbs, accum, dp, seed) for step in range(6)]
    epochs = [
        [index for step in steps[3 * e:3 * e + 3] for micro in step for row in micro for index in row]
        for e in range(2)
    ]
    for epoch, taken in enumerate(epochs):
        permutation = torch.randperm(size, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        assert taken == permutation[:24]  # the last 2 examples of the permutation are skipped
    assert epochs[0] != epochs[1]
    with pytest.raises(DataError, match="26 training examples cannot fill one global batch of 32"):
        global_batch_rows(size, 0, 4, 4, 2, seed)


def sized_dataset(lengths):
    # Example i is i repeated lengths[i] times, its last target ignored (as tokenize_record's).
    return datasets.Dataset.from_list([{"input_ids": [i] * n, "targets": [i] * (n - 1) + [IGNORE_INDEX]}
                                       for i, n in enumerate(lengths)])


def test_collate_rows_packs_records_with_restarting_positions():
    rows = [[{"input_ids": [1, 5, 2], "targets": [-100, 2, -100]}, {"input_ids": [1, 7], "targets": [7, -100]}],
            [{"input_ids": [1, 8, 9, 2], "targets": [-100, 9, 2, -100]}]]
    input_ids, targets, positions = collate_rows(rows, seq_len=7, pad_id=0)
    assert input_ids.tolist() == [[1, 5, 2, 1, 7, 0, 0], [1, 8, 9, 2, 0, 0, 0]]
    assert targets.tolist() == [[-100, 2, -100, 7, -100, -100, -100], [-100, 9, 2, -100, -100, -100, -100]]
    # Each record counts from 0; the padding continues the last record.
    assert positions.tolist() == [[0, 1, 2, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6]]
    with pytest.raises(ValueError, match="example 0 has 8 tokens, more than seq_len=7"):
        collate_rows([rows[0] + [{"input_ids": [1] * 3, "targets": [1] * 3}]], 7, 0)


def test_packed_rows_fill_seq_len_in_the_epoch_order():
    generator = torch.Generator().manual_seed(0)
    lengths = tuple(torch.randint(1, 9, (60,), generator=generator).tolist())
    rows = epoch_rows(60, 3, 0, lengths, 10)
    order = torch.randperm(60, generator=torch.Generator().manual_seed(3)).tolist()
    assert [index for row in rows for index in row] == order  # every record once, in the epoch's order
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    # Next fit: a row closes only when its next record would not fit.
    assert all(sum(lengths[i] for i in row) + lengths[after[0]] > 10 for row, after in zip(rows, rows[1:]))
    assert len(rows) < 60 and epoch_rows(60, 3, 1, lengths, 10) != rows
    assert epoch_rows(60, 3, 0, None) == tuple((index,) for index in order)


@pytest.mark.parametrize("packing", [True, False])
def test_step_tokens_count_the_real_tokens_of_the_steps_batches(packing):
    generator = torch.Generator().manual_seed(2)
    lengths = torch.randint(2, 9, (50,), generator=generator).tolist()
    dataset = sized_dataset(lengths)
    mbs, accum, dp, seed, seq_len = 2, 2, 2, 4, 16
    for step in (0, 3):  # step 3 is in the second epoch
        batches = global_batch(dataset, step, mbs, accum, dp, seed, seq_len, pad_id=-1, packing=packing)
        real = sum(int((ids != -1).sum()) for ids, _, _ in batches)
        assert step_tokens(tuple(lengths), step, mbs, accum, dp, seed, seq_len, packing) == real
    rows, fill = row_fill(tuple(lengths), seed, seq_len, packing)
    assert rows == len(epoch_rows(50, seed, 0, tuple(lengths) if packing else None, seq_len))
    assert fill == pytest.approx(sum(lengths) / (rows * seq_len))
    assert (rows < 50) == packing


def test_packed_batches_resume_identically_and_cover_each_epoch():
    generator = torch.Generator().manual_seed(1)
    dataset = sized_dataset(torch.randint(2, 7, (70,), generator=generator).tolist())
    mbs, accum, dp, seed, seq_len = 2, 2, 2, 5, 12
    uninterrupted = batch_iterator(dataset, mbs, accum, 1, dp, seed, seq_len, pad_id=0, packing=True)
    batches = [next(uninterrupted) for _ in range(12 * accum)]
    resumed = batch_iterator(dataset, mbs, accum, 1, dp, seed, seq_len, pad_id=0, start_step=7, packing=True)
    for expected in batches[7 * accum:]:
        assert all(torch.equal(a, b) for a, b in zip(next(resumed), expected))
    input_ids, targets, positions = batches[0]
    assert (positions[:, 1:] == 0).any()  # some row holds several records
    # Each record i sits whole in one row, with positions 0..n-1 and its own targets.
    for row_ids, row_targets, row_positions in zip(input_ids, targets, positions):
        starts = (row_positions == 0).nonzero().flatten().tolist()
        for start, end in zip(starts, starts[1:] + [None]):
            record = dataset[int(row_ids[start])]
            n = len(record["input_ids"])
            assert row_ids[start:start + n].tolist() == record["input_ids"]
            assert row_targets[start:start + n].tolist() == record["targets"]
            assert row_positions[start:start + n].tolist() == list(range(n))
    with pytest.raises(DataError, match="70 training examples packed into .* rows of 12 tokens cannot fill"):
        global_batch_rows(70, 0, 8, 8, 2, seed, [len(e["input_ids"]) for e in dataset], seq_len)


def test_bundled_data_end_to_end(tokenizer):
    train, val = build_datasets(ALPACA, tokenizer, max_length=256, val_size=100, seed=0)
    assert len(val) == 100 and 4800 < len(train) <= 4900
    # Every target is either ignored or the next input token, on every example.
    for example in train.select(range(0, len(train), 7)):
        ids, targets = example["input_ids"], example["targets"]
        assert len(ids) == len(targets) <= 256 and ids[0] == tokenizer.bos_token_id
        assert all(t in (IGNORE_INDEX, ids[i + 1]) for i, t in enumerate(targets[:-1]))
        assert targets[-1] == IGNORE_INDEX and any(t != IGNORE_INDEX for t in targets)
    input_ids, targets, positions = next(batch_iterator(train, 4, 2, 0, 2, 0, 256, tokenizer.pad_token_id))
    assert input_ids.shape == targets.shape == (4, 256) and torch.equal(positions, torch.arange(256).expand(4, 256))


def test_load_instructions(tmp_path, caplog):
    """One loader for every instruction file: PandaLM's blank-instruction record 161 is kept (its
    task is in its input; the paper's T is 170); a record with nothing to answer is skipped, named."""
    records = load_instructions(REPO / "data" / "pandalm_testset_inference_v1.json")
    assert len(records) == 170 and records[161]["instruction"].strip() == "" and records[161]["input"].strip()
    assert sum(bool(r["input"]) for r in records) == 140
    file = tmp_path / "instructions.json"
    file.write_text(json.dumps([{"instruction": "Add 2 and 3."}, {"instruction": " ", "input": ""},
                                {"instruction": " ", "input": "2 + 3"}]))
    with caplog.at_level("WARNING"):
        assert load_instructions(file) == [{"instruction": "Add 2 and 3.", "input": ""},
                                           {"instruction": " ", "input": "2 + 3"}]
    assert "skipping 1 record(s) with a blank instruction and input: [1]" in caplog.text


@pytest.mark.parametrize("content,message", [
    ([{"instruction": "ok"}, {"input": "no instruction"}], "record 1 has no 'instruction' string"),
    ([{"instruction": "ok", "input": 3}], "record 0: 'input' must be a string"),
    ([{"instruction": " "}, {"instruction": ""}], "every record's instruction and input are blank"),
    ([], "expected a non-empty JSON list"),
    ("{not json", "not valid JSON"),
])
def test_bad_instruction_files_name_the_problem(tmp_path, content, message):
    file = tmp_path / "bad.json"
    file.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(DataError, match=message):
        load_instructions(file)
    with pytest.raises(DataError, match="no such file"):
        load_instructions(tmp_path / "missing.json")


def test_tokenized_data_is_kept_and_read_back_under_its_key(tmp_path, monkeypatch):
    """The second build of the same file, tokenizer, length and template reads what the first
    stored (no record is tokenized again) and gives the same splits; anything that changes the
    ids is another key; a damaged entry is tokenized again; SOFT_DS_CACHE=off stores nothing."""
    from soft_ds.data import splits
    from soft_ds.data.records import BUNDLED_RECORDS
    monkeypatch.setenv("SOFT_DS_CACHE", str(tmp_path / "cache"))
    tokenizer = load_tokenizer(TOKENIZER_DIR)  # its own: the test adds a token to it
    data = write_records(tmp_path / "data.json", load_records(BUNDLED_RECORDS)[:60])
    first = [split.to_list() for split in build_datasets(data, tokenizer, 64, 10, 0)]
    key = splits.cache_key(data, tokenizer, 64, "alpaca")
    entry = tmp_path / "cache" / "tokenized" / key
    assert [p.name for p in entry.parent.iterdir()] == [key]

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again")
    monkeypatch.setattr(splits, "tokenize_record", no_tokenizing)
    assert [split.to_list() for split in build_datasets(data, tokenizer, 64, 10, 0)] == first

    other = write_records(tmp_path / "other.json", load_records(BUNDLED_RECORDS)[1:61])
    assert len({key, splits.cache_key(data, tokenizer, 65, "alpaca"), splits.cache_key(data, tokenizer, 64, "chat"),
                splits.cache_key(other, tokenizer, 64, "alpaca")}) == 4
    monkeypatch.setattr(splits, "tokenize_record", tokenize_record)
    for name in os.listdir(entry):
        (entry / name).write_bytes(b"damaged")
    assert [split.to_list() for split in build_datasets(data, tokenizer, 64, 10, 0)] == first
    tokenizer.add_tokens(["<new>"])
    assert splits.cache_key(data, tokenizer, 64, "alpaca") != key
    monkeypatch.setenv("SOFT_DS_CACHE", "off")
    build_datasets(data, tokenizer, 96, 10, 0)
    assert [p.name for p in entry.parent.iterdir()] == [key]
