"""Which records train together: an epoch's rows and the rows of every optimizer step.

A row is a tuple of dataset indices: one record (unpacked) or several whose token counts fit in
seq_len (packed, `soft.packing`). Rows depend only on (seed, epoch) and the records' token
counts, so any step's rows can be rebuilt on resume without reading a token.
"""

import functools

import torch

from soft_ds.data.records import DataError


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
