"""What a model learns from a record: its tokens and next-token targets, and how often each
token is a target (the draft vocabulary of speculative decoding).

Targets are already shifted for next-token prediction: `targets[t]` is the id the model must
predict at position t, so the loss is a plain cross-entropy of logits[:, t] against targets[:, t]
with IGNORE_INDEX skipped. Only response tokens and the closing eos are predicted; the prompt is
context.
"""

import torch

from soft_ds.data.records import DataError, load_records
from soft_ds.data.templates import encode_prompt, encode_sequence

# Target value that cross-entropy skips (PyTorch's default ignore_index).
IGNORE_INDEX = -100


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
    sequence = encode_sequence(record, tokenizer, template)
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
