"""Generation from a SoFT model: any exit, self-speculative decoding, confidence-based dynamic exit.

Exit n of a SoFT model is `layers[:n] -> model.norm -> lm_head`; every mode below runs the one
`soft_ds.model.Llama` and its one shared head (`Llama.head`), so no weight is ever copied:

    generator = SoftGenerator.from_pretrained("runs/soft/hf-full")  # an export_hf.py directory
    generator.generate(prompts, exit_layer=12)                      # the 12-layer sub-model
    generator.generate_speculative(prompts, draft_exit=12, draft_tokens=4)
    generator.generate_dynamic(prompts, threshold=0.9)              # first confident exit per token

`prompts` are lists of token ids (e.g. `data.encode_prompt(record, tokenizer)`); the result is a
`Generation` holding each prompt's new tokens (ending with the eos when one is produced) and the
counters the benchmark reports.

Batches: prompts of different lengths are left-padded. The KV cache (`KVCache`) keeps a
valid flag and a rotary position per sequence and column, so a padded sequence attends to exactly
its own tokens at exactly the positions it would have alone: batched output equals unbatched
output. (Up to rounding: kernels of other shapes sum in other orders, which in float32 or bf16
can flip a near-tie between two tokens; the tests compare in float64.)

Self-speculative decoding (`generate_speculative`): exit n drafts k tokens one at a time, then the
full model verifies them in one forward. Draft and verifier share the first n layers' KV cache:
the verifier runs only layers n+1..L, on the layer-n hidden states the draft already computed (plus
one n-layer pass for the last draft token). Rejected tokens are rolled back by truncating the cache
to the longest accepted prefix in the batch and marking the columns a sequence rejected as
invalid for it. Greedy: the output is the full model's greedy output, token for token (up to
the same rounding caveat: the verifier scores k + 1 tokens per kernel call). Sampling:
standard speculative sampling (accept with probability min(1, p/q), else resample from
max(0, p - q)), so the output is distributed as the full model's samples.

Dynamic exit (`generate_dynamic`): see its docstring for how the deeper layers' keys/values of
early-exited tokens are filled (they are recomputed exactly, not approximated).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import LlamaConfig

from soft_ds import hf_io
from soft_ds.exits import check_exit_layer, check_exit_layers, default_exit_layers
from soft_ds.model import Llama, head_dim

CONFIDENCE_MEASURES = ("max_prob", "margin")
# Weight/activation dtypes the CLIs offer, by name.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def checkpoint_tokenizer(path: str | os.PathLike):
    """The tokenizer saved in a checkpoint directory, or None when it holds none."""
    path = Path(path)
    if any((path / name).is_file() for name in TOKENIZER_FILES):
        from soft_ds.data import load_tokenizer
        return load_tokenizer(path)
    return None


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


@dataclass(frozen=True)
class Sampling:
    """How a token is picked: greedy when temperature is 0, else sampled from the
    temperature-scaled distribution restricted to its top-p nucleus."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = Sampling()


@dataclass
class Generation:
    """What a generate call produced, per prompt, and how."""

    tokens: list[list[int]]  # new tokens of each prompt, ending with the eos if one was produced
    steps: int = 0  # decoding iterations after the prompt (one per token, or per draft-verify round)
    drafted: int = 0  # speculative: draft tokens proposed for sequences still generating
    accepted: int = 0  # speculative: of those, accepted by the verifier
    exit_layers: list[list[int]] = field(default_factory=list)  # dynamic: the exit of every token

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def mean_exit_layer(self) -> float:
        layers = [layer for sequence in self.exit_layers for layer in sequence]
        return sum(layers) / len(layers) if layers else float("nan")

    @property
    def num_tokens(self) -> int:
        return sum(len(sequence) for sequence in self.tokens)


# --------------------------------------------------------------------------------------------
# Picking tokens


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


def confidence(logits: torch.Tensor, measure: str) -> torch.Tensor:
    """(B, V) logits -> (B,) confidence: the top probability ("max_prob") or the gap between the
    top two probabilities ("margin"), of the plain softmax (no temperature)."""
    probs = torch.softmax(logits.float(), dim=-1)
    if measure == "max_prob":
        return probs.max(-1).values
    if measure == "margin":
        top2 = probs.topk(2, dim=-1).values
        return top2[:, 0] - top2[:, 1]
    raise ValueError(f"confidence measure {measure!r}: choose one of {CONFIDENCE_MEASURES}")


