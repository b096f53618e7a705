"""Rows as tensors: fixed-shape (input_ids, targets, positions) micro-batches, and each rank's
endless stream of them.

Batches are right-padded to one fixed length because DeepSpeed's pipeline engine reuses its
inter-stage receive buffers, which fixes the activation shape after the first micro-batch.
Packed rows (`packing.epoch_rows`) hold several records, with positions that restart at each
record (`collate_rows`), so far fewer rows carry the same records.
"""

from itertools import count

import torch

from soft_ds.data.packing import global_batch_rows, record_lengths
from soft_ds.data.targets import IGNORE_INDEX


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


def batch_iterator(
    dataset, micro_batch_size, grad_accum, dp_rank, dp_size, seed, seq_len, pad_id, start_step=0, packing=False
):
    """Endless (input_ids, targets, positions) micro-batches of rank dp_rank, grad_accum per
    optimizer step; packing: several records per row (`packing.epoch_rows`, `collate_rows`).

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
