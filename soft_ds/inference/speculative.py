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
"""

from __future__ import annotations

import torch

from soft_ds.exits import check_exit_layer
from soft_ds.inference.core import (GREEDY, CachedModel, Generation, Outputs, Sampling, check_positive_integer,
                                    distribution, pick)


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


@torch.inference_mode()
def generate_speculative(model: CachedModel, prompts: list[list[int]], draft_exit: int, draft_tokens: int = 4,
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
    n = check_draft_exit(draft_exit, model.num_layers)
    check_positive_integer(draft_tokens, "draft_tokens")
    model.check_prompts(prompts, max_new_tokens)
    L, device = model.num_layers, model.device
    generator = sampling.generator(device)
    cache, positions, hidden = model.prefill(prompts, L, max_new_tokens + draft_tokens + 1)
    out = Outputs(len(prompts), max_new_tokens, eos_token_id)
    token = pick(model.head(hidden), sampling, generator)
    out.add_each(token)
    result = Generation(out.tokens)
    while not out.all_done:
        active = out.active(device)
        k = min(draft_tokens, out.remaining() - 1)  # a round emits at most k + 1 tokens
        start = cache.columns
        draft_hidden, drafts, draft_probs = [], [], []
        draft = token
        for i in range(k + 1):
            x, rope = model.embed_new(cache, draft, positions + i)
            x = model.run(cache, x, 0, n, rope)  # (B, 1, H)
            draft_hidden.append(x)
            if i < k:
                logits = model.head(x[:, -1], n)  # (B, V)
                if sampling.greedy:
                    draft = logits.argmax(-1)
                else:
                    draft_probs.append(distribution(logits, sampling))
                    draft = torch.multinomial(draft_probs[-1], 1, generator=generator)[:, 0]
                drafts.append(draft)
        spans = positions[:, None] + torch.arange(k + 1, device=device)  # (B, k + 1)
        verified = model.run(cache, torch.cat(draft_hidden, dim=1), n, L, model.rope(spans))
        logits = model.head(verified)  # (B, k + 1, V)
        drafts = torch.stack(drafts, dim=1) if drafts else torch.zeros(len(prompts), 0, dtype=torch.long,
                                                                        device=device)
        if sampling.greedy:
            target = logits.argmax(-1)  # (B, k + 1)
            accepted = (drafts == target[:, :k]).long().cumprod(1).sum(1)  # (B,)
            token = target.gather(1, accepted[:, None])[:, 0]
        else:
            draft_probs = torch.stack(draft_probs, dim=1) if draft_probs else logits.new_zeros(
                len(prompts), 0, logits.shape[-1])
            accepted, token = speculative_accept(drafts, draft_probs, distribution(logits, sampling), generator)
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
