"""The KV cache of a batch being generated, and the left padding that lines prompts up in it.

Prompts of different lengths are left-padded so that every sequence's next token goes to the same
column. The cache keeps a valid flag and a rotary position per sequence and column, so a padded
sequence attends to exactly its own tokens at exactly the positions it would have alone: batched
output equals unbatched output. (Up to rounding: kernels of other shapes sum in other orders, which
in float32 or bf16 can flip a near-tie between two tokens; the tests compare in float64.)
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig

from soft_ds.model import head_dim


class KVCache:
    """Keys and values of every decoder layer for a batch of sequences being generated.

    Columns are shared by the batch: column c of every layer belongs to the same step for all
    sequences. Per sequence, `valid[b, c]` says whether column c holds one of its real tokens
    (False for left padding and for drafted tokens rejected in the middle of a batch) and
    `positions[b, c]` is that token's rotary position. A query attends to the valid columns at or
    before its own, and always to itself (so a pad row never has an empty softmax).

    Layers fill their columns independently: `lengths[i]` columns of layer i hold keys/values. A
    self-speculative draft runs the first layers ahead of the rest; a token that exits early leaves
    the deeper layers behind until they are filled. `columns` is the number of columns reserved.
    Storage grows by doubling when needed.
    """

    def __init__(self, config: LlamaConfig, batch: int, capacity: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        self.num_layers = config.num_hidden_layers
        self._shape = (batch, config.num_key_value_heads or config.num_attention_heads, head_dim(config))
        self.dtype, self.device = dtype, torch.device(device)
        self.capacity = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.valid = torch.zeros(batch, 0, dtype=torch.bool, device=self.device)
        self.positions = torch.zeros(batch, 0, dtype=torch.long, device=self.device)
        self.lengths = [0] * self.num_layers
        self.columns = 0
        self._masks: dict[tuple[int, int], torch.Tensor | None] = {}
        self._grow(max(1, capacity))

    def _grow(self, capacity: int) -> None:
        B, kv, d = self._shape
        extra = capacity - self.capacity

        def widen(old: torch.Tensor | None) -> torch.Tensor:
            new = torch.zeros(B, kv, capacity, d, dtype=self.dtype, device=self.device)  # (B, kv, C, d)
            if old is not None:
                new[:, :, :self.capacity] = old
            return new

        self.keys = [widen(self.keys[i] if self.keys else None) for i in range(self.num_layers)]
        self.values = [widen(self.values[i] if self.values else None) for i in range(self.num_layers)]
        self.valid = torch.cat([self.valid, self.valid.new_zeros(B, extra)], dim=1)
        self.positions = torch.cat([self.positions, self.positions.new_zeros(B, extra)], dim=1)
        self.capacity = capacity

    def reserve(self, positions: torch.Tensor, valid: torch.Tensor) -> int:
        """Register T new columns, positions and valid (B, T); return the first column's index."""
        start, T = self.columns, positions.shape[1]
        if start + T > self.capacity:
            self._grow(max(2 * self.capacity, start + T))
        self.positions[:, start:start + T] = positions
        self.valid[:, start:start + T] = valid
        self.columns = start + T
        self._masks.clear()
        return start

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor):
        """Store (B, kv, T, d) keys/values at layer's next T columns; return all its keys and
        values so far (B, kv, S, d) and the attention mask of the T new rows (B, 1, T, S), or None
        when every row may see every column (one new token and no invalid column)."""
        start = self.lengths[layer]
        end = start + keys.shape[2]
        if end > self.columns:
            raise ValueError(f"layer {layer}: writing columns {start}..{end - 1} but only "
                             f"{self.columns} are reserved")
        self.keys[layer][:, :, start:end] = keys
        self.values[layer][:, :, start:end] = values
        self.lengths[layer] = end
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end], self.mask(start, end)

    def mask(self, start: int, end: int) -> torch.Tensor | None:
        """(B, 1, end - start, end) boolean mask of rows start..end-1 over columns 0..end-1."""
        key = (start, end)
        if key not in self._masks:
            valid = self.valid[:, :end]  # (B, S)
            if end - start == 1 and bool(valid.all()):
                self._masks[key] = None
            else:
                columns = torch.arange(end, device=self.device)
                rows = torch.arange(start, end, device=self.device)
                causal = columns[None, :] <= rows[:, None]  # (T, S)
                itself = columns[None, :] == rows[:, None]  # (T, S)
                self._masks[key] = ((valid[:, None, :] & causal) | itself)[:, None]  # (B, 1, T, S)
        return self._masks[key]

    def rollback(self, columns: int, invalid: torch.Tensor | None = None) -> None:
        """Forget every column from `columns` on, in all layers; `invalid` (B, columns) marks kept
        columns that some sequences must no longer see (their rejected drafts)."""
        self.columns = min(self.columns, columns)
        self.lengths = [min(length, self.columns) for length in self.lengths]
        if invalid is not None:
            self.valid[:, :self.columns] &= ~invalid[:, :self.columns]
        self._masks.clear()


def left_pad(prompts: list[list[int]], pad_id: int = 0):
    """(ids, valid, positions), each (B, T): prompts right-aligned so that every sequence's next
    token goes to the same column; positions count each sequence's own tokens from 0."""
    if not prompts:
        raise ValueError("no prompts given")
    for index, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {index} is empty: a prompt needs at least one token (e.g. bos)")
    width = max(len(prompt) for prompt in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    valid = torch.zeros(len(prompts), width, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.as_tensor(prompt, dtype=torch.long)
        valid[row, width - len(prompt):] = True
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    return ids, valid, positions
