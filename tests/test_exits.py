"""soft_ds.exits: the exit loss against F.cross_entropy, chunking, SoFT weighting, exit records."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from soft_ds.exits import IGNORE_INDEX, PAPER_EXITS_40, Exit, default_exit_layers, exit_loss, make_exits
from soft_ds.model import SharedHead, preset_config

B, T = 2, 7  # 14 tokens: not a multiple of 3 or 5, so chunking leaves a ragged last chunk


def make_head(seed: int = 0) -> SharedHead:
    config = preset_config("debug")
    torch.manual_seed(seed)
    head = SharedHead(config)
    with torch.no_grad():
        head.norm.weight.add_(0.2 * torch.randn_like(head.norm.weight))
        head.lm_head.weight.normal_(0.0, 0.2)
    return head


def make_batch(head: SharedHead, seed: int = 1, masked=((0, 0), (0, 1), (1, 4))):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, head.norm.weight.numel(), generator=generator)
    targets = torch.randint(0, head.lm_head.out_features, (B, T), generator=generator)
    for b, t in masked:
        targets[b, t] = IGNORE_INDEX
    return hidden, targets


def reference_loss(head, hidden, targets):
    vocab = head.lm_head.out_features
    return F.cross_entropy(head(hidden).view(-1, vocab), targets.view(-1), ignore_index=IGNORE_INDEX)


def loss_and_grads(head, hidden, targets, implementation=None, chunk_tokens=1024, scale=1.0, **kwargs):
    """The loss and the gradients of scale * loss (None: the plain reference cross-entropy)."""
    hidden = hidden.clone().requires_grad_(True)
    head.zero_grad(set_to_none=True)
    if implementation is None:
        loss = reference_loss(head, hidden, targets)
    else:
        loss = exit_loss(head, hidden, targets, implementation, chunk_tokens, **kwargs)
    (loss * scale).backward()
    grads = {"hidden": hidden.grad.clone()}
    grads.update({name: p.grad.clone() for name, p in head.named_parameters()})
    return loss.detach(), grads


def test_exit_loss_is_token_mean_cross_entropy():
    head = make_head()
    hidden, targets = make_batch(head)
    with torch.no_grad():
        loss = exit_loss(head, hidden, targets)
        expected = reference_loss(head, hidden, targets)
        # Independent hand computation: mean of -log softmax at the target over the 11 counted tokens.
        log_probs = torch.log_softmax(head(hidden), dim=-1)
        keep = targets != IGNORE_INDEX
        by_hand = -log_probs[keep].gather(-1, targets[keep][:, None]).sum() / keep.sum()
    assert keep.sum() == B * T - 3
    assert abs(loss.item() - expected.item()) <= 1e-6
    assert abs(loss.item() - by_hand.item()) <= 1e-5
    assert loss.item() > 0


@pytest.mark.parametrize("chunk_tokens", [3, 5, 1000])
def test_chunked_loss_and_gradients_equal_unchunked(chunk_tokens):
    head = make_head()
    hidden, targets = make_batch(head)
    reference, reference_grads = loss_and_grads(head, hidden, targets)
    whole, whole_grads = loss_and_grads(head, hidden, targets, "whole")
    chunked, chunked_grads = loss_and_grads(head, hidden, targets, "chunked", chunk_tokens)
    assert abs(whole.item() - reference.item()) <= 1e-6
    assert abs(chunked.item() - reference.item()) <= 1e-6
    assert sorted(chunked_grads) == ["hidden", "lm_head.weight", "norm.weight"]
    for name, expected in reference_grads.items():
        assert expected.abs().max() > 0, name  # gradients are non-trivial, so equality means something
        assert (whole_grads[name] - expected).abs().max().item() <= 1e-6, name
        assert (chunked_grads[name] - expected).abs().max().item() <= 1e-6, name
    # Masked positions get no gradient.
    assert chunked_grads["hidden"][0, 0].abs().max() == 0
    assert chunked_grads["hidden"][1, 4].abs().max() == 0


def test_chunked_loss_without_grad():
    head = make_head()
    hidden, targets = make_batch(head)
    with torch.no_grad():
        for implementation in ("chunked", "fused"):
            assert abs(exit_loss(head, hidden, targets, implementation, chunk_tokens=4).item()
                       - reference_loss(head, hidden, targets).item()) <= 1e-6


@pytest.mark.parametrize("implementation, chunk_tokens", [("whole", 0), ("chunked", 3), ("fused", 3)])
def test_all_ignored_gives_zero_loss_and_zero_grads(implementation, chunk_tokens):
    head = make_head()
    hidden, targets = make_batch(head)
    targets.fill_(IGNORE_INDEX)
    loss, grads = loss_and_grads(head, hidden, targets, implementation, chunk_tokens)
    assert sorted(grads) == ["hidden", "lm_head.weight", "norm.weight"]
    assert loss.item() == 0.0
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), name
        assert grad.abs().max().item() == 0.0, name


class RowRecordingHead(nn.Module):
    """The shared head, recording the rows each call computes (to show which positions it sees)."""

    def __init__(self, head: SharedHead):
        super().__init__()
        self.head = head
        self.rows: list[torch.Tensor] = []

    def forward(self, hidden):
        self.rows.append(hidden.detach().clone())  # (N, H)
        return self.head(hidden)


PROMPT_AND_PADDING = tuple((b, t) for b in range(B) for t in range(T) if t < 3 or (b, t) == (1, 6))


@pytest.mark.parametrize("chunk_tokens", [0, 3, 1000])
@pytest.mark.parametrize("masked", [PROMPT_AND_PADDING, "all"])
def test_head_sees_only_counted_rows(chunk_tokens, masked):
    """The head runs on exactly the counted rows, in order, and the loss and gradients equal the
    whole-batch cross-entropy over every position (all counted rows ignored: 0 and zero gradients)."""
    head = make_head()
    hidden, targets = make_batch(head, masked=PROMPT_AND_PADDING)
    if masked == "all":
        targets.fill_(IGNORE_INDEX)
    counted = targets != IGNORE_INDEX  # (B, T)
    recording = RowRecordingHead(head)
    hidden_in = hidden.clone().requires_grad_(True)
    loss = exit_loss(recording, hidden_in, targets, "chunked" if chunk_tokens else "whole", chunk_tokens)
    seen = torch.cat(recording.rows)  # the forward's calls only: backward's recompute comes later
    assert seen.shape[0] == counted.sum() == (0 if masked == "all" else B * T - 7)
    assert torch.equal(seen, hidden[counted])
    if chunk_tokens:
        assert all(len(rows) <= chunk_tokens for rows in recording.rows)
    loss.backward()
    grads = {"hidden": hidden_in.grad, **{name: p.grad for name, p in head.named_parameters()}}
    if masked == "all":
        assert loss.item() == 0.0
        assert all(grad.abs().max().item() == 0.0 for grad in grads.values())
        return
    reference, reference_grads = loss_and_grads(head, hidden, targets)  # every position through the head
    assert abs(loss.item() - reference.item()) <= 1e-6
    for name, expected in reference_grads.items():
        assert expected.abs().max() > 0, name
        assert (grads[name] - expected).abs().max().item() <= 1e-6, name
    assert grads["hidden"][~counted].abs().max().item() == 0.0


@pytest.mark.parametrize("chunk_tokens", [1, 3, 5, 11, 1000])  # 11 counted tokens: one chunk, exactly
def test_fused_loss_and_gradients_equal_plain_cross_entropy(chunk_tokens):
    """The fused loss (gradients computed in the forward pass, chunk by chunk) against the plain
    whole-batch cross-entropy: loss, input gradient, norm and weight gradients, fp32, 1e-6; with the
    weight gradient kept for backward and added straight into weight.grad (scaled by the upstream
    gradient it is told, here 0.25 on top of a gradient already there)."""
    head = make_head()
    hidden, targets = make_batch(head)
    reference, reference_grads = loss_and_grads(head, hidden, targets, scale=0.25)
    kept, kept_grads = loss_and_grads(head, hidden, targets, "fused", chunk_tokens, scale=0.25)
    assert abs(kept.item() - reference.item()) <= 1e-6
    assert sorted(kept_grads) == sorted(reference_grads) == ["hidden", "lm_head.weight", "norm.weight"]
    for name, expected in reference_grads.items():
        assert expected.abs().max() > 0, name
        assert (kept_grads[name] - expected).abs().max().item() <= 1e-6, name
    assert kept_grads["hidden"][0, 0].abs().max() == 0 and kept_grads["hidden"][1, 4].abs().max() == 0

    earlier = torch.randn_like(head.lm_head.weight)  # a gradient accumulated before (another exit)
    hidden_in = hidden.clone().requires_grad_(True)
    head.zero_grad(set_to_none=True)
    head.lm_head.weight.grad = earlier.clone()
    loss = exit_loss(head, hidden_in, targets, "fused", chunk_tokens, weight_grad_factor=0.25)
    added = head.lm_head.weight.grad - earlier  # already there after the forward pass
    assert (added - reference_grads["lm_head.weight"]).abs().max().item() <= 1e-6
    (loss * 0.25).backward()
    assert abs(loss.item() - reference.item()) <= 1e-6
    assert (hidden_in.grad - reference_grads["hidden"]).abs().max().item() <= 1e-6
    assert (head.norm.weight.grad - reference_grads["norm.weight"]).abs().max().item() <= 1e-6
    assert torch.equal(head.lm_head.weight.grad - earlier, added)  # backward added nothing more


def test_direct_weight_gradient_refuses_another_upstream_factor():
    """A loss whose weight gradient went in scaled by the wrong factor fails loudly in backward."""
    head = make_head()
    hidden, targets = make_batch(head)
    loss = exit_loss(head, hidden.requires_grad_(True), targets, "fused", 4, weight_grad_factor=0.5)
    with pytest.raises(RuntimeError, match="scaled by 0.5 in the forward pass, but backward brought another"):
        (loss * 0.25).backward()


def test_fused_loss_tied_head_and_whole_llama():
    """The tied head (the embedding is the output weight) and a whole Llama's exit head: the fused
    loss's gradients equal the plain loss's, the embedding's summed with its own use."""
    from soft_ds.model import Llama, random_weights
    config = preset_config("debug", tie_word_embeddings=True)
    ids = torch.randint(0, config.vocab_size, (B, T), generator=torch.Generator().manual_seed(3))
    _, targets = make_batch(make_head())
    grads = {}
    for implementation in ("whole", "fused"):
        model = Llama.from_weights(config, random_weights(config, 0))
        hidden = model.hidden_states(ids, [2, 4])
        loss = sum(exit_loss(model.exit_head(n), h, targets, implementation, 4) for n, h in hidden.items())
        loss.backward()
        grads[implementation] = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert grads["whole"]["model.embed_tokens.weight"].abs().max() > 0
    assert sorted(grads["fused"]) == sorted(grads["whole"])
    for name, expected in grads["whole"].items():
        assert (grads["fused"][name] - expected).abs().max().item() <= 1e-6, name


