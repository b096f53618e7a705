"""Alpaca instruction data through `datasets`: prompt template, loss targets, fixed-shape batches.

The pipeline, from file to micro-batch:

    load_records(path)                    validated Alpaca records, a `datasets.Dataset`
    tokenize_record(record, tokenizer)    prompt + response + end of turn, and shifted targets
    build_datasets(...)                   the two above plus a seeded train/validation split
    epoch_rows(...)                       an epoch's rows: one record each, or several packed
    global_batch_rows(step, ...)          which rows every rank reads at an optimizer step
    batch_iterator(...)                   this rank's micro-batches, step after step, resumable

Targets are already shifted for next-token prediction: `targets[t]` is the id the model must
predict at position t, so the loss is a plain cross-entropy of logits[:, t] against targets[:, t]
with IGNORE_INDEX skipped. Only response tokens and the closing eos are predicted; the prompt is
context.

Two prompt templates (TEMPLATES): "alpaca", Stanford Alpaca's text template, and "chat", the
tokenizer's own chat template with the instruction (+ input) as the user turn and the response as
the assistant turn. Special tokens are the tokenizer's: a prompt starts with whatever the
tokenizer itself puts before a text (LLaMA's <s>; nothing for SmolLM2's byte-level BPE).

Batches are right-padded to one fixed length because DeepSpeed's pipeline engine reuses its
inter-stage receive buffers, which fixes the activation shape after the first micro-batch.
Packing (`soft.packing`) puts several records in a row, with positions that restart at each
record (`collate_rows`), so far fewer rows carry the same records.
"""

import functools
import json
import logging
import shutil
import tempfile
from itertools import count
from pathlib import Path

import datasets
import torch
from transformers import AutoTokenizer, LlamaTokenizer

from soft_ds.config import TEMPLATE_KEY, TEMPLATES

logger = logging.getLogger(__name__)

# Target value that cross-entropy skips (PyTorch's default ignore_index).
IGNORE_INDEX = -100
# What the project ships in data/: the Alpaca sample and the tokenizer trained on it (data/README.md).
BUNDLED = Path(__file__).resolve().parents[1] / "data"
BUNDLED_RECORDS = str(BUNDLED / "alpaca_5000.json")
BUNDLED_TOKENIZER = str(BUNDLED / "tokenizer")
BUNDLED_INSTRUCTIONS = str(BUNDLED / "pandalm_testset_inference_v1.json")  # PandaLM's held-out instructions

# The Stanford Alpaca templates, with one difference: they end in "### Response:\n" where Stanford's
# train.py stops at "### Response:". The newline is encoded as a byte token that no merge crosses,
# so the prompt's tokens are exactly a prefix of the prompt+response tokens (tokenize_record
# relies on it) and a generation prompt tokenizes as it did in training.
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

RECORD_FIELDS = ("instruction", "input", "output")


class DataError(ValueError):
    """A data file or tokenizer that cannot be used; the message names the file and the problem."""


# --------------------------------------------------------------------------------------------
# Tokenizer


