"""Self-speculative decoding: exit n drafts k tokens one at a time, then the full model verifies
them in one forward.

Draft and verifier share the first n layers' KV cache: the verifier runs only layers n+1..L, on
the layer-n hidden states the draft already computed (plus one n-layer pass for the last draft
token). Rejected tokens are rolled back by truncating the cache to the longest accepted prefix in
the batch and marking the columns a sequence rejected as invalid for it. Greedy: the output is the
full model's greedy output, token for token (up to rounding: the verifier scores k + 1 tokens per
kernel call, see cache.py). Sampling: standard speculative sampling (accept with probability
min(1, p/q), else resample from max(0, p - q)), so the output is distributed as the full model's
samples.

Two ways to make drafts cheaper or better aimed, both verified by the full model as before:
  reduced draft vocabulary (FR-Spec, Zhao et al. 2025): the draft's head projects onto only the m
      most frequent tokens of the training responses (`ReducedHead`: m rows of lm_head, the shared
      final norm), so a draft costs layers[:n] + m/V of the head; the verifier keeps the full head,
      so greedy output is still the full model's. In sampling the draft distribution q is zero
      outside the subset, which speculative sampling allows (a drafted token always has q > 0; the
      residual max(0, p - q) is p itself outside the subset).
  adaptive draft length: `draft_stop` ends a round's drafting when the draft's top probability
      falls below it for every sequence still generating (Kangaroo, Liu et al. 2024); `adaptive`
      changes the next round's k by +2 when every sequence accepted all drafts, else -1 (at least
      1), transformers' schedule for assistant tokens. A batch drafts one k per round: the round
      goes on while any sequence is confident, and the schedule grows k only if all accepted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from soft_ds.exits import check_exit_layer
from soft_ds.inference.core import (GREEDY, CachedModel, Generation, Outputs, Sampling, check_positive_integer,
                                    confidence, distribution, pick)
from soft_ds.inference.dynamic import check_threshold
from soft_ds.model import Llama


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


def check_draft_exit(draft_exit: int, num_layers: int, name: str = "draft exit") -> int:
    """A draft exit must be shallower than the model it drafts for."""
    return check_exit_layer(draft_exit, num_layers, name, deepest=num_layers - 1)


def check_draft_vocabulary(token_ids, vocab_size: int, name: str = "draft vocabulary") -> torch.Tensor:
    """Distinct token ids inside the vocabulary, at least one: a 1-D LongTensor (ValueError naming
    the problem)."""
    ids = torch.as_tensor(token_ids)
    if ids.dim() != 1 or ids.numel() == 0 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"{name} must be a non-empty 1-D list of token ids, got shape {tuple(ids.shape)} "
                         f"of {ids.dtype}")
    ids = ids.long()
    outside = ids[(ids < 0) | (ids >= vocab_size)]
    if outside.numel():
        raise ValueError(f"{name} has token ids {outside[:5].tolist()} outside the vocabulary 0..{vocab_size - 1}")
    if ids.unique().numel() != ids.numel():
        raise ValueError(f"{name} repeats token ids")
    return ids


def check_draft_vocabulary_size(size: int, vocab_size: int, name: str = "draft vocabulary size") -> int:
    check_positive_integer(size, name)
    if size > vocab_size:
        raise ValueError(f"{name} {size} exceeds the model's vocabulary ({vocab_size} tokens)")
    return size


class ReducedHead:
    """Exit n's head on a subset of the vocabulary: the same final norm, the subset's rows of the
    output projection (the tied embedding's rows for a tied model). Its logits are the full head's
    logits at those ids, in the subset's order: head(hidden)[..., i] = full(hidden)[..., token_ids[i]].

    The m rows are gathered once, here (m x H, e.g. 8192 x 576 floats for SmolLM2): indexing the
    full matrix on every draft step would move them every step."""

    def __init__(self, model: Llama, token_ids, exit_layer: int | None = None):
        self.token_ids = check_draft_vocabulary(token_ids, model.config.vocab_size).to(model.lm_head.weight.device)
        own = exit_layer is not None and str(exit_layer) in model.exit_heads  # SFT+ICT: the exit's own head
        head = model.exit_heads[str(exit_layer)] if own else None
        self.norm = head.norm if own else model.model.norm
        self.weight = (head.lm_head.weight if own else model.lm_head.weight)[self.token_ids]  # (m, H)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(hidden), self.weight)  # (..., m)


@dataclass
class Drafter:
    """Exit n's side of a round: it drafts tokens one at a time through layers[:n] and its head
    (the full vocabulary's, or a `ReducedHead`)."""
    model: CachedModel
    exit_layer: int  # n
    sampling: Sampling
    generator: torch.Generator | None
    reduced: ReducedHead | None = None
    stop: float | None = None  # generate_speculative's draft_stop

    def draft(self, cache, token: torch.Tensor, positions: torch.Tensor, most: int,
              active: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Up to `most` drafts after the pending `token` x0 (B,) at `positions` (B,): x0..x_{k-1}
        through layers[:n] one at a time, each giving the next draft x_{i+1}; then x_k through
        layers[:n] too. Returns (layer-n hidden states of x0..x_k: k+1 of (B, 1, H); drafts: k of
        (B,); under sampling their distributions over the whole vocabulary: k of (B, V))."""
        model, reduced = self.model, self.reduced
        hidden, drafts, draft_probs = [], [], []
        draft = token
        for i in range(most + 1):
            x, rope = model.embed_new(cache, draft, positions + i)
            x = model.run(cache, x, 0, self.exit_layer, rope)  # (B, 1, H)
            hidden.append(x)
            if i == most:
                break
            logits = model.head(x[:, -1], self.exit_layer) if reduced is None else reduced(x[:, -1])  # (B, V) or (B, m)
            if self.stop is not None and not bool((confidence(logits, "max_prob")[active] >= self.stop).any()):
                break  # x_i's layer-n state is in; nobody is confident of x_{i+1}
            if self.sampling.greedy:
                draft = logits.argmax(-1)
            else:
                probs = distribution(logits, self.sampling)
                draft = torch.multinomial(probs, 1, generator=self.generator)[:, 0]
                if reduced is not None:  # q over the whole vocabulary: zero outside the subset
                    vocab_size = model.config.vocab_size
                    probs = probs.new_zeros(len(probs), vocab_size).scatter_(-1, reduced.token_ids.expand_as(probs),
                                                                             probs)
                draft_probs.append(probs)
            if reduced is not None:
                draft = reduced.token_ids[draft]
            drafts.append(draft)
        return hidden, drafts, draft_probs


def verify(drafter: Drafter, cache, hidden: list[torch.Tensor], drafts: list[torch.Tensor],
           draft_probs: list[torch.Tensor], positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The full model's verdict on a round's k drafts: layers[n:] on the k+1 layer-n hidden states
    at their columns, the head on all k+1; the longest prefix of drafts it agrees with (greedy:
    equal to its argmax; sampling: `speculative_accept`), then its own next token. Returns (drafts
    (B, k), accepted count (B,), next token (B,))."""
    model, n, sampling = drafter.model, drafter.exit_layer, drafter.sampling
    batch, k, device = len(positions), len(drafts), positions.device
    spans = positions[:, None] + torch.arange(k + 1, device=device)  # (B, k + 1)
    verified = model.run(cache, torch.cat(hidden, dim=1), n, model.num_layers, model.rope(spans))
    logits = model.head(verified)  # (B, k + 1, V)
    drafts = torch.stack(drafts, dim=1) if drafts else torch.zeros(batch, 0, dtype=torch.long, device=device)
    if sampling.greedy:
        target = logits.argmax(-1)  # (B, k + 1)
        accepted = (drafts == target[:, :k]).long().cumprod(1).sum(1)  # (B,)
        return drafts, accepted, target.gather(1, accepted[:, None])[:, 0]
    draft_probs = torch.stack(draft_probs, dim=1) if draft_probs else logits.new_zeros(batch, 0, logits.shape[-1])
    accepted, token = speculative_accept(drafts, draft_probs, distribution(logits, sampling), drafter.generator)
    return drafts, accepted, token


def roll_back(cache, start: int, accepted: torch.Tensor) -> None:
    """Keep the round's columns (from `start`) up to the longest accepted prefix in the batch; a
    sequence's columns beyond its own prefix (accepted (B,)) stay as holes it no longer sees."""
    keep = int(accepted.max()) + 1  # columns of this round every sequence may need
    columns = torch.arange(start, start + keep, device=accepted.device)
    holes = columns[None, :] > start + accepted[:, None]  # (B, keep): drafts a sequence rejected
    invalid = torch.zeros(len(accepted), start + keep, dtype=torch.bool, device=accepted.device)
    invalid[:, start:] = holes
    cache.rollback(start + keep, invalid)


@torch.inference_mode()
def generate_speculative(model: CachedModel, prompts: list[list[int]], draft_exit: int, draft_tokens: int = 4,
                         max_new_tokens: int = 64, sampling: Sampling = GREEDY, eos_token_id: int | None = None,
                         draft_vocabulary=None, draft_stop: float | None = None,
                         adaptive: bool = False) -> Generation:
    """Draft up to `draft_tokens` tokens with exit `draft_exit`, verify them with the full model in
    one forward over layers draft_exit+1..L, keep the accepted prefix plus the verifier's token.

    draft_vocabulary: token ids the draft may propose (its head is then a `ReducedHead`; e.g.
        `data.targets.frequent_tokens`); None: the whole vocabulary.
    draft_stop: end a round's drafting once the draft's top probability is below this for every
        sequence still generating (a round may then draft nothing: one full-model step).
    adaptive: draft_tokens is the first round's k; later rounds add 2 after a round whose drafts
        were all accepted, else subtract 1 (never below 1).

    One round, for pending token x0 (produced but not yet in the cache) at column C:
      draft:  x0..x_{k-1} through layers[:n] one at a time, each giving the next draft x_{i+1};
              then x_k through layers[:n] too. Layer-n hidden states of x0..x_k: (B, k+1, H).
      verify: layers[n:] on those k+1 hidden states at columns C..C+k, the head on all k+1.
      accept: the longest prefix of drafts the verifier agrees with (greedy: equal to its
              argmax; sampling: see speculative_accept), then the verifier's own next token.
      roll back: the cache keeps columns up to the longest accepted prefix in the batch; a
              sequence's columns beyond its own prefix stay as holes it no longer sees.
    """
    n = check_draft_exit(draft_exit, model.num_layers)
    check_positive_integer(draft_tokens, "draft_tokens")
    if draft_stop is not None:
        check_threshold(draft_stop, "draft_stop")
    model.check_prompts(prompts, max_new_tokens)
    reduced = None if draft_vocabulary is None else ReducedHead(model.model, draft_vocabulary, n)
    device = model.device
    generator = sampling.generator(device)
    drafter = Drafter(model, n, sampling, generator, reduced, draft_stop)
    cache, positions, hidden = model.prefill(prompts, model.num_layers, max_new_tokens + draft_tokens + 1)
    out = Outputs(len(prompts), max_new_tokens, eos_token_id)
    token = pick(model.head(hidden), sampling, generator)
    out.add_each(token)
    result = Generation(out.tokens)
    planned = draft_tokens  # this round's k before the remaining-length and draft_stop cuts
    while not out.all_done:
        active = out.active(device)
        most = min(planned, out.remaining() - 1)  # a round emits at most k + 1 tokens
        start = cache.columns
        draft_hidden, drafts, draft_probs = drafter.draft(cache, token, positions, most, active)
        k = len(drafts)
        result.draft_lengths.append(k)
        drafts, accepted, token = verify(drafter, cache, draft_hidden, drafts, draft_probs, positions)
        accepted = torch.where(active, accepted, torch.zeros_like(accepted))
        for row, (count, value) in enumerate(zip(accepted.tolist(), token.tolist())):
            if not out.done[row]:
                result.drafted += k
                result.accepted += count
            out.add(row, drafts[row, :count].tolist() + [value])
        if adaptive and k:
            all_accepted = bool((accepted[active] == k).all())
            planned = planned + 2 if all_accepted else max(1, planned - 1)
        roll_back(cache, start, accepted)
        positions = positions + accepted + 1
        result.steps += 1
    return result