def test_fused_and_chunked_losses_bf16_close_to_fp32():
    """bf16 weights: the fused loss and the chunked one (what exit_loss "auto" runs under bf16) are as
    close to the fp32 loss as the whole bf16 loss is."""
    head = make_head()
    hidden, targets = make_batch(head)
    reference, reference_grads = loss_and_grads(head, hidden, targets)
    head16 = make_head().to(torch.bfloat16)
    errors = {}
    for implementation in ("whole", "fused", "chunked"):
        loss, grads = loss_and_grads(head16, hidden.to(torch.bfloat16), targets, implementation, 4)
        assert loss.dtype == torch.float32 and grads["lm_head.weight"].dtype == torch.bfloat16
        errors[implementation] = max((grads[name].float() - expected).abs().max().item() / expected.abs().max().item()
                                     for name, expected in reference_grads.items())
        assert abs(loss.item() - reference.item()) <= 2e-2
    assert errors["fused"] <= max(2 * errors["whole"], 1e-2), errors
    assert errors["chunked"] <= max(2 * errors["whole"], 1e-2), errors


@pytest.mark.parametrize("implementation, chunk_tokens", [("chunked", 0), ("fused", -1), ("sparse", 8)])
def test_exit_loss_bad_implementation(implementation, chunk_tokens):
    head = make_head()
    hidden, targets = make_batch(head)
    with pytest.raises(ValueError, match=implementation):
        exit_loss(head, hidden, targets, implementation, chunk_tokens)


