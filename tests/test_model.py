"""soft_ds.model against Hugging Face's LlamaForCausalLM on the same weights (fp32, CPU)."""

import pytest
import torch
import transformers

from soft_ds.exits import IGNORE_INDEX, exit_loss
from soft_ds.model import (KERNEL_ENV, Llama, check_supported, hf_shapes, packed_attention_kernel, packed_mask,
                           preset_config, random_weights, record_mask)

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}

# name -> (config overrides on the "debug" preset, sequence length)
CONFIGS = {
    "debug_gqa": ({}, 24),  # 4 query heads over 2 kv heads
    "multi_head": ({"num_key_value_heads": 4}, 24),
    # Longer than original_max_position_embeddings, so the llama3 low/high-frequency scaling matters.
    "llama3_rope": ({"rope_parameters": LLAMA3_ROPE}, 100),
    "biases": ({"attention_bias": True, "mlp_bias": True}, 24),
    # One matrix for the embedding and lm_head (SmolLM2, LLaMA 3.2 1B/3B).
    "tied": ({"tie_word_embeddings": True}, 24),
}
TOLERANCE = 1e-6


def hf_reference(config: transformers.LlamaConfig, seed: int = 0) -> transformers.LlamaForCausalLM:
    """A random HF LLaMA whose norms and biases are perturbed: HF initialises norms to 1 and biases to
    0, which would hide a dropped/swapped norm or an ignored bias."""
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.add_(0.2 * torch.randn_like(parameter))
            elif name.endswith(".bias"):
                parameter.normal_(0.0, 0.05)
    return model


def ours_from(hf: transformers.LlamaForCausalLM, config) -> Llama:
    model = Llama(config).eval()
    model.load_state_dict(hf.state_dict(), strict=True)
    return model


def random_ids(config, seq_len: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (batch, seq_len), generator=generator)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request):
    overrides, seq_len = CONFIGS[request.param]
    config = preset_config("debug", **overrides)
    hf = hf_reference(config)
    ours = ours_from(hf, config)
    ids = random_ids(config, seq_len)
    with torch.no_grad():
        reference = hf(ids, output_hidden_states=True)
    return config, hf, ours, ids, reference


def test_full_depth_logits_match_hf(pair):
    config, _, ours, ids, reference = pair
    with torch.no_grad():
        logits = ours(ids)
    assert logits.shape == (*ids.shape, config.vocab_size)
    assert (logits - reference.logits).abs().max().item() <= TOLERANCE


def test_perturbation_reaches_the_logits(pair):
    """Guard for the comparison above: the perturbed norms/biases must matter, or the test is blind."""
    config, hf, ours, ids, reference = pair
    with torch.no_grad():
        ours.model.layers[0].post_attention_layernorm.weight.fill_(1.0)
        changed = ours(ids)
        ours.load_state_dict(hf.state_dict(), strict=True)
    assert (changed - reference.logits).abs().max().item() > 1e-3


def test_exit_logits_match_hf_hidden_states(pair):
    config, hf, ours, ids, reference = pair
    n = config.num_hidden_layers
    # hidden_states[0] is the embedding output, hidden_states[k] the output of layer k; HF applies
    # the final norm to the last entry, so exit n is checked against the logits themselves.
    assert len(reference.hidden_states) == n + 1
    with torch.no_grad():
        for k in range(1, n + 1):
            expected = hf.lm_head(hf.model.norm(reference.hidden_states[k])) if k < n else reference.logits
            got = ours(ids, exit_layer=k)
            assert (got - expected).abs().max().item() <= TOLERANCE, f"exit {k}"
        # Different exits really give different logits (the loop above could not pass by accident).
        assert (ours(ids, exit_layer=1) - ours(ids, exit_layer=2)).abs().max().item() > 1e-3


def test_hidden_states_one_pass_matches_hf(pair):
    config, _, ours, ids, reference = pair
    n = config.num_hidden_layers
    with torch.no_grad():
        states = ours.hidden_states(ids, [2, 5, 1])
    assert sorted(states) == [1, 2, 5]
    for k, state in states.items():
        assert (state - reference.hidden_states[k]).abs().max().item() <= TOLERANCE
    assert n > 5