def speculative_accept(drafts: torch.Tensor, draft_probs: torch.Tensor, target_probs: torch.Tensor,
                       generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023) for a batch.

    drafts (B, k) drawn from draft_probs (B, k, V); target_probs (B, k + 1, V) is the verifier's
    distribution after the context and each draft. Draft i is accepted with probability
    min(1, p/q) while all before it were; the next token comes from max(0, p - q) renormalised at
    the first rejection, or from p after the last draft when all were accepted. Returns
    (accepted count (B,), next token (B,)); every emitted token is distributed exactly as p.
    """
    B, k = drafts.shape
    if k:
        p = target_probs[:, :k].gather(-1, drafts[..., None])[..., 0]  # (B, k)
        q = draft_probs.gather(-1, drafts[..., None])[..., 0]  # (B, k), > 0: drafts were drawn from q
        u = torch.rand(B, k, generator=generator, device=drafts.device)
        accepted = (u * q < p).long().cumprod(1).sum(1)  # (B,)
    else:
        accepted = torch.zeros(B, dtype=torch.long, device=drafts.device)
    rows = torch.arange(B, device=drafts.device)
    p_next = target_probs[rows, accepted]  # (B, V)
    q_next = torch.cat([draft_probs, torch.zeros_like(p_next[:, None])], dim=1)[rows, accepted]
    residual = (p_next - q_next).clamp(min=0)
    total = residual.sum(-1, keepdim=True)
    # p == q leaves no residual mass (a rejection is then impossible); fall back to p itself.
    residual = torch.where(total > 0, residual / total.clamp(min=1e-30), p_next)
    return accepted, torch.multinomial(residual, 1, generator=generator)[:, 0]


# --------------------------------------------------------------------------------------------
# Bookkeeping of a batch being generated


class _Outputs:
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

    def active(self, device) -> torch.Tensor:
        return torch.tensor([not done for done in self.done], dtype=torch.bool, device=device)

    @property
    def all_done(self) -> bool:
        return all(self.done)

    def remaining(self) -> int:
        """Most tokens any unfinished sequence may still produce."""
        return max((self.max_new_tokens - len(tokens) for tokens, done in zip(self.tokens, self.done)
                    if not done), default=0)


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


# --------------------------------------------------------------------------------------------
# The generator


class SoftGenerator:
    """Generation at any exit of one SoFT model, with a KV cache, batched.

    model: a `soft_ds.model.Llama`; every exit uses its shared head (`model.head`).
    tokenizer: optional, for callers that work with text (`encode`, `decode`).
    exits: the exits dynamic exit may stop at (default: the training default for this depth,
        `exits.default_exit_layers`); the last layer is always the final fallback.
    """

    def __init__(self, model: Llama, tokenizer=None, exits=None):
        self.model = model.eval()
        self.config = model.config
        self.num_layers = model.config.num_hidden_layers
        self.tokenizer = tokenizer
        self.exits = check_exit_layers(exits if exits is not None else default_exit_layers(self.num_layers),
                                       self.num_layers)
        self.head = model.head  # head(hidden, exit_layer): the shared norm + lm_head (ICT: per exit)
        self._layers = model.model.layers
        self._rotary = model.model.layers[0].rotary  # every layer holds the same frequencies

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", exits=None) -> "SoftGenerator":
        """Load an exported SoFT checkpoint (a Hugging Face LLaMA directory, see tools/export_hf.py)
        through hf_io into `soft_ds.model.Llama`; its tokenizer too when the directory holds one.
        Raises hf_io.CheckpointError for a missing or malformed directory."""
        path = Path(path)
        return cls(hf_io.load_model(path, dtype=dtype, device=device), checkpoint_tokenizer(path), exits)

    # --- checks ---------------------------------------------------------------------------

    def check_exit(self, exit_layer: int, name: str = "exit", deepest: int | None = None) -> int:
        return check_exit_layer(exit_layer, self.num_layers, name, deepest)

    # --- the pieces every mode uses ---------------------------------------------------------

    @property
    def _device(self) -> torch.device:
        return self.model.lm_head.weight.device

    def _rope(self, positions: torch.Tensor):
        """(B, T) positions -> cos, sin (B, 1, T, head_dim), shared by every layer of a step."""
        cos, sin = self._rotary(positions, self.model.lm_head.weight.dtype)
        return cos[:, None], sin[:, None]

    def _run(self, cache: KVCache, x: torch.Tensor, first: int, last: int, rope) -> torch.Tensor:
        """Layers first..last-1 (0-based) on hidden x (B, T, H), appending to the cache."""
        cos, sin = rope
        for index in range(first, last):
            x = self._layers[index].forward_cached(x, cos, sin, cache, index)
        return x

    def _start(self, prompts, extra_columns: int):
        """A cache holding the left-padded prompts' columns; return it, the prompts' embeddings
        (B, T, H) and each sequence's next position (B,)."""
        ids, valid, positions = left_pad(prompts)
        ids, valid, positions = ids.to(self._device), valid.to(self._device), positions.to(self._device)
        cache = KVCache(self.config, len(prompts), ids.shape[1] + extra_columns,
                        self.model.lm_head.weight.dtype, self._device)
        cache.reserve(positions, valid)
        return cache, self.model.model.embed_tokens(ids), valid.sum(1)

    def _prefill(self, prompts, depth: int, extra_columns: int):
        """Run the left-padded prompts through layers[:depth]; return the cache, each sequence's
        next position (B,) and the last position's hidden state after layer `depth` (B, H)."""
        cache, x, positions = self._start(prompts, extra_columns)
        x = self._run(cache, x, 0, depth, self._rope(cache.positions[:, :cache.columns]))
        return cache, positions, x[:, -1]

    def _embed_new(self, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor):
        """Reserve a column for each sequence's new token (B,) at positions (B,); return its
        embedding (B, 1, H) and rotary tables."""
        cache.reserve(positions[:, None], torch.ones_like(positions[:, None], dtype=torch.bool))
        return self.model.model.embed_tokens(tokens[:, None]), self._rope(positions[:, None])

    def _generator(self, sampling: Sampling) -> torch.Generator | None:
        if sampling.greedy:
            return None
        return torch.Generator(device=self._device).manual_seed(sampling.seed)

    def _check_run(self, prompts, max_new_tokens):
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        vocab = self.config.vocab_size
        for index, prompt in enumerate(prompts):
            bad = [token for token in prompt if not 0 <= token < vocab]
            if bad:
                raise ValueError(f"prompt {index} has token ids {bad[:5]} outside the vocabulary 0..{vocab - 1}")

    # --- 1. any exit -------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], exit_layer: int | None = None, max_new_tokens: int = 64,
                 sampling: Sampling = GREEDY, eos_token_id: int | None = None) -> Generation:
        """Generate with the exit-n sub-model (`layers[:n] -> norm -> lm_head`; n = all layers by
        default). Greedy output equals the exported n-layer model's `generate(do_sample=False)`."""
        n = self.check_exit(self.num_layers if exit_layer is None else exit_layer)
        self._check_run(prompts, max_new_tokens)
        generator = self._generator(sampling)
        cache, positions, hidden = self._prefill(prompts, n, max_new_tokens)
        out = _Outputs(len(prompts), max_new_tokens, eos_token_id)
        token = pick(self.head(hidden, n), sampling, generator)  # (B,)
        for row, value in enumerate(token.tolist()):
            out.add(row, [value])
        steps = 0
        while not out.all_done:
            x, rope = self._embed_new(cache, token, positions)
            x = self._run(cache, x, 0, n, rope)
            token = pick(self.head(x[:, -1], n), sampling, generator)
            positions = positions + 1
            for row, value in enumerate(token.tolist()):
                out.add(row, [value])
            steps += 1
        return Generation(out.tokens, steps=steps)

    # --- 2. self-speculative decoding --------------------------------------------------------

    @torch.inference_mode()
    def generate_speculative(self, prompts: list[list[int]], draft_exit: int, draft_tokens: int = 4,
                             max_new_tokens: int = 64, sampling: Sampling = GREEDY,
                             eos_token_id: int | None = None) -> Generation:
        """Draft `draft_tokens` tokens with exit `draft_exit`, verify them with the full model in one
        forward over layers draft_exit+1..L, keep the accepted prefix plus the verifier's token.

        One round, for pending token x0 (produced but not yet in the cache) at column C:
          draft:  x0..x_{k-1} through layers[:n] one at a time, each giving the next draft x_{i+1};
                  then x_k through layers[:n] too. Layer-n hidden states of x0..x_k: (B, k+1, H).
          verify: layers[n:] on those k+1 hidden states at columns C..C+k, the head on all k+1.
          accept: the longest prefix of drafts the verifier agrees with (greedy: equal to its
                  argmax; sampling: see speculative_accept), then the verifier's own next token.
          roll back: the cache keeps columns up to the longest accepted prefix in the batch; a
                  sequence's columns beyond its own prefix stay as holes it no longer sees.
        """
        n = self.check_exit(draft_exit, "draft exit", deepest=self.num_layers - 1)
        if isinstance(draft_tokens, bool) or not isinstance(draft_tokens, int) or draft_tokens < 1:
            raise ValueError(f"draft_tokens must be a positive integer, got {draft_tokens!r}")
        self._check_run(prompts, max_new_tokens)
        L, device = self.num_layers, self._device
        generator = self._generator(sampling)
        cache, positions, hidden = self._prefill(prompts, L, max_new_tokens + draft_tokens + 1)
        out = _Outputs(len(prompts), max_new_tokens, eos_token_id)
        token = pick(self.head(hidden), sampling, generator)
        for row, value in enumerate(token.tolist()):
            out.add(row, [value])
        result = Generation(out.tokens)
        while not out.all_done:
            active = out.active(device)
            k = min(draft_tokens, out.remaining() - 1)  # a round emits at most k + 1 tokens
            start = cache.columns
            draft_hidden, drafts, draft_probs = [], [], []
            draft = token
            for i in range(k + 1):
                x, rope = self._embed_new(cache, draft, positions + i)
                x = self._run(cache, x, 0, n, rope)  # (B, 1, H)
                draft_hidden.append(x)
                if i < k:
                    logits = self.head(x[:, -1], n)  # (B, V)
                    if sampling.greedy:
                        draft = logits.argmax(-1)
                    else:
                        draft_probs.append(distribution(logits, sampling))
                        draft = torch.multinomial(draft_probs[-1], 1, generator=generator)[:, 0]
                    drafts.append(draft)
            spans = positions[:, None] + torch.arange(k + 1, device=device)  # (B, k + 1)
            verified = self._run(cache, torch.cat(draft_hidden, dim=1), n, L, self._rope(spans))
            logits = self.head(verified)  # (B, k + 1, V)
            drafts = torch.stack(drafts, dim=1) if drafts else torch.zeros(len(prompts), 0, dtype=torch.long,
                                                                            device=device)
            if sampling.greedy:
                target = logits.argmax(-1)  # (B, k + 1)
                accepted = (drafts == target[:, :k]).long().cumprod(1).sum(1)  # (B,)
                token = target.gather(1, accepted[:, None])[:, 0]
            else:
                draft_probs = torch.stack(draft_probs, dim=1) if draft_probs else logits.new_zeros(
                    len(prompts), 0, logits.shape[-1])
                accepted, token = speculative_accept(drafts, draft_probs, distribution(logits, sampling),
                                                     generator)
            accepted = torch.where(active, accepted, torch.zeros_like(accepted))
            for row, (count, value) in enumerate(zip(accepted.tolist(), token.tolist())):
                if not out.done[row]:
                    result.drafted += k
                    result.accepted += count
                out.add(row, drafts[row, :count].tolist() + [value])
            keep = int(accepted.max()) + 1  # columns of this round every sequence may need
            columns = torch.arange(start, start + keep, device=device)
            holes = columns[None, :] > start + accepted[:, None]  # (B, keep): drafts a sequence rejected
            invalid = torch.zeros(len(prompts), start + keep, dtype=torch.bool, device=device)
            invalid[:, start:] = holes
            cache.rollback(start + keep, invalid)
            positions = positions + accepted + 1
            result.steps += 1
        return result

    # --- 3. dynamic exit ---------------------------------------------------------------------

    @torch.inference_mode()
    def generate_dynamic(self, prompts: list[list[int]], threshold: float, measure: str = "max_prob",
                         exits=None, max_new_tokens: int = 64, sampling: Sampling = GREEDY,
                         eos_token_id: int | None = None) -> Generation:
        """Each token stops at the first exit whose confidence exceeds `threshold`.

        confidence: `measure` of the exit's softmax ("max_prob" or "margin", see `confidence`),
        compared strictly (confidence > threshold). Threshold 0 stops every token at the first
        exit; threshold 1 never stops early (no confidence exceeds 1), so it is the full model and
        checks no exit. Exits: `exits` or the generator's; the last layer decides when no exit is
        confident. The prompt's pass is decided like a token's: it stops at its last position's exit.

        The deeper layers' keys/values of an early-exited token are RECOMPUTED, not approximated.
        A token that stops at layer e keeps its layer-e hidden state; the next token that goes
        deeper than e carries it along: at each layer j > e, the rows of all tokens whose layer-j
        keys/values are missing join the current token's row, in column order, and that layer
        fills them before the current token attends (Bae et al. 2023, "FREE", synchronized
        parallel decoding). Every layer a token runs therefore sees exactly the keys/values the
        full model would have, and every exit's logits equal that exit's logits on the same
        tokens: the only approximation is the choice of exit itself.
        Why not CALM's propagation (copy the exit hidden state into the deeper layers' K/V
        projections)? It is cheaper per token but makes every later token's deep layers attend to
        approximate keys/values, so errors compound along the sequence, and the exits stop
        being the trained sub-models. Recomputing costs extra rows, not extra passes: the
        deferred tokens ride in the next deep pass, whose cost on memory-bound decoding (a GPU
        reads the weights once per pass) barely grows with a few more rows; on a CPU the rows
        cost more, and a run of early exits ending in a deep token pays for the run then.

        In a batch the depth of a step is that of its least confident sequence; each sequence
        still takes its token from its own first confident exit.
        """
        if not 0 <= threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        if measure not in CONFIDENCE_MEASURES:
            raise ValueError(f"confidence measure {measure!r}: choose one of {CONFIDENCE_MEASURES}")
        exits = check_exit_layers(self.exits if exits is None else exits, self.num_layers)
        self._check_run(prompts, max_new_tokens)
        # No confidence exceeds 1, so threshold 1 checks no exit (their heads would be wasted).
        stops = [layer for layer in exits if layer < self.num_layers] if threshold < 1 else []
        rule = dict(stops=stops, threshold=threshold, measure=measure, sampling=sampling,
                    generator=self._generator(sampling))
        out = _Outputs(len(prompts), max_new_tokens, eos_token_id)
        deferred: dict[int, torch.Tensor] = {}  # column -> (B, H) output of its deepest layer so far
        # The prompt is a pass like any other: it goes only as deep as its last token's exit.
        cache, x, positions = self._start(prompts, max_new_tokens)
        token, exit_layer = self._dynamic_pass(cache, x, 0, deferred, out.active(self._device), **rule)
        steps = 0
        while True:
            for row, (value, layer) in enumerate(zip(token.tolist(), exit_layer.tolist())):
                out.add(row, [value], layer)
            if out.all_done:
                break
            x, _ = self._embed_new(cache, token, positions)
            token, exit_layer = self._dynamic_pass(cache, x, cache.columns - 1, deferred,
                                                   out.active(self._device), **rule)
            positions = positions + 1
            steps += 1
        return Generation(out.tokens, steps=steps, exit_layers=out.exit_layers)

    def _dynamic_pass(self, cache: KVCache, x: torch.Tensor, first_row: int, deferred: dict, undecided,
                      stops, threshold, measure, sampling, generator):
        """Deepen the rows x (B, R, H) of columns first_row.. until every sequence in `undecided`
        has a confident exit; return each sequence's (token, exit layer) for the last column.

        At layer i, the columns whose layer-i keys/values are missing (tokens that stopped above
        it) join as rows, from their deepest hidden state kept in `deferred`; afterwards every
        row's new deepest hidden state is kept there, or dropped once the row reached layer L.
        """
        L, end = self.num_layers, cache.columns
        undecided = undecided.clone()
        token = torch.zeros(undecided.shape, dtype=torch.long, device=undecided.device)
        exit_layer = torch.full_like(token, L)
        rope, depth = None, 0
        for index in range(L):
            missing_from = cache.lengths[index]
            if missing_from < first_row:  # tokens that stopped at layer `index` join here
                joining = torch.stack([deferred[column] for column in range(missing_from, first_row)], dim=1)
                x = torch.cat([joining, x], dim=1)  # (B, R, H), rows in column order
                first_row, rope = missing_from, None
            if rope is None:
                rope = self._rope(cache.positions[:, first_row:end])
            x = self._layers[index].forward_cached(x, *rope, cache, index)
            depth = index + 1
            if depth in stops or depth == L:
                logits = self.head(x[:, -1], depth)  # (B, V)
                confident = undecided if depth == L else undecided & (
                    (confidence(logits, measure) > threshold) | (threshold == 0))
                if confident.any():
                    token = torch.where(confident, pick(logits, sampling, generator), token)
                    exit_layer = torch.where(confident, torch.full_like(exit_layer, depth), exit_layer)
                    undecided &= ~confident
                if not undecided.any():
                    break
        for offset, column in enumerate(range(first_row, end)):
            if depth < L:
                deferred[column] = x[:, offset]
            else:
                deferred.pop(column, None)
        return token, exit_layer
