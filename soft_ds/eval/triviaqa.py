"""TriviaQA closed-book: load the released formats, prompt, normalise answers, exact match and F1.

Formats read by `load_triviaqa`:
- the Hugging Face `datasets` layout (`trivia_qa`, e.g. config rc.nocontext): records with
  `question` and `answer: {value, aliases, normalized_aliases, ...}`, saved as .json (a list, or
  `Dataset.to_json`'s one object per line), .jsonl, .parquet, or a `save_to_disk` folder (a
  DatasetDict folder needs a split);
- the original release (triviaqa-rc qa/*.json): `{"Data": [{"Question", "QuestionId",
  "Answer": {"Value", "Aliases", "NormalizedAliases"}}, ...]}`.

Closed book: the model sees only the question. The paper under study gives no prompt for
TriviaQA (its text covers Alpaca and PandaLM only), so two zero-shot prompts are offered: "qa",
LLaMA's closed-book format without the few-shot examples ("Answer these questions:\\nQ: ...\\nA:"),
and "alpaca", the question as an instruction in the training template (what an Alpaca-tuned
model was taught to answer). The answer is the first line of the greedy continuation.

Scoring follows the official evaluation script (mandarjoshi90/triviaqa,
evaluation/triviaqa_evaluation.py): answers are normalised (lower case, underscores and
punctuation to spaces, articles a/an/the dropped, whitespace collapsed); exact match and token F1
(SQuAD's) take the best over the gold answers: the value, its aliases and normalised aliases.

`triviaqa_by_exit` (`soft-ds eval triviaqa`) has every exit of several checkpoints answer and scores it.
"""

from __future__ import annotations

import json
import os
import re
import string
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from soft_ds.data.records import DataError, parse_json_lines, read_text
from soft_ds.data.templates import encode_prompt, encode_text
from soft_ds.eval.inputs import Checkpoint
from soft_ds.eval.metrics import responses_by_exit

PROMPT_STYLES = ("qa", "alpaca")
QA_PROMPT = "Answer these questions:\nQ: {question}\nA:"
_PUNCTUATION = set(string.punctuation + "\u2018\u2019\u00b4`")


@dataclass(frozen=True)
class Question:
    id: str
    question: str
    answers: tuple[str, ...]  # gold answers: value, aliases, normalised aliases (raw text)


# --------------------------------------------------------------------------------------------
# Normalisation and scores


def normalize_answer(text: str) -> str:
    """TriviaQA's official answer normalisation."""
    text = text.replace("_", " ").lower()
    text = "".join(" " if char in _PUNCTUATION else char for char in text)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers) -> float:
    prediction = normalize_answer(prediction)
    return float(any(prediction == normalize_answer(answer) for answer in answers))