@pytest.mark.parametrize("k", [1, 3, 6])
def test_exit_equals_truncated_hf_model(k):
    """Exit k of the full model == an HF LLaMA with only the first k layers (same embed/norm/head)."""
    config = preset_config("debug")
    full = hf_reference(config)
    sub_config = preset_config("debug", num_hidden_layers=k)
    sub = transformers.LlamaForCausalLM(sub_config).eval()
    keep = {name: tensor for name, tensor in full.state_dict().items()
            if not name.startswith("model.layers.") or int(name.split(".")[2]) < k}
    sub.load_state_dict(keep, strict=True)
    ours = ours_from(full, config)
    ids = random_ids(config, 20)
    with torch.no_grad():
        assert (ours(ids, exit_layer=k) - sub(ids).logits).abs().max().item() <= TOLERANCE


def test_causal_later_tokens_never_change_earlier_logits():
    """What makes right padding safe: logits at <= t depend only on tokens <= t."""
    config = preset_config("debug")
    model = ours_from(hf_reference(config), config)
    ids = random_ids(config, 16, seed=3)
    with torch.no_grad():
        base = {k: model(ids, exit_layer=k) for k in (2, 8)}
        for t in (0, 7, 14):
            changed_ids = ids.clone()
            changed_ids[:, t + 1:] = (ids[:, t + 1:] + 1 + torch.arange(16 - t - 1)) % config.vocab_size
            for k, logits in base.items():
                changed = model(changed_ids, exit_layer=k)
                assert (changed[:, :t + 1] - logits[:, :t + 1]).abs().max().item() <= TOLERANCE
                # ...while the changed positions do change (the check above can fail).
                assert (changed[:, t + 1:] - logits[:, t + 1:]).abs().max().item() > 1e-3
            # A shorter sequence (a right-padded one, minus its pads) gives the same prefix logits.
            prefix = model(ids[:, :t + 1])
            assert (prefix - base[8][:, :t + 1]).abs().max().item() <= TOLERANCE


def test_random_weights_deterministic_and_independent_of_request():
    config = preset_config("debug", attention_bias=True)
    names = list(hf_shapes(config))
    all_at_once = random_weights(config, seed=7)(names)
    again = random_weights(config, seed=7)(names)
    assert sorted(all_at_once) == sorted(names)
    for name in names:
        assert torch.equal(all_at_once[name], again[name]), name
    # One at a time and in reverse order: a pipeline stage asking for its own names gets the same tensors.
    source = random_weights(config, seed=7)
    for name in reversed(names):
        assert torch.equal(source([name])[name], all_at_once[name]), name
    stage_names = [n for n in names if n.startswith("model.layers.5.")]
    stage = random_weights(config, seed=7)(stage_names)
    assert sorted(stage) == sorted(stage_names)
    for name in stage_names:
        assert torch.equal(stage[name], all_at_once[name])