def load_tokenizer(path):
    """Load a tokenizer from a Hugging Face tokenizer directory or a SentencePiece .model file.

    The result always has bos and eos ids. Without a pad token, pad is set to eos: padding sits
    to the right of every real token and carries IGNORE_INDEX targets (see collate), so its id
    never reaches the loss or the attention of a real token.
    """
    path = Path(path)
    if not path.exists():
        # Checked here because from_pretrained would take a missing path for a Hub model id.
        raise DataError(f"tokenizer {path}: no such file or directory")
    try:
        if path.is_file():
            tokenizer = _load_sentencepiece(path)
        elif (path / "tokenizer.model").is_file() and not (
            (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file()
        ):
            # A directory holding only tokenizer.model: without a config, AutoTokenizer picks a
            # generic conversion that drops SentencePiece's dummy-prefix "▁".
            tokenizer = _load_sentencepiece(path / "tokenizer.model")
        else:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as error:  # any failure means the same thing to the user: unusable file
        raise DataError(f"tokenizer {path}: cannot be loaded ({type(error).__name__}: {error})") from error
    if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        raise DataError(
            f"tokenizer {path}: needs both a bos and an eos token "
            f"(bos_token_id={tokenizer.bos_token_id}, eos_token_id={tokenizer.eos_token_id})"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_sentencepiece(model_path):
    """A LLaMA SentencePiece model file as a Hugging Face LlamaTokenizer."""
    # transformers loads vocabularies from directories only, and in 5.x
    # LlamaTokenizer(vocab_file=...) silently builds a 3-token tokenizer; so load from a scratch
    # directory. add_bos_token matches LLaMA's published tokenizers, which prepend <s>.
    with tempfile.TemporaryDirectory() as scratch:
        shutil.copyfile(model_path, Path(scratch) / "tokenizer.model")
        return LlamaTokenizer.from_pretrained(scratch, add_bos_token=True)


# --------------------------------------------------------------------------------------------
# Records


def load_records(path):
    """Read and validate an Alpaca file: `.json` (a list of objects) or `.jsonl` (one per line).

    Returns a `datasets.Dataset` with string columns instruction, input, output (a missing or
    null input becomes ""); other fields are dropped. Records with an empty output are kept and
    reported by their 0-based index; a file of only such records is refused. Writes nothing to
    disk. Raises DataError naming the file, and for a bad record its 0-based index and the field.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path}: no such file")
    if path.suffix not in (".json", ".jsonl"):
        suffix = path.suffix or "no extension"
        raise DataError(f"data file {path}: expected a .json or .jsonl file, not {suffix!r}")
    text = read_text(path)
    if path.suffix == ".json":
        raw_records = _parse_json_list(path, text)
        lines = [None] * len(raw_records)
    else:
        raw_records, lines = parse_json_lines(path, text)
    if not raw_records:
        raise DataError(f"data file {path}: holds no records")

    records = [
        _validate_record(path, index, line, raw)
        for index, (line, raw) in enumerate(zip(lines, raw_records))
    ]
    # An empty output only teaches the model to stop at once: almost always a data mistake.
    empty = [index for index, record in enumerate(records) if not record["output"].strip()]
    if len(empty) == len(records):
        raise DataError(f"data file {path}: every record's output is empty; there is no response to learn")
    if empty:
        shown = ", ".join(map(str, empty[:10])) + (f" and {len(empty) - 10} more" if len(empty) > 10 else "")
        logger.warning("%s: %d of %d records have an empty output (records %s): they teach only the eos",
                       path, len(empty), len(records), shown)
    return datasets.Dataset.from_list(records)


def _parse_json_list(path, text):
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as error:
        hint = " (one object per line? name the file .jsonl)" if error.msg == "Extra data" else ""
        raise DataError(
            f"data file {path}: malformed JSON at line {error.lineno}, column {error.colno}: "
            f"{error.msg}{hint}"
        ) from error
    if not isinstance(parsed, list):
        raise DataError(f"data file {path}: expected a JSON list of records, found a {type(parsed).__name__}")
    return parsed


def read_text(path: Path, label: str = "data file") -> str:
    """A data file's UTF-8 text; DataError "<label> <path>: ..." when it is not UTF-8 or empty."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{label} {path}: not UTF-8 text ({error})") from error
    if not text.strip():
        raise DataError(f"{label} {path}: file is empty")
    return text


def parse_json_lines(path, text, label: str = "data file"):
    """(records, their 1-based line numbers) of JSON-lines text; blank lines are skipped."""
    records, line_numbers = [], []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise DataError(
                f"{label} {path}: malformed JSON at line {line_number}, column {error.colno}: {error.msg}"
            ) from error
        line_numbers.append(line_number)
    return records, line_numbers


def _validate_record(path, index, line_number, raw):
    where = f"data file {path}: record {index}" + (f" (line {line_number})" if line_number else "")
    if not isinstance(raw, dict):
        raise DataError(f"{where} is a {type(raw).__name__}, expected an object with instruction and output")
    record = {}
    for field in RECORD_FIELDS:
        if field == "input":
            value = raw.get("input") or ""  # optional: many Alpaca records have none
        elif field in raw:
            value = raw[field]
        else:
            raise DataError(f"{where} has no {field!r} field")
        if not isinstance(value, str):
            raise DataError(f"{where}: field {field!r} must be a string, not {type(value).__name__}")
        record[field] = value
    return record


def load_instructions(path) -> list[dict]:
    """Instructions to answer (generation, the judge, a reproduction's side-by-side answers): a JSON
    list of {"instruction", optional "input"} records, as {"instruction", "input"} dicts.

    A record whose instruction is blank but whose input is not is kept: its task is in its input
    (PandaLM's record 161, which the paper's judge counts). A record with neither has nothing to
    answer: it is skipped with a warning naming it, and a file of only such records is refused.
    Raises DataError naming the file and the record."""
    path = Path(path)
    label = "instructions file"
    if not path.is_file():
        raise DataError(f"{label} {path}: no such file")
    try:
        records = json.loads(read_text(path, label))
    except json.JSONDecodeError as error:
        raise DataError(f"{label} {path}: not valid JSON ({error})") from error
    if not isinstance(records, list) or not records:
        raise DataError(f"{label} {path}: expected a non-empty JSON list of records")
    out, blank = [], []
    for index, record in enumerate(records):
        if not isinstance(record, dict) or not isinstance(record.get("instruction"), str):
            raise DataError(f"{label} {path}: record {index} has no 'instruction' string")
        if not isinstance(record.get("input") or "", str):
            raise DataError(f"{label} {path}: record {index}: 'input' must be a string")
        instruction, input_ = record["instruction"], record.get("input") or ""
        if not instruction.strip() and not input_.strip():
            blank.append(index)
            continue
        out.append({"instruction": instruction, "input": input_})
    if not out:
        raise DataError(f"{label} {path}: every record's instruction and input are blank")
    if blank:
        logger.warning("%s: skipping %d record(s) with a blank instruction and input: %s", path, len(blank), blank)
    return out


# --------------------------------------------------------------------------------------------
# Templates, tokens and targets


def check_template(template, tokenizer=None):
    """The template's name if it is one of TEMPLATES and the tokenizer (when given) can render it;
    else DataError."""
    if template not in TEMPLATES:
        raise DataError(f"template {template!r}: choose one of {', '.join(TEMPLATES)}")
    if template == "chat" and tokenizer is not None and not getattr(tokenizer, "chat_template", None):
        raise DataError(f"template 'chat' needs a tokenizer with a chat template, and "
                        f"{tokenizer.name_or_path or 'this tokenizer'} has none; use --template alpaca")
    return template


def checkpoint_template(path, override=None):
    """The template to prompt an exported model with: `override` if given, else the one its
    config.json records (TEMPLATE_KEY), else "alpaca" (a model soft-ds did not train)."""
    if override is not None:
        return check_template(override)
    config_file = Path(path) / "config.json"
    recorded = json.loads(config_file.read_text()).get(TEMPLATE_KEY) if config_file.is_file() else None
    return check_template(recorded or "alpaca")


def format_prompt(record):
    """The Alpaca prompt for a record: everything the model reads before its response."""
    if record.get("input"):
        return PROMPT_WITH_INPUT.format(instruction=record["instruction"], input=record["input"])
    return PROMPT_NO_INPUT.format(instruction=record["instruction"])


def _chat(record, tokenizer, response=None):
    """The record as chat-template text: the user turn, then the assistant's response, or (None)
    the header that opens the assistant's turn."""
    user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    messages = [{"role": "user", "content": user}]
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=response is None)


def leading_special_ids(tokenizer):
    """The ids the tokenizer itself puts before a text ([bos] for LLaMA's tokenizers, [] for
    SmolLM2's): what `tokenizer(text)` adds in front of `tokenizer(text, add_special_tokens=False)`."""
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start]
    return []


