"""Alpaca records and instruction lists, read from disk and validated; DataError.

    load_records(path)          an Alpaca file (.json list or .jsonl) as validated records
    load_instructions(path)     instructions to answer: generation, the judge, side-by-side answers

Records are plain dicts of strings (instruction, input, output); `splits.build_datasets` turns
them into a `datasets.Dataset` for training. This module imports nothing heavy.
"""

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

# What the project ships in data/: the Alpaca sample and the tokenizer trained on it (data/README.md).
BUNDLED = Path(__file__).resolve().parents[2] / "data"
BUNDLED_RECORDS = str(BUNDLED / "alpaca_5000.json")
BUNDLED_INSTRUCTIONS = str(BUNDLED / "pandalm_testset_inference_v1.json")  # PandaLM's held-out instructions

RECORD_FIELDS = ("instruction", "input", "output")


class DataError(ValueError):
    """A data file, tokenizer or template that cannot be used (raised by every `soft_ds.data` module);
    the message names the file and the problem."""


def load_records(path) -> list[dict]:
    """Read and validate an Alpaca file: `.json` (a list of objects) or `.jsonl` (one per line).

    Returns the records in file order as dicts of strings instruction, input, output (a missing or
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
    return records


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