def test_random_weights_values():
    config = preset_config("debug", attention_bias=True)
    weights = random_weights(config, seed=7)(list(hf_shapes(config)))
    other_seed = random_weights(config, seed=8)(["model.layers.0.self_attn.q_proj.weight"])
    q0 = weights["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(q0, other_seed["model.layers.0.self_attn.q_proj.weight"])
    # Each tensor has its own stream: same-shape tensors of different layers differ.
    assert not torch.equal(q0, weights["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(weights["model.norm.weight"], torch.ones(config.hidden_size))
    assert torch.equal(weights["model.layers.3.input_layernorm.weight"], torch.ones(config.hidden_size))
    assert torch.equal(weights["model.layers.3.self_attn.q_proj.bias"], torch.zeros(q0.shape[0]))
    embed = weights["model.embed_tokens.weight"]
    assert abs(embed.mean().item()) < 2e-3
    assert abs(embed.std().item() - config.initializer_range) < 1e-3
    model = Llama.from_weights(config, random_weights(config, seed=7))
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, weights[name]), name


@pytest.mark.parametrize("overrides", [{}, {"attention_bias": True, "mlp_bias": True},
                                       {"num_key_value_heads": 1, "num_hidden_layers": 3}])
def test_hf_shapes_match_hf_state_dict(overrides):
    config = preset_config("debug", **overrides)
    hf = transformers.LlamaForCausalLM(config)
    expected = {name: tensor.shape for name, tensor in hf.state_dict().items()}
    assert hf_shapes(config) == expected


def test_tied_model_has_one_matrix_whose_gradient_sums_both_uses():
    """A tied Llama holds one Parameter for embedding and lm_head (named once, as HF names it),
    loads from a state dict that stores only the embedding (as HF writes one), and its gradient is
    the untied model's embedding gradient plus its lm_head gradient on the same weights."""
    config = preset_config("debug", tie_word_embeddings=True)
    tied = Llama.from_weights(config, random_weights(config, 3))
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    names = [name for name, _ in tied.named_parameters()]
    assert "lm_head.weight" not in names and "lm_head.weight" not in hf_shapes(config)
    untied_config = preset_config("debug")
    untied = Llama(untied_config)
    state = {name: tensor for name, tensor in tied.state_dict().items() if name != "lm_head.weight"}
    untied.load_state_dict({**state, "lm_head.weight": state["model.embed_tokens.weight"].clone()}, strict=True)
    ids = random_ids(config, 12)
    for model in (tied, untied):
        torch.nn.functional.cross_entropy(model(ids, exit_layer=4).flatten(0, 1), ids.flatten()).backward()
    both = untied.model.embed_tokens.weight.grad + untied.lm_head.weight.grad
    assert (tied.model.embed_tokens.weight.grad - both).abs().max().item() <= 1e-7
    assert untied.lm_head.weight.grad.abs().max().item() > 1e-3  # the head's share is not negligible


def test_check_supported_rejects_unknown_rope_type():
    config = preset_config("debug", rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0,
                                                     "factor": 2.0})
    with pytest.raises(ValueError, match="rope type 'dynamic'"):
        check_supported(config)
    with pytest.raises(ValueError, match="dynamic"):
        Llama(config)


def test_check_supported_rejects_other_activation():
    with pytest.raises(ValueError, match="gelu"):
        check_supported(preset_config("debug", hidden_act="gelu"))


def test_check_supported_accepts_supported_configs():
    for overrides, _ in CONFIGS.values():
        check_supported(preset_config("debug", **overrides))  # must not raise


def test_preset_config():
    config = preset_config("debug", num_hidden_layers=3)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
            config.num_key_value_heads) == (64, 3, 4, 2)
    with pytest.raises(ValueError, match=r"'nope'.*\['debug', 'tiny'\]"):
        preset_config("nope")


@pytest.mark.parametrize("bad", [0, 9, -1])
def test_exit_layer_out_of_range_is_an_error(bad):
    config = preset_config("debug")
    model = Llama.from_weights(config, random_weights(config, 0))
    with pytest.raises(ValueError, match=f"exit layer {bad} is out of range: the model has 8 layers"):
        model(torch.zeros(1, 4, dtype=torch.long), exit_layer=bad)