def encode_text(text, tokenizer):
    """A raw prompt text as the tokenizer encodes a text, its own leading special tokens included."""
    return leading_special_ids(tokenizer) + tokenizer.encode(text, add_special_tokens=False)


def encode_prompt(record, tokenizer, template="alpaca"):
    """The prompt's tokens: the exact context a trained model answers, for generation too.

    alpaca: the tokenizer's leading special tokens + the Alpaca prompt. chat: the chat template's
    text up to the opening of the assistant's turn (the template writes its own special tokens).
    """
    if check_template(template, tokenizer) == "chat":
        return tokenizer.encode(_chat(record, tokenizer), add_special_tokens=False)
    return encode_text(format_prompt(record), tokenizer)


def _encode_sequence(record, tokenizer, template):
    """Prompt + response + the end of the response: the eos appended (alpaca), or the chat
    template's assistant turn up to and including its first eos (SmolLM2's <|im_end|>; the eos
    appended if the turn has none), so text a template puts after the turn's end is not learnt."""
    eos = tokenizer.eos_token_id
    if template == "alpaca":
        return encode_text(format_prompt(record) + record["output"], tokenizer) + [eos]
    sequence = tokenizer.encode(_chat(record, tokenizer, record["output"]), add_special_tokens=False)
    start = len(encode_prompt(record, tokenizer, template))
    if eos in sequence[start:]:
        return sequence[:sequence.index(eos, start) + 1]
    return sequence + [eos]


