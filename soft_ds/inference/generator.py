"""`SoftGenerator`: one SoFT model, its tokenizer and exits, and the three strategies as methods."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from soft_ds import hf_io
from soft_ds.exits import check_exit_layers, default_exit_layers
from soft_ds.inference.core import GREEDY, CachedModel, Generation, Sampling, checkpoint_tokenizer
from soft_ds.inference.dynamic import generate_dynamic
from soft_ds.inference.exit import generate_at_exit
from soft_ds.inference.speculative import generate_speculative
from soft_ds.model import Llama


class SoftGenerator(CachedModel):
    """Generation at any exit of one SoFT model, with a KV cache, batched.

    model: a `soft_ds.model.Llama`; every exit uses its shared head (`model.head`).
    tokenizer: optional, for callers that work with text (`encode`, `decode`).
    exits: the exits dynamic exit may stop at (default: the training default for this depth,
        `exits.default_exit_layers`); the last layer is always the final fallback.
    """

    def __init__(self, model: Llama, tokenizer=None, exits=None):
        super().__init__(model)
        self.tokenizer = tokenizer
        self.exits = check_exit_layers(exits if exits is not None else default_exit_layers(self.num_layers),
                                       self.num_layers)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", exits=None) -> "SoftGenerator":
        """Load an exported SoFT checkpoint (a Hugging Face LLaMA directory, see `soft-ds export`)
        through hf_io into `soft_ds.model.Llama`; its tokenizer too when the directory holds one.
        Raises hf_io.CheckpointError for a missing or malformed directory."""
        path = Path(path)
        return cls(hf_io.load_model(path, dtype=dtype, device=device), checkpoint_tokenizer(path), exits)

    def generate(self, prompts: list[list[int]], exit_layer: int | None = None, max_new_tokens: int = 64,
                 sampling: Sampling = GREEDY, eos_token_id: int | None = None) -> Generation:
        """Exit n's generation (default: all layers); see `exit.generate_at_exit`."""
        return generate_at_exit(self, prompts, exit_layer, max_new_tokens, sampling, eos_token_id)

    def generate_speculative(self, prompts: list[list[int]], draft_exit: int, draft_tokens: int = 4,
                             max_new_tokens: int = 64, sampling: Sampling = GREEDY,
                             eos_token_id: int | None = None, draft_vocabulary=None,
                             draft_stop: float | None = None, adaptive: bool = False) -> Generation:
        """Self-speculative decoding drafting with exit `draft_exit` (optionally over a reduced
        vocabulary, with a confidence stop or an adaptive k); see `speculative.generate_speculative`."""
        return generate_speculative(self, prompts, draft_exit, draft_tokens, max_new_tokens, sampling, eos_token_id,
                                    draft_vocabulary, draft_stop, adaptive)

    def generate_dynamic(self, prompts: list[list[int]], threshold, measure: str = "max_prob",
                         exits=None, max_new_tokens: int = 64, sampling: Sampling = GREEDY,
                         eos_token_id: int | None = None) -> Generation:
        """Dynamic exit: one float threshold over `exits` (default: the generator's), or per-exit
        thresholds {exit layer: threshold}; see `dynamic.generate_dynamic`."""
        return generate_dynamic(self, prompts, threshold, measure, self.exits if exits is None else exits,
                                max_new_tokens, sampling, eos_token_id)