def _f1(prediction_tokens: list[str], answer_tokens: list[str]) -> float:
    common = Counter(prediction_tokens) & Counter(answer_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(prediction_tokens), overlap / len(answer_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, answers) -> float:
    prediction_tokens = normalize_answer(prediction).split()
    return max((_f1(prediction_tokens, normalize_answer(answer).split()) for answer in answers), default=0.0)


def score_predictions(questions: list[Question], predictions: list[str]) -> dict:
    """{"em", "f1" (means over questions, in [0, 1]), "n", "per_question": [{"em", "f1"}]}."""
    if len(questions) != len(predictions):
        raise ValueError(f"{len(questions)} questions but {len(predictions)} predictions")
    per_question = [{"em": exact_match(p, q.answers), "f1": f1_score(p, q.answers)}
                    for q, p in zip(questions, predictions)]
    n = len(per_question)
    return {"em": sum(s["em"] for s in per_question) / n, "f1": sum(s["f1"] for s in per_question) / n,
            "n": n, "per_question": per_question}


# --------------------------------------------------------------------------------------------
# Prompts and answers


def prompt_ids(question: str, tokenizer, style: str = "qa") -> list[int]:
    """The closed-book prompt for one question, in the given style, after the tokenizer's own bos."""
    if style == "qa":
        return encode_text(QA_PROMPT.format(question=question), tokenizer)
    if style == "alpaca":
        return encode_prompt({"instruction": question, "input": ""}, tokenizer)
    raise ValueError(f"prompt style {style!r}: choose one of {PROMPT_STYLES}")


def extract_answer(text: str) -> str:
    """The answer in a continuation: its first non-empty line."""
    for line in text.strip().split("\n"):
        if line.strip():
            return line.strip()
    return ""


# --------------------------------------------------------------------------------------------
# Every exit of several checkpoints


def triviaqa_by_exit(checkpoints: list[Checkpoint], questions: list[Question], prompt_style: str,
                     max_new_tokens: int, batch_size: int, dtype: torch.dtype,
                     device: str | torch.device) -> tuple[dict[str, dict], dict[str, dict]]:
    """Every exit of every checkpoint answers the questions closed-book (greedy, up to
    max_new_tokens; the answer is the first line) and is scored.

    Returns ({name: {"path", "exits": {"n": {"em", "f1", "n"}}}},
             {name: {"n": [{"id", "prediction", "em", "f1"} per question]}})."""
    results, predictions = {}, {}
    for checkpoint in checkpoints:
        prompts = [prompt_ids(q.question, checkpoint.tokenizer, prompt_style) for q in questions]
        texts = responses_by_exit(checkpoint, prompts, max_new_tokens, batch_size, dtype, device)
        results[checkpoint.name] = {"path": str(checkpoint.path), "exits": {}}
        predictions[checkpoint.name] = {}
        for n, exit_texts in texts.items():
            answers = [extract_answer(text) for text in exit_texts]
            scores = score_predictions(questions, answers)
            results[checkpoint.name]["exits"][str(n)] = {"em": scores["em"], "f1": scores["f1"], "n": scores["n"]}
            predictions[checkpoint.name][str(n)] = [{"id": q.id, "prediction": answer, **score} for q, answer, score
                                                    in zip(questions, answers, scores["per_question"])]
    return results, predictions


# --------------------------------------------------------------------------------------------
# Loading


def load_triviaqa(path: str | os.PathLike, split: str | None = None) -> list[Question]:
    """Questions and gold answers from any released TriviaQA format (see the module docstring).
    Raises DataError naming the file and, for a bad record, its index."""
    path = Path(path)
    if path.is_dir():
        rows = _rows_from_disk(path, split)
    elif not path.is_file():
        raise DataError(f"TriviaQA {path}: no such file or directory")
    elif path.suffix == ".parquet":
        import datasets
        try:
            rows = list(datasets.Dataset.from_parquet(str(path), keep_in_memory=True))
        except Exception as error:
            raise DataError(f"TriviaQA {path}: cannot read parquet ({type(error).__name__}: {error})") from error
    elif path.suffix in (".json", ".jsonl"):
        rows = _rows_from_json(path)
    else:
        raise DataError(f"TriviaQA {path}: expected .json, .jsonl, .parquet or a `save_to_disk` folder, "
                        f"not {path.suffix or 'a file without extension'!r}")
    if not rows:
        raise DataError(f"TriviaQA {path}: holds no questions")
    return [_question(path, index, row) for index, row in enumerate(rows)]


def _rows_from_disk(path: Path, split: str | None) -> list[dict]:
    import datasets
    try:
        loaded = datasets.load_from_disk(str(path), keep_in_memory=True)
    except Exception as error:
        raise DataError(f"TriviaQA {path}: not a `datasets` save_to_disk folder "
                        f"({type(error).__name__}: {error})") from error
    if isinstance(loaded, datasets.DatasetDict):
        if split is None:
            if len(loaded) != 1:
                raise DataError(f"TriviaQA {path}: holds splits {sorted(loaded)}; choose one with a split")
            split = next(iter(loaded))
        if split not in loaded:
            raise DataError(f"TriviaQA {path}: no split {split!r} (splits: {sorted(loaded)})")
        loaded = loaded[split]
    return list(loaded)


def _rows_from_json(path: Path) -> list[dict]:
    text = read_text(path, "TriviaQA")
    if path.suffix == ".jsonl":
        return parse_json_lines(path, text, "TriviaQA")[0]
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":  # `Dataset.to_json` writes one object per line even into a .json file
            return parse_json_lines(path, text, "TriviaQA")[0]
        raise DataError(f"TriviaQA {path}: malformed JSON at line {error.lineno}: {error.msg}") from error
    if isinstance(parsed, dict) and isinstance(parsed.get("Data"), list):
        return parsed["Data"]  # the original release
    if isinstance(parsed, list):
        return parsed
    raise DataError(f"TriviaQA {path}: expected a list of records or an object with a 'Data' list "
                    "(the original release)")


def _question(path: Path, index: int, row) -> Question:
    where = f"TriviaQA {path}: record {index}"
    if not isinstance(row, dict):
        raise DataError(f"{where} is a {type(row).__name__}, not an object")
    if "Question" in row:  # original release
        question, answer, keys = row.get("Question"), row.get("Answer"), ("Value", "Aliases", "NormalizedAliases")
        identifier = row.get("QuestionId", index)
    elif "question" in row:  # datasets layout
        question, answer, keys = row.get("question"), row.get("answer"), ("value", "aliases", "normalized_aliases")
        identifier = row.get("question_id", index)
    else:
        raise DataError(f"{where} has neither 'question' (datasets layout) nor 'Question' (original release)")
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: the question must be a non-empty string")
    if not isinstance(answer, dict):
        raise DataError(f"{where}: the answer must be an object with {keys[0]!r} and {keys[1]!r}")
    value, aliases, normalized = (answer.get(key) for key in keys)
    answers = ([value] if isinstance(value, str) else []) + list(aliases or []) + list(normalized or [])
    answers = tuple(dict.fromkeys(a for a in answers if isinstance(a, str) and a.strip()))
    if not answers:
        raise DataError(f"{where}: no gold answer (answer {keys[0]!r}, {keys[1]!r} and {keys[2]!r} are empty)")
    return Question(str(identifier), question.strip(), answers)