def tokenize_record(record, tokenizer, max_length, template="alpaca"):
    """Tokenize one record into input_ids and next-token targets, at most max_length tokens.

    input_ids = prompt + response + end (`encode_prompt`; for alpaca [bos] + prompt + response +
    [eos] with LLaMA's tokenizers). targets[t] = input_ids[t + 1] where token t+1 is a response
    token or the closing eos, else IGNORE_INDEX; the last position has no next token. The targets
    are built here, before padding, so an eos that is also the pad id (SmolLM2) is still learnt.
    A sequence longer than max_length loses its end: the eos first (a cut response must not teach
    the model to stop there), then the response, then the prompt, leaving no target at all.

    Also returns untruncated_length, so callers can count truncated records.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 (a prompt token and one more), got {max_length}")
    prompt_ids = encode_prompt(record, tokenizer, template)
    sequence = _encode_sequence(record, tokenizer, template)
    if sequence[: len(prompt_ids)] != prompt_ids:
        # Otherwise a token straddles prompt and response and no mask is right.
        raise DataError(
            "the tokenizer merges the end of the prompt with the response, so the response start is "
            f"ambiguous (instruction starts {record['instruction'][:60]!r})"
        )
    first_target = len(prompt_ids)  # index of the first response token, or of the eos
    input_ids = sequence[:max_length]
    targets = [
        input_ids[position + 1] if position + 1 >= first_target else IGNORE_INDEX
        for position in range(len(input_ids) - 1)
    ] + [IGNORE_INDEX]
    return {"input_ids": input_ids, "targets": targets, "untruncated_length": len(sequence)}


def tokenized_stats(dataset):
    """Counts a log line needs: records, truncated ones, ones with no target, target tokens."""
    lengths = dataset["untruncated_length"]
    stored = [len(ids) for ids in dataset["input_ids"]]
    counted = [sum(target != IGNORE_INDEX for target in targets) for targets in dataset["targets"]]
    return {
        "records": len(dataset),
        "truncated": sum(full > kept for full, kept in zip(lengths, stored)),
        "without_targets": sum(n == 0 for n in counted),
        "target_tokens": sum(counted),
        "longest_untruncated": max(lengths, default=0),
    }


def response_token_counts(data_path, tokenizer, vocab_size, template="alpaca"):
    """(vocab_size,) how often each id is a target in the file's records: the response tokens and
    the closing eos (`tokenize_record`, untruncated). Ids the tokenizer makes beyond vocab_size
    (none for a matching model) are refused."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for record in load_records(data_path):
        targets = torch.tensor(tokenize_record(record, tokenizer, max_length=1 << 30, template=template)["targets"])
        targets = targets[targets != IGNORE_INDEX]
        if targets.numel() and int(targets.max()) >= vocab_size:
            raise DataError(f"data file {data_path}: the tokenizer makes id {int(targets.max())}, outside the "
                            f"model's vocabulary of {vocab_size} (do the tokenizer and the model match?)")
        counts += torch.bincount(targets, minlength=vocab_size)
    return counts


def frequent_tokens(counts, size):
    """The `size` ids of highest count, most frequent first (equal counts: lower id first)."""
    return torch.sort(counts, descending=True, stable=True).indices[:size]


def build_datasets(data_path, tokenizer, max_length, val_size, seed, template="alpaca"):
    """Load, split and tokenize an Alpaca file into (train, validation) `datasets.Dataset`s, each
    record in `template` (see tokenize_record).

    The validation set is val_size records drawn with torch.Generator().manual_seed(seed); both
    splits keep file order. Records whose prompt fills max_length have nothing to learn from and
    are dropped (a micro-batch made only of them would divide the loss by zero); truncated and
    dropped records are counted in the log. Rows keep the raw fields next to input_ids, targets
    and untruncated_length. Nothing is written to disk.
    """
    check_template(template, tokenizer)
    records = load_records(data_path)
    if not 0 <= val_size < len(records):
        raise DataError(
            f"data file {data_path}: val_size={val_size} must be at least 0 and below the "
            f"{len(records)} records it holds"
        )
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    val_indices, train_indices = sorted(order[:val_size]), sorted(order[val_size:])

    # keep_in_memory and a fixed fingerprint: no cache files anywhere, and no attempt to hash
    # the tokenizer captured by the function.
    tokenized = records.map(
        tokenize_record,
        fn_kwargs={"tokenizer": tokenizer, "max_length": max_length, "template": template},
        keep_in_memory=True,
        load_from_cache_file=False,
        new_fingerprint=f"tokenized-{template}-{max_length}",
        desc="tokenizing",
    )
    splits = []
    for name, indices in (("train", train_indices), ("validation", val_indices)):
        split = tokenized.select(indices, keep_in_memory=True)
        stats = tokenized_stats(split)
        logger.info("%s split of %s: %s (max_length=%d)", name, data_path, stats, max_length)
        if stats["truncated"]:
            logger.warning(
                "%s: %d of %d %s records are longer than max_length=%d and were truncated",
                data_path, stats["truncated"], stats["records"], name, max_length,
            )
        if stats["without_targets"]:
            logger.warning(
                "%s: dropping %d %s records whose prompt alone fills max_length=%d",
                data_path, stats["without_targets"], name, max_length,
            )
            split = split.filter(
                lambda targets: any(target != IGNORE_INDEX for target in targets),
                input_columns="targets",
                keep_in_memory=True,
                load_from_cache_file=False,
            )
        splits.append(split)
    train, validation = splits
    if len(train) == 0:
        raise DataError(
            f"data file {data_path}: no training record has a response within max_length={max_length}"
        )
    return train, validation


