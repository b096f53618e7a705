"""Values derived from a tensor, computed once per tensor: the packed-attention mask from a
micro-batch's positions (every decoder layer of a stage asks for it), the counted rows from its
targets (every exit of a stage asks for them).

The key is the tensor itself, by identity and in-place version, never its values: comparing values
(`torch.equal`) is a host sync on a GPU, per layer per micro-batch. A weak reference holds the key,
so a tensor freed and another allocated at the same address never match, and an in-place write
(which bumps `_version`) invalidates the entry. A miss (activation checkpointing's recomputation
may see the micro-batch again after others) only recomputes; it is never wrong.
"""

import weakref

import torch


class TensorMemo:
    """The last `size` (tensor, name) -> value results of `get`."""

    def __init__(self, size: int = 4):
        self.size = size
        self.entries: list[tuple[weakref.ref, int, str, object]] = []

    def get(self, tensor: torch.Tensor, name: str, compute):
        """compute(tensor), or the value already computed for this very tensor under `name`."""
        for ref, version, seen_name, value in self.entries:
            if ref() is tensor and version == tensor._version and seen_name == name:
                return value
        value = compute(tensor)
        self.entries.insert(0, (weakref.ref(tensor), tensor._version, name, value))
        del self.entries[self.size:]
        return value

    def clear(self):
        self.entries.clear()
