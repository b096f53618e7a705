"""Prompt templates (settings.TEMPLATES): the text and tokens a model reads before its response.

"alpaca" is Stanford Alpaca's text template; "chat" is the tokenizer's own chat template with the
instruction (+ input) as the user turn and the response as the assistant turn. Special tokens are
the tokenizer's: a prompt starts with whatever the tokenizer itself puts before a text (LLaMA's
<s>; nothing for SmolLM2's byte-level BPE). Training (`targets.tokenize_record`), generation and
evaluation all encode prompts here, so a generation prompt is exactly a training prompt.
"""

import json
from pathlib import Path

from soft_ds.data.records import DataError
from soft_ds.settings import TEMPLATES, export_key

# The key of an exported config.json that records the template its model was trained with
# (`soft-ds export` writes it; generation and evaluation default to it: checkpoint_template).
TEMPLATE_KEY = export_key("template")

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


def encode_sequence(record, tokenizer, template):
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
