"""What every decoding strategy shares: the model run step by step over a KV cache
(`CachedModel`), how a token is picked (`Sampling`, `distribution`, `pick`, `confidence`), and the
per-sequence bookkeeping of a batch being generated (`Outputs`, `Generation`).

Exit n of a SoFT model is `layers[:n] -> model.norm -> lm_head`: `CachedModel.head(hidden, n)` is
the one shared head of the one `soft_ds.model.Llama`, so no strategy ever copies a weight.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from soft_ds.inference.cache import KVCache, left_pad
from soft_ds.model import Llama

CONFIDENCE_MEASURES = ("max_prob", "margin")
# Weight/activation dtypes the commands offer, by name.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def checkpoint_tokenizer(path: str | os.PathLike):
    """The tokenizer saved in a checkpoint directory, or None when it holds none."""
    path = Path(path)
    if any((path / name).is_file() for name in TOKENIZER_FILES):
        from soft_ds.data.tokenizer import load_tokenizer
        return load_tokenizer(path)
    return None


# --------------------------------------------------------------------------------------------
# Checks of the numbers a caller passes. `name` is what the message calls the value: the
# parameter's name for the library, the option's (e.g. "--draft-tokens") for a command.


def check_positive_integer(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_temperature(temperature: float, name: str = "temperature") -> float:
    if not temperature >= 0:
        raise ValueError(f"{name} must be >= 0 (0 = greedy), got {temperature}")
    return temperature


def check_top_p(top_p: float, name: str = "top_p") -> float:
    if not 0 < top_p <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {top_p}")
    return top_p


# --------------------------------------------------------------------------------------------
# Picking tokens


@dataclass(frozen=True)
class Sampling:
    """How a token is picked: greedy when temperature is 0, else sampled from the
    temperature-scaled distribution restricted to its top-p nucleus."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        check_temperature(self.temperature)
        check_top_p(self.top_p)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self, device: torch.device) -> torch.Generator | None:
        """The seeded random stream of one generate call (None when greedy: nothing is drawn)."""
        if self.greedy:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)


GREEDY = Sampling()


