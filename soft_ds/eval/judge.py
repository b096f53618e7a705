"""Pairwise comparison of two systems' responses by a judge model, with PandaLM's protocol.

The paper (Sorted LLaMA, section 2) scores system A against system B on PandaLM's 170 test
instructions: the judge sees both responses in both orders (A as "Response 1", then B as
"Response 1"), and each order gives wins W, losses L and ties of A; Score = (W - L) / T with T the
number of instructions, in [-1, 1], averaged over the two orders.

The prompt and the answer parsing are PandaLM's own (WeOpenML/PandaLM,
pandalm/utils/pandalm_inference.py: `build_pandalm_prompt`, `parse_pandalm_response`, and the
special-token filter applied to each response). One deliberate difference: PandaLM maps a judge
output it cannot parse to a tie; here it is counted as "unparsed" and reported. It still adds
nothing to W - L and still counts in T, so the score is the number PandaLM would give. Not
copied: PandaLM's script re-registers "</s>" as the bos/eos/unk token and pads with id 0 before
tokenizing (a workaround for early LLaMA tokenizer files); `HFJudge` uses the judge directory's
tokenizer as saved, so check its bos token when the judge is PandaLM-7B-v1.

    judge = HFJudge("models/PandaLM-7B-v1")           # any local Hugging Face causal LM
    result = compare(records, responses_a, responses_b, judge)
    result["score"], result["a_first"]["wins"], result["unparsed"]

The scoring (`parse_verdict`, `outcome_for_a`, `count_outcomes`, `score_orders`) is pure and needs
no model; `compare` takes any judge function `prompts -> texts`. `judge_grid` (`soft-ds eval
judge`) has each exit of A and of B answer once, then compares every exit of A with every exit of B.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from tqdm import tqdm

from soft_ds.data.templates import encode_prompt
from soft_ds.eval.inputs import Checkpoint
from soft_ds.eval.metrics import responses_by_exit


# Special tokens PandaLM removes from responses before building its prompt (pandalm_inference.py).
SPECIAL_TOKENS = re.compile(
    r"<unk>|<pad>|<s>|</s>|\[PAD\]|<\|endoftext\|>|\[UNK\]|\[CLS\]|\[MASK\]|<\|startofpiece\|>"
    r"|<\|endofpiece\|>|\[gMASK\]|\[sMASK\]"
)
HEADER_WITH_INPUT = ("Below are two responses for a given task. The task is defined by the Instruction with an "
                     "Input that provides further context. Evaluate the responses and generate a reference "
                     "answer for the task.")
HEADER_NO_INPUT = ("Below are two responses for a given task. The task is defined by the Instruction. Evaluate "
                   "the responses and generate a reference answer for the task.")

TIE = 0  # parse_verdict's value for "Tie"; 1 and 2 name the better response
OUTCOMES = ("wins", "losses", "ties", "unparsed")


class JudgeError(ValueError):
    """A judge model that cannot be loaded or run."""


def clean_response(text: str) -> str:
    return SPECIAL_TOKENS.sub("", text.strip()).strip()


def build_prompt(instruction: str, input: str, response1: str, response2: str) -> str:
    """PandaLM's judge prompt for one instruction (and optional input) and two responses."""
    responses = (f"### Response 1:\n{clean_response(response1)}\n\n"
                 f"### Response 2:\n{clean_response(response2)}")
    if input:
        return (f"{HEADER_WITH_INPUT}\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"
                f"{responses}\n\n### Evaluation:\n")
    return f"{HEADER_NO_INPUT}\n\n### Instruction:\n{instruction}\n\n{responses}\n\n### Evaluation:\n"


def parse_verdict(text: str) -> int | None:
    """The judge's verdict from its output: 1 or 2 (that response is better), TIE, or None.

    PandaLM answers "1", "2" or "Tie" on the first line, then its reason and a reference answer.
    As PandaLM parses it: the first line of the stripped text, "tie" in any case."""
    first_line = clean_response(text).split("\n")[0].strip()
    if first_line in ("1", "2"):
        return int(first_line)
    if first_line.lower() == "tie":
        return TIE
    return None


def outcome_for_a(verdict: int | None, a_first: bool) -> str:
    """A verdict in the order the judge saw the responses, as the outcome for system A."""
    if verdict is None:
        return "unparsed"
    if verdict == TIE:
        return "ties"
    a_position = 1 if a_first else 2
    return "wins" if verdict == a_position else "losses"


def count_outcomes(outcomes: list[str]) -> dict:
    """{"wins", "losses", "ties", "unparsed", "total", "score"} for one order; score = (W - L) / total."""
    counts = {name: outcomes.count(name) for name in OUTCOMES}
    unknown = set(outcomes) - set(OUTCOMES)
    if unknown:
        raise ValueError(f"unknown outcome(s) {sorted(unknown)}; expected {OUTCOMES}")
    total = len(outcomes)
    counts["total"] = total
    counts["score"] = (counts["wins"] - counts["losses"]) / total if total else float("nan")
    return counts


def score_orders(a_first_texts: list[str], b_first_texts: list[str]) -> dict:
    """Score system A from the judge's outputs in both orders (item i of each list: instruction i).

    a_first_texts: outputs for prompts with A as Response 1; b_first_texts: with B as Response 1.
    Returns {"a_first": counts, "b_first": counts, "score": mean of the two orders' scores,
    "unparsed": unparsed outputs in both orders, "outcomes": {"a_first": [...], "b_first": [...]}}.
    """
    if len(a_first_texts) != len(b_first_texts):
        raise ValueError(f"{len(a_first_texts)} judgements with A first but {len(b_first_texts)} with B first")
    outcomes = {
        "a_first": [outcome_for_a(parse_verdict(text), a_first=True) for text in a_first_texts],
        "b_first": [outcome_for_a(parse_verdict(text), a_first=False) for text in b_first_texts],
    }
    counts = {order: count_outcomes(values) for order, values in outcomes.items()}
    return {**counts, "score": (counts["a_first"]["score"] + counts["b_first"]["score"]) / 2,
            "unparsed": counts["a_first"]["unparsed"] + counts["b_first"]["unparsed"], "outcomes": outcomes}