# --------------------------------------------------------------------------------------------
# Batches


def collate(examples, seq_len, pad_id):
    """Right-pad examples to exactly seq_len: (input_ids, targets), LongTensors of shape (B, seq_len).

    Padding gets pad_id as input and IGNORE_INDEX as target. Under causal attention a real token
    attends only to earlier positions, all real, so right padding changes no real logit and no
    loss term: no attention mask is needed.
    """
    input_ids, targets, _ = collate_rows([[example] for example in examples], seq_len, pad_id)
    return input_ids, targets


def collate_rows(rows, seq_len, pad_id):
    """Rows of examples, each row's records back to back, right-padded to seq_len:
    (input_ids, targets, positions), LongTensors of shape (B, seq_len).

    positions restart at 0 where each record starts, and the padding continues the last record's
    (one record per row: 0..seq_len-1), so `model.record_mask` confines attention to each record
    and every record sees exactly the context and positions it has alone in a row. A record's
    last target is IGNORE_INDEX (tokenize_record), so no record learns its neighbour's first token.
    """
    input_ids = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)  # (B, T)
    targets = torch.full((len(rows), seq_len), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    positions = torch.arange(seq_len).repeat(len(rows), 1)  # (B, T)
    for row, examples in enumerate(rows):
        start = 0
        for example in examples:
            ids, example_targets = example["input_ids"], example["targets"]
            if len(ids) != len(example_targets):
                raise ValueError(f"example {row}: {len(ids)} input_ids but {len(example_targets)} targets")
            if start + len(ids) > seq_len:
                raise ValueError(
                    f"example {row} has {start + len(ids)} tokens, more than seq_len={seq_len}; "
                    "tokenize with max_length <= seq_len"
                )
            input_ids[row, start : start + len(ids)] = torch.tensor(ids, dtype=torch.long)
            targets[row, start : start + len(ids)] = torch.tensor(example_targets, dtype=torch.long)
            positions[row, start:] = torch.arange(seq_len - start)  # the padding continues it
            start += len(ids)
    return input_ids, targets, positions


@functools.lru_cache(maxsize=2)
def _epoch_order(num_examples, seed, epoch):
    # Cached: every step of an epoch reads the same permutation.
    generator = torch.Generator().manual_seed(seed + epoch)
    return tuple(torch.randperm(num_examples, generator=generator).tolist())


@functools.lru_cache(maxsize=4)
def epoch_rows(num_examples, seed, epoch, lengths=None, seq_len=0):
    """The rows of an epoch, each a tuple of dataset indices, in the epoch's order (a permutation
    drawn with seed + epoch). Unpacked (lengths None): one record per row. Packed: that order cut
    greedily into rows of at most seq_len tokens (next fit: a record that does not fit starts the
    next row), so the rows depend only on (seed, epoch) and any step can be rebuilt on resume."""
    order = _epoch_order(num_examples, seed, epoch)
    if lengths is None:
        return tuple((index,) for index in order)
    rows, row, used = [], [], 0
    for index in order:
        if row and used + lengths[index] > seq_len:
            rows.append(tuple(row))
            row, used = [], 0
        row.append(index)
        used += lengths[index]
    return tuple(rows + [tuple(row)] if row else rows)


def global_batch_rows(num_examples, step, micro_batch_size, grad_accum, dp_size, seed, lengths=None, seq_len=0):
    """Rows of every micro-batch of optimizer step `step`, rank-major; a row is a tuple of dataset
    indices (`epoch_rows`: packed when `lengths`, the records' token counts, are given).

    Entry r * grad_accum + m is micro-batch m of data-parallel rank r. A step takes the next
    micro_batch_size * grad_accum * dp_size rows of its epoch; an epoch ends when less than a full
    global batch is left (the rest is skipped). Packed epochs may differ in length, so a step is
    found by walking the epochs before it (cheap: token counts only), and a resumed run gets the
    very rows an uninterrupted one does.
    """
    sizes = {"micro_batch_size": micro_batch_size, "grad_accum": grad_accum, "dp_size": dp_size}
    for name, value in sizes.items():
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if step < 0:
        raise ValueError(f"step must be at least 0, got {step}")
    lengths = None if lengths is None else tuple(lengths)
    global_size = micro_batch_size * grad_accum * dp_size
    epoch, step_in_epoch = 0, step
    while True:
        rows = epoch_rows(num_examples, seed, epoch, lengths, seq_len)
        steps_per_epoch = len(rows) // global_size
        if steps_per_epoch == 0:
            what = f"{num_examples} training examples" if lengths is None else \
                f"{num_examples} training examples packed into {len(rows)} rows of {seq_len} tokens"
            raise DataError(
                f"{what} cannot fill one global batch of {global_size} "
                f"(micro_batch_size={micro_batch_size} x grad_accum={grad_accum} x dp_size={dp_size})"
            )
        if step_in_epoch < steps_per_epoch:
            break
        epoch, step_in_epoch = epoch + 1, step_in_epoch - steps_per_epoch
    start = step_in_epoch * global_size
    return [
        list(rows[start + slot * micro_batch_size : start + (slot + 1) * micro_batch_size])
        for slot in range(grad_accum * dp_size)
    ]


def token_counts(dataset) -> tuple[int, ...]:
    """Each record's token count (truncated as tokenized)."""
    return tuple(len(ids) for ids in dataset["input_ids"])


def record_lengths(dataset, packing):
    """The records' token counts when packing (what global_batch_rows packs by), else None."""
    return token_counts(dataset) if packing else None


def step_tokens(lengths, step, micro_batch_size, grad_accum, dp_size, seed, seq_len, packing=False) -> int:
    """Real (non-pad) tokens in optimizer step `step`'s global batch, the records' token counts given:
    what a step's throughput counts."""
    slots = global_batch_rows(len(lengths), step, micro_batch_size, grad_accum, dp_size, seed,
                              lengths if packing else None, seq_len)
    return sum(lengths[index] for rows in slots for row in rows for index in row)


def row_fill(lengths, seed, seq_len, packing=False) -> tuple[int, float]:
    """(rows, share of their positions holding real tokens) of epoch 0, the records' token counts
    given: how much of a step is padding."""
    rows = epoch_rows(len(lengths), seed, 0, lengths if packing else None, seq_len)
    return len(rows), sum(lengths) / max(1, len(rows) * seq_len)


def global_batch(dataset, step, micro_batch_size, grad_accum, dp_size, seed, seq_len, pad_id, packing=False):
    """All micro-batches of step `step` across ranks, rank-major, as (input_ids, targets, positions).

    What the data-parallel ranks together consume at that step: the reference for a
    single-process computation of the same loss.
    """
    slots = global_batch_rows(len(dataset), step, micro_batch_size, grad_accum, dp_size, seed,
                              record_lengths(dataset, packing), seq_len)
    return [_micro_batch(dataset, rows, seq_len, pad_id) for rows in slots]


def batch_iterator(
    dataset, micro_batch_size, grad_accum, dp_rank, dp_size, seed, seq_len, pad_id, start_step=0, packing=False
):
    """Endless (input_ids, targets, positions) micro-batches of rank dp_rank, grad_accum per
    optimizer step; packing: several records per row (`epoch_rows`, `collate_rows`).

    Starting at start_step yields exactly what an uninterrupted run yields from that step on.
    """
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} is outside 0..{dp_size - 1}")
    lengths = record_lengths(dataset, packing)
    for step in count(start_step):
        slots = global_batch_rows(len(dataset), step, micro_batch_size, grad_accum, dp_size, seed, lengths, seq_len)
        for micro_step in range(grad_accum):
            yield _micro_batch(dataset, slots[dp_rank * grad_accum + micro_step], seq_len, pad_id)


def _micro_batch(dataset, rows, seq_len, pad_id):
    return collate_rows([[dataset[index] for index in row] for row in rows], seq_len, pad_id)