def test_default_exits_for_40_layers_are_the_papers():
    assert PAPER_EXITS_40 == (12, 16, 20, 24, 28, 32, 36, 40)
    assert default_exit_layers(40) == PAPER_EXITS_40
    exits = make_exits(None, 40)
    assert exits == tuple(Exit(n, 1.0) for n in (12, 16, 20, 24, 28, 32, 36, 40))


def test_default_exits_small_models():
    assert default_exit_layers(8) == (2, 4, 6, 8)
    assert default_exit_layers(5) == (1, 2, 3, 4, 5)


@pytest.mark.parametrize("num_layers", [1, 2, 9, 12, 22, 24, 32, 60, 80])
def test_default_exits_always_valid(num_layers):
    layers = default_exit_layers(num_layers)
    assert list(layers) == sorted(set(layers))
    assert layers[-1] == num_layers
    assert all(1 <= n <= num_layers for n in layers)
    make_exits(layers, num_layers)  # the defaults pass validation


def test_sft_mode_keeps_only_the_last_layer():
    assert make_exits(None, 40, mode="sft") == (Exit(40, 1.0),)
    assert make_exits([12, 40], 40, weights=[1, 2], mode="sft") == (Exit(40, 1.0),)


def test_exits_are_sorted_with_their_weights():
    exits = make_exits([8, 2, 5], 8, weights=[3, 1, 2])
    assert exits == (Exit(2, 1.0), Exit(5, 2.0), Exit(8, 3.0))
    assert all(isinstance(e.layer, int) and isinstance(e.weight, float) for e in exits)