def compare(records: list[dict], responses_a: list[str], responses_b: list[str], judge) -> dict:
    """Ask `judge` (prompts -> output texts) about every record in both orders; score A against B.

    Returns score_orders(...) plus the judge's raw outputs under "judgements"."""
    if not len(records) == len(responses_a) == len(responses_b):
        raise ValueError(f"{len(records)} records, {len(responses_a)} responses of A, {len(responses_b)} of B")
    prompts = [build_prompt(r["instruction"], r.get("input") or "", a, b)
               for r, a, b in zip(records, responses_a, responses_b)]
    prompts += [build_prompt(r["instruction"], r.get("input") or "", b, a)
                for r, a, b in zip(records, responses_a, responses_b)]
    texts = list(judge(prompts))
    if len(texts) != len(prompts):
        raise JudgeError(f"the judge returned {len(texts)} outputs for {len(prompts)} prompts")
    a_first, b_first = texts[:len(records)], texts[len(records):]
    return {**score_orders(a_first, b_first), "judgements": {"a_first": a_first, "b_first": b_first}}


class HFJudge:
    """A local Hugging Face causal LM as judge: prompts -> generated texts (new tokens only).

    Greedy by default. PandaLM's own script decodes with num_beams=4, repetition_penalty=1.2 and up
    to 512 new tokens (its reason and reference answer); only the first line, the verdict, is
    scored, so a few tokens suffice for greedy decoding.

    The constructor reads the config and tokenizer only (a bad directory fails at once, before any
    response is generated); the weights are loaded by the first call.
    """

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, max_new_tokens: int = 16, num_beams: int = 1,
                 repetition_penalty: float = 1.0, batch_size: int = 4):
        import transformers

        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise JudgeError(f"judge {self.path}: not a Hugging Face model directory (no config.json)")
        try:
            transformers.AutoConfig.from_pretrained(self.path, local_files_only=True)
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        except Exception as error:  # any failure means the same to the user: this judge is unusable
            raise JudgeError(f"judge {self.path}: cannot be loaded ({type(error).__name__}: {error})") from error
        self.tokenizer.padding_side = "left"  # batched generation continues every prompt at its end
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.unk_token or self.tokenizer.eos_token
        self.generation = dict(do_sample=False, num_beams=num_beams, repetition_penalty=repetition_penalty,
                               max_new_tokens=max_new_tokens, pad_token_id=self.tokenizer.pad_token_id)
        self.batch_size, self.device, self.dtype = batch_size, device, dtype
        self.model = None

    def load(self):
        import transformers

        if self.model is None:
            try:
                self.model = transformers.AutoModelForCausalLM.from_pretrained(
                    self.path, dtype=self.dtype, local_files_only=True).to(self.device).eval()
            except Exception as error:
                raise JudgeError(f"judge {self.path}: cannot be loaded ({type(error).__name__}: {error})") from error
        return self.model

    @torch.inference_mode()
    def __call__(self, prompts: list[str], desc: str = "judging") -> list[str]:
        model = self.load()
        texts = []
        for first in tqdm(range(0, len(prompts), self.batch_size), desc=desc, unit="batch"):
            batch = self.tokenizer(prompts[first:first + self.batch_size], return_tensors="pt", padding=True)
            batch = batch.to(self.device)
            output = model.generate(**batch, **self.generation)
            texts += self.tokenizer.batch_decode(output[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        return texts


def judge_grid(a: Checkpoint, b: Checkpoint, records: list[dict], judge, max_new_tokens: int, batch_size: int,
               dtype: torch.dtype, device: str | torch.device) -> dict:
    """Every exit of A against every exit of B on the instructions `records`, by `judge`
    (prompts, desc -> texts, e.g. an HFJudge). Each exit answers once (greedy, up to
    max_new_tokens) for the whole grid.

    Returns {"responses": {"a": {exit: texts}, "b": {exit: texts}}, "cells": [{"a_exit", "b_exit",
    "score", "a_first", "b_first", "unparsed"}, ...] (A's exits outer, B's inner),
    "judgements": [{"a_exit", "b_exit", "a_first", "b_first": raw judge texts, "outcomes_for_a"}, ...]}.
    """
    responses = {}
    for role, system in (("a", a), ("b", b)):
        prompts = [encode_prompt(record, system.tokenizer, system.template) for record in records]
        texts = responses_by_exit(system, prompts, max_new_tokens, batch_size, dtype, device)
        responses[role] = {n: [text.strip() for text in exit_texts] for n, exit_texts in texts.items()}
    cells, judgements = [], []
    for a_exit in a.exits:
        for b_exit in b.exits:
            label = f"{a.name}@{a_exit} vs {b.name}@{b_exit}"
            result = compare(records, responses["a"][a_exit], responses["b"][b_exit],
                             lambda prompts: judge(prompts, desc=f"judging {label}"))
            cells.append({"a_exit": a_exit, "b_exit": b_exit, "score": result["score"],
                          "a_first": result["a_first"], "b_first": result["b_first"], "unparsed": result["unparsed"]})
            judgements.append({"a_exit": a_exit, "b_exit": b_exit, **result["judgements"],
                               "outcomes_for_a": result["outcomes"]})
    return {"responses": responses, "cells": cells, "judgements": judgements}