def distribution(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """(..., V) logits -> (..., V) probabilities after temperature and top-p (sampling only)."""
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep a token while the mass before it is below top_p: the smallest set reaching top_p.
        keep = sorted_probs.cumsum(-1) - sorted_probs < sampling.top_p
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def pick(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids."""
    if sampling.greedy:
        return logits.argmax(-1)
    return torch.multinomial(distribution(logits, sampling), 1, generator=generator)[:, 0]


def check_confidence_measure(measure: str) -> str:
    if measure not in CONFIDENCE_MEASURES:
        raise ValueError(f"confidence measure {measure!r}: choose one of {CONFIDENCE_MEASURES}")
    return measure


def confidence(logits: torch.Tensor, measure: str) -> torch.Tensor:
    """(B, V) logits -> (B,) confidence: the top probability ("max_prob") or the gap between the
    top two probabilities ("margin"), of the plain softmax (no temperature)."""
    probs = torch.softmax(logits.float(), dim=-1)
    if check_confidence_measure(measure) == "max_prob":
        return probs.max(-1).values
    top2 = probs.topk(2, dim=-1).values
    return top2[:, 0] - top2[:, 1]


# --------------------------------------------------------------------------------------------
# Bookkeeping of a batch being generated


@dataclass
class Generation:
    """What a generate call produced, per prompt, and how."""

    tokens: list[list[int]]  # new tokens of each prompt, ending with the eos if one was produced
    steps: int = 0  # decoding iterations after the prompt (one per token, or per draft-verify round)
    drafted: int = 0  # speculative: draft tokens proposed for sequences still generating
    accepted: int = 0  # speculative: of those, accepted by the verifier
    draft_lengths: list[int] = field(default_factory=list)  # speculative: each round's k (tokens drafted)
    exit_layers: list[list[int]] = field(default_factory=list)  # dynamic: the exit of every token

    @property
    def num_tokens(self) -> int:
        return sum(len(sequence) for sequence in self.tokens)


class Outputs:
    """New tokens per sequence; a sequence stops at its eos or after max_new_tokens."""

    def __init__(self, batch: int, max_new_tokens: int, eos_token_id: int | None):
        self.tokens: list[list[int]] = [[] for _ in range(batch)]
        self.exit_layers: list[list[int]] = [[] for _ in range(batch)]
        self.done = [False] * batch
        self.max_new_tokens = max_new_tokens
        self.eos_token_id = eos_token_id

    def add(self, row: int, tokens: list[int], exit_layer: int | None = None) -> None:
        for token in tokens:
            if self.done[row]:
                return
            self.tokens[row].append(token)
            if exit_layer is not None:
                self.exit_layers[row].append(exit_layer)
            if token == self.eos_token_id or len(self.tokens[row]) >= self.max_new_tokens:
                self.done[row] = True

    def add_each(self, tokens: torch.Tensor) -> None:
        """One new token (B,) for every sequence still generating."""
        for row, value in enumerate(tokens.tolist()):
            self.add(row, [value])

    def active(self, device) -> torch.Tensor:
        return torch.tensor([not done for done in self.done], dtype=torch.bool, device=device)

    @property
    def all_done(self) -> bool:
        return all(self.done)

    def remaining(self) -> int:
        """Most tokens any unfinished sequence may still produce."""
        return max((self.max_new_tokens - len(tokens) for tokens, done in zip(self.tokens, self.done)
                    if not done), default=0)


# --------------------------------------------------------------------------------------------
# The model, step by step


class CachedModel:
    """A `soft_ds.model.Llama` run layer range by layer range over a `KVCache`: the steps every
    strategy is made of. model: its shared head (`model.head`) serves every exit."""

    def __init__(self, model: Llama):
        self.model = model.eval()
        self.config = model.config
        self.num_layers = model.config.num_hidden_layers
        self.head = model.head  # head(hidden, exit_layer): the shared norm + lm_head (ICT: per exit)
        self.layers = model.model.layers
        self._rotary = model.model.layers[0].rotary  # every layer holds the same frequencies

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    def check_prompts(self, prompts: list[list[int]], max_new_tokens: int) -> None:
        """Token ids inside the vocabulary and a positive max_new_tokens (ValueError naming them)."""
        check_positive_integer(max_new_tokens, "max_new_tokens")
        vocab = self.config.vocab_size
        for index, prompt in enumerate(prompts):
            bad = [token for token in prompt if not 0 <= token < vocab]
            if bad:
                raise ValueError(f"prompt {index} has token ids {bad[:5]} outside the vocabulary 0..{vocab - 1} "
                                 "(do the tokenizer and the model match?)")

    def rope(self, positions: torch.Tensor):
        """(B, T) positions -> cos, sin (B, 1, T, head_dim), shared by every layer of a step."""
        cos, sin = self._rotary(positions, self.model.lm_head.weight.dtype)
        return cos[:, None], sin[:, None]

    def run(self, cache: KVCache, x: torch.Tensor, first: int, last: int, rope) -> torch.Tensor:
        """Layers first..last-1 (0-based) on hidden x (B, T, H), appending to the cache."""
        cos, sin = rope
        for index in range(first, last):
            x = self.layers[index].forward_cached(x, cos, sin, cache, index)
        return x

    def start(self, prompts: list[list[int]], extra_columns: int):
        """A cache holding the left-padded prompts' columns; return it, the prompts' embeddings
        (B, T, H) and each sequence's next position (B,)."""
        ids, valid, positions = left_pad(prompts)
        ids, valid, positions = ids.to(self.device), valid.to(self.device), positions.to(self.device)
        cache = KVCache(self.config, len(prompts), ids.shape[1] + extra_columns,
                        self.model.lm_head.weight.dtype, self.device)
        cache.reserve(positions, valid)
        return cache, self.model.model.embed_tokens(ids), valid.sum(1)

    def prefill(self, prompts: list[list[int]], depth: int, extra_columns: int):
        """Run the left-padded prompts through layers[:depth]; return the cache, each sequence's
        next position (B,) and the last position's hidden state after layer `depth` (B, H)."""
        cache, x, positions = self.start(prompts, extra_columns)
        x = self.run(cache, x, 0, depth, self.rope(cache.positions[:, :cache.columns]))
        return cache, positions, x[:, -1]

    def embed_new(self, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor):
        """Reserve a column for each sequence's new token (B,) at positions (B,); return its
        embedding (B, 1, H) and rotary tables."""
        cache.reserve(positions[:, None], torch.ones_like(positions[:, None], dtype=torch.bool))
        return self.model.model.embed_tokens(tokens[:, None]), self.rope(positions[:, None])