def _records(config, lengths, seed=3):
    """Records (ids, targets) like tokenize_record's: a prompt part and the last position at -100."""
    generator = torch.Generator().manual_seed(seed)
    records = []
    for length in lengths:
        ids = torch.randint(0, config.vocab_size, (length,), generator=generator)
        targets = torch.randint(0, config.vocab_size, (length,), generator=generator)
        targets[:length // 3] = IGNORE_INDEX
        targets[-1] = IGNORE_INDEX
        records.append((ids, targets))
    return records


def _record_loss_and_grads(model, ids, targets, positions=None):
    """SoFT loss over exits 4 and 8 of (B, T) ids/targets, and its gradients on every parameter."""
    model.zero_grad(set_to_none=True)
    hidden = model.hidden_states(ids, [4, 8], positions)
    loss = sum(exit_loss(model.head, h, targets) for h in hidden.values()) / 2
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_packed_rows_give_every_record_its_unpacked_loss_and_gradients():
    """Records packed into rows (positions restarting, block-diagonal causal attention) give each
    record exactly its loss and gradients alone in a row (fp32, <= 1e-6); without the record mask
    they would not."""
    config = preset_config("debug")
    model = Llama.from_weights(config, random_weights(config, 0))
    rows = [[5, 8, 3], [10, 6]]  # record lengths per row; 2 pad positions each at T = 18
    T = 18
    records = _records(config, [n for row in rows for n in row])
    ids = torch.zeros(len(rows), T, dtype=torch.long)  # (B, T), pad id 0
    targets = torch.full((len(rows), T), IGNORE_INDEX)  # (B, T)
    positions = torch.zeros(len(rows), T, dtype=torch.long)  # (B, T)
    placed, index = [], 0
    for b, lengths in enumerate(rows):
        start = 0
        for length in lengths:
            ids[b, start:start + length], targets[b, start:start + length] = records[index]
            positions[b, start:start + length] = torch.arange(length)
            placed.append((b, start, length))
            start, index = start + length, index + 1
        positions[b, start:] = positions[b, start - 1] + 1 + torch.arange(T - start)  # pads continue it
    assert record_mask(positions) is not None and record_mask(torch.arange(T).expand(2, T)) is None
    for (b, start, length), (record_ids, record_targets) in zip(placed, records):
        alone, alone_grads = _record_loss_and_grads(model, record_ids[None], record_targets[None])
        only_this = torch.full_like(targets, IGNORE_INDEX)
        only_this[b, start:start + length] = record_targets
        packed, packed_grads = _record_loss_and_grads(model, ids, only_this, positions)
        assert abs(packed.item() - alone.item()) <= TOLERANCE, (b, start)
        assert sorted(packed_grads) == sorted(alone_grads)
        for name, expected in alone_grads.items():
            # fp32 rounding differs between a row of 18 and one of 3..10 tokens: <= 1e-6 of the scale.
            scale = max(1.0, expected.abs().max().item())
            assert (packed_grads[name] - expected).abs().max().item() <= TOLERANCE * scale, (b, start, name)
        if start > 0:  # a later record in its row: plain causal attention over the row would differ
            unmasked, _ = _record_loss_and_grads(model, ids, only_this)
            assert abs(unmasked.item() - alone.item()) > 1e-3


def test_packed_attention_kernels_agree_and_the_choice_is_named(monkeypatch):
    """The kernel for packed rows: SDPA with a mask on CPU; flex attention (its eager reference on
    CPU, forward only there, named by SOFT_PACKED_ATTENTION) gives the same per-exit losses;
    flash-attn's varlen spans mark each record (the kernels' training runs need a GPU)."""
    assert packed_attention_kernel("cpu", torch.float32) == "sdpa-mask"
    config = preset_config("debug")
    model = Llama.from_weights(config, random_weights(config, 0))
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(0, config.vocab_size, (2, 16), generator=generator)
    targets = torch.randint(0, config.vocab_size, (2, 16), generator=generator)
    positions = torch.tensor([list(range(5)) + list(range(11)), list(range(7)) + list(range(9))])

    def exit_losses(positions):
        with torch.no_grad():
            return [exit_loss(model.head, h, targets).item()
                    for h in model.hidden_states(ids, [4, 8], positions).values()]

    losses = {}
    for kernel in ("sdpa-mask", "flex"):
        monkeypatch.setenv(KERNEL_ENV, kernel)
        assert packed_attention_kernel("cpu", torch.float32) == kernel
        losses[kernel] = exit_losses(positions)
    assert max(abs(a - b) for a, b in zip(losses["flex"], losses["sdpa-mask"])) <= TOLERANCE
    # Without the record boundaries the losses differ (the comparison can fail).
    plain = exit_losses(torch.arange(16).expand(2, 16))
    assert min(abs(a - b) for a, b in zip(plain, losses["sdpa-mask"])) > 1e-3
    spans = packed_mask(positions, "flash-varlen")
    assert spans.cu_seqlens.tolist() == [0, 5, 16, 23, 32] and spans.max_len == 11
    assert spans.cu_seqlens.dtype == torch.int32
    assert packed_mask(torch.arange(16).expand(2, 16), "flex") is None  # one record per row: plain causal
    monkeypatch.setenv(KERNEL_ENV, "fast")
    with pytest.raises(ValueError, match="SOFT_PACKED_ATTENTION='fast': expected one of flash-varlen, flex, sdpa-mask"):
        packed_attention_kernel("cpu", torch.float32)
    monkeypatch.setenv(KERNEL_ENV, "flash-varlen")
    with pytest.raises(ValueError, match="flash-varlen needs a CUDA device and the flash_attn package"):
        packed_attention_kernel("cpu", torch.float32)


def test_packed_mask_is_built_once_per_positions_and_follows_their_values():
    """The layers of one forward share one mask (the same positions tensor, recognised without
    comparing values); another tensor, or the same one written in place, gets its own."""
    positions = torch.tensor([[0, 1, 2, 0, 1, 2], [0, 1, 0, 1, 2, 3]])
    first = packed_mask(positions, "sdpa-mask")
    assert packed_mask(positions, "sdpa-mask") is first
    copy = packed_mask(positions.clone(), "sdpa-mask")
    assert copy is not first and torch.equal(copy, first)
    assert torch.equal(first, record_mask(positions))
    positions[0] = torch.tensor([0, 1, 2, 3, 0, 1])  # in place, as a receive buffer
    second = packed_mask(positions, "sdpa-mask")
    assert second is not first and torch.equal(second, record_mask(positions))
    assert packed_mask(positions, "flash-varlen").cu_seqlens.tolist() == [0, 4, 6, 8, 12]
    assert packed_mask(torch.arange(6).expand(2, 6), "sdpa-mask") is None


# -- hardware paths, checked against the APIs' contracts on CPU ----------------------------------------

ROTARY_CASTS = {
    ".to(bfloat16)": lambda m: m.to(torch.bfloat16),
    ".bfloat16()": lambda m: m.bfloat16(),
    ".half()": lambda m: m.half(),
    ".to(cpu, float16)": lambda m: m.to("cpu", torch.float16),
}


@pytest.mark.parametrize("cast", sorted(ROTARY_CASTS))
def test_rotary_frequencies_stay_fp32_through_every_cast(cast):
    """inv_freq after a cast is the fp32 reference's, bit for bit, and so are the angles at the last
    position (seq_len - 1 = 511); stored in bf16 they would be off by radians there."""
    config = preset_config("debug")
    reference = Llama(config).model.layers[0].rotary
    model = ROTARY_CASTS[cast](Llama(config))
    last = torch.tensor([config.max_position_embeddings - 1])
    for layer in model.model.layers:
        assert layer.rotary.inv_freq.dtype == torch.float32
        assert torch.equal(layer.rotary.inv_freq, reference.inv_freq)
        cos, sin = layer.rotary(last, torch.float32)
        expected_cos, expected_sin = reference(last, torch.float32)
        assert torch.equal(cos, expected_cos) and torch.equal(sin, expected_sin)
    # What the fp32 buffer guards against: the same angles from bf16-rounded frequencies.
    rounded = reference.inv_freq.to(torch.bfloat16).float()
    assert ((last.float()[:, None] * rounded).cos() - expected_cos[:, :rounded.numel()]).abs().max() > 0.05


def test_rotary_frequencies_stay_fp32_when_loaded_in_bf16(tmp_path):
    """generate / eval --dtype bfloat16 load through hf_io.load_model, which casts the whole model."""
    from soft_ds.hf_io import load_model, save_hf_checkpoint
    config = preset_config("debug")
    model = Llama.from_weights(config, random_weights(config, 0))
    out = save_hf_checkpoint(model.state_dict(), config, tmp_path / "export")
    for dtype in (torch.bfloat16, torch.float16):
        loaded = load_model(out, dtype=dtype)
        assert loaded.lm_head.weight.dtype == dtype
        assert {layer.rotary.inv_freq.dtype for layer in loaded.model.layers} == {torch.float32}


def test_autocast_gives_attention_one_dtype(monkeypatch):
    """Under autocast the projections give bf16; the rotary tables must not promote q and k back to
    fp32 beside a bf16 v (flash-attn and flex refuse mixed dtypes), and the packed kernel is chosen
    for the bf16 compute dtype."""
    import soft_ds.model as model_module
    config = preset_config("debug")
    model = Llama.from_weights(config, random_weights(config, 0))
    seen, chosen = [], []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: seen.append((q.dtype, k.dtype, v.dtype)) or sdpa(q, k, v, **kw))
    kernel = model_module.packed_attention_kernel
    monkeypatch.setattr(model_module, "packed_attention_kernel",
                        lambda device_type, dtype: chosen.append(dtype) or kernel(device_type, dtype))
    ids = torch.randint(0, config.vocab_size, (2, 12))
    packed = torch.tensor([list(range(5)) + list(range(7))] * 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.hidden_states(ids, [8])
        model.hidden_states(ids, [8], packed)
    assert seen and set(seen) == {(torch.bfloat16,) * 3}
    assert set(chosen) == {torch.bfloat16}


def test_masked_gqa_attention_repeats_kv_on_cuda_only(monkeypatch):
    """SDPA with a mask and grouped-query attention falls to the math kernel on CUDA (enable_gqa
    runs only in flash, which takes no mask), which materialises (B, h, T, S): there k/v are
    repeated instead, with the same result."""
    import soft_ds.model as model_module
    from soft_ds.model import attention_sdpa, sdpa_expands_kv
    mask = torch.ones(1, 1, 3, 3, dtype=torch.bool).tril()
    assert sdpa_expands_kv("cuda", mask, 4, 2)
    assert not sdpa_expands_kv("cuda", None, 4, 2) and not sdpa_expands_kv("cuda", mask, 4, 4)
    assert not sdpa_expands_kv("cpu", mask, 4, 2)
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 8, generator=generator)
    k, v = (torch.randn(2, 2, 5, 8, generator=generator) for _ in range(2))
    mask = torch.rand(2, 1, 5, 5, generator=generator) > 0.3
    mask[..., 0] = True
    expected = attention_sdpa(q, k, v, mask)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: calls.append((k.shape[1], kw["enable_gqa"])) or sdpa(q, k, v, **kw))
    monkeypatch.setattr(model_module, "sdpa_expands_kv", lambda *args: True)  # as on CUDA
    assert torch.allclose(attention_sdpa(q, k, v, mask), expected, atol=1e-6)
    assert calls == [(4, False)]  # full heads, no enable_gqa: the memory-efficient kernel takes it


