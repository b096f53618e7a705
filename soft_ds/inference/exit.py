"""Generation with the exit-n sub-model: `layers[:n] -> norm -> lm_head` of the one SoFT model,
one token per step over the KV cache of those n layers."""

from __future__ import annotations

import torch

from soft_ds.exits import check_exit_layer
from soft_ds.inference.core import GREEDY, CachedModel, Generation, Outputs, Sampling, pick


@torch.inference_mode()
def generate_at_exit(model: CachedModel, prompts: list[list[int]], exit_layer: int | None = None,
                     max_new_tokens: int = 64, sampling: Sampling = GREEDY,
                     eos_token_id: int | None = None) -> Generation:
    """Generate with exit n (n = all layers by default). Greedy output equals the exported
    n-layer model's `generate(do_sample=False)`."""
    n = check_exit_layer(model.num_layers if exit_layer is None else exit_layer, model.num_layers)
    model.check_prompts(prompts, max_new_tokens)
    generator = sampling.generator(model.device)
    cache, positions, hidden = model.prefill(prompts, n, max_new_tokens)
    out = Outputs(len(prompts), max_new_tokens, eos_token_id)
    token = pick(model.head(hidden, n), sampling, generator)  # (B,)
    out.add_each(token)
    steps = 0
    while not out.all_done:
        x, rope = model.embed_new(cache, token, positions)
        x = model.run(cache, x, 0, n, rope)
        token = pick(model.head(x[:, -1], n), sampling, generator)
        positions = positions + 1
        out.add_each(token)
        steps += 1
    return Generation(out.tokens, steps=steps)