@pytest.mark.parametrize("layers, weights, message", [
    ([4, 41, 40], None, r"\[41\].*1\.\.40"),  # beyond the depth
    ([0, 40], None, r"\[0\].*1\.\.40"),  # exit 0 (the embedding) is not an exit
    ([12, 12, 40], None, r"\[12, 12, 40\].*duplicates"),
    ([12, 16], None, r"last layer \(40\).*\[12, 16\]"),
    ([12, 40], [1.0, 1.0, 1.0], r"3 exit weights given for 2 exits"),
    ([12, 40], [1.0, 0.0], r"positive.*\[1\.0, 0\.0\]"),
    ([12, 40], [-1.0, 2.0], r"positive.*\[-1\.0, 2\.0\]"),
])
def test_make_exits_errors_name_the_offending_values(layers, weights, message):
    with pytest.raises(ValueError, match=message):
        make_exits(layers, 40, weights=weights)


def test_make_exits_bad_mode():
    with pytest.raises(ValueError, match="'sfft'"):
        make_exits(None, 40, mode="sfft")


def test_direct_weight_gradient_only_where_exact():
    """The fused loss writes the head's weight gradient straight into .grad only in fp32 and where the
    ZeRO optimizer DeepSpeed built does not overlap communication (its hooks would never see that
    gradient); DeepSpeed turns overlap_comm off for pipelines, so that is asked of the optimizer."""
    from types import SimpleNamespace

    from soft_ds.pipe import direct_weight_gradient_exact

    def engine(bf16=False, overlap_comm=None):
        optimizer = SimpleNamespace() if overlap_comm is None else SimpleNamespace(overlap_comm=overlap_comm)
        return SimpleNamespace(bfloat16_enabled=lambda: bf16, fp16_enabled=lambda: False, optimizer=optimizer)

    assert direct_weight_gradient_exact(engine())  # fp32, no ZeRO
    assert direct_weight_gradient_exact(engine(overlap_comm=False))  # ZeRO-1 as DeepSpeed builds it for pipelines
    assert not direct_weight_gradient_exact(engine(overlap_comm=True))
    assert not direct_weight_gradient_exact(engine(bf16=True))