def _fake_flash_attn(root, body: str):
    package = root / "flash_attn"
    package.mkdir()
    (package / "__init__.py").write_text(body)


@pytest.fixture
def fresh_flash_probe(monkeypatch, tmp_path):
    """A sys.path entry for a fake flash_attn package, and the kernel probes' caches emptied."""
    import soft_ds.model as model_module
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(__import__("sys").modules, "flash_attn", raising=False)
    monkeypatch.delenv(KERNEL_ENV, raising=False)
    for cached in (model_module.flash_attn_problem, model_module._kernel):
        cached.cache_clear()
    yield tmp_path
    for cached in (model_module.flash_attn_problem, model_module._kernel):
        cached.cache_clear()


def test_broken_flash_attn_falls_back_with_one_line(fresh_flash_probe, monkeypatch, caplog):
    """A flash_attn wheel built against another torch is found but does not import: the kernel is
    flex, one warning line says why, and forcing flash-varlen is an error naming the import error."""
    _fake_flash_attn(fresh_flash_probe, 'raise ImportError("flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDevice")\n')
    with caplog.at_level("WARNING", logger="soft_ds"):
        assert packed_attention_kernel("cuda", torch.bfloat16) == "flex"
        assert packed_attention_kernel("cuda", torch.bfloat16) == "flex"
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "undefined symbol" in lines[0] and "using flex" in lines[0], lines
    monkeypatch.setenv(KERNEL_ENV, "flash-varlen")
    with pytest.raises(ValueError, match="flash_attn is installed but does not import.*undefined symbol"):
        packed_attention_kernel("cuda", torch.bfloat16)


def test_working_flash_attn_is_chosen_for_half_precision_only(fresh_flash_probe):
    _fake_flash_attn(fresh_flash_probe, "def flash_attn_varlen_func(*args, **kwargs):\n    raise NotImplementedError\n")
    assert packed_attention_kernel("cuda", torch.bfloat16) == "flash-varlen"
    assert packed_attention_kernel("cuda", torch.float32) == "flex"  # flash-attn takes fp16/bf16 only
    assert packed_attention_kernel("cpu", torch.bfloat16) == "sdpa-mask"
