"""Hugging Face checkpoint I/O against a tiny random LlamaForCausalLM saved in every format."""

import json
import os
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

from soft_ds import hf_io
from soft_ds.hf_io import (
    CheckpointError,
    checkpoint_tensor_names,
    expected_tensor_names,
    load_llama_config,
    load_model,
    load_tensors,
    save_hf_checkpoint,
    stage_tensor_names,
)

TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "data" / "tokenizer"
FORMATS = ("safetensors", "safetensors_sharded", "bin", "bin_sharded")


def tiny_config(**overrides) -> transformers.LlamaConfig:
    """The workhorse tiny LLaMA: 4 layers, hidden 64, GQA (4 query heads over 2 kv heads)."""
    settings = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=128, vocab_size=128,
                    max_position_embeddings=64, tie_word_embeddings=False)
    settings.update(overrides)
    return transformers.LlamaConfig(**settings)


def tiny_model(**overrides) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_config(**overrides)).eval()
    # HF initialises every norm to ones; perturb them so a swapped or dropped norm changes logits.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model


def save_bin(model: transformers.PreTrainedModel, out_dir: Path, shards: int) -> None:
    """Write pytorch_model.bin (shards == 1) or pytorch_model-*.bin + index, as old checkpoints are.

    transformers 5 always writes safetensors, so the .bin layouts are written by hand.
    """
    out_dir.mkdir(parents=True)
    model.config.save_pretrained(out_dir)
    state_dict = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    if shards == 1:
        torch.save(state_dict, out_dir / hf_io.BIN_FILE)
        return
    names = sorted(state_dict)
    weight_map = {}
    for shard in range(shards):
        file_name = f"pytorch_model-{shard + 1:05d}-of-{shards:05d}.bin"
        shard_names = names[shard::shards]
        torch.save({name: state_dict[name] for name in shard_names}, out_dir / file_name)
        weight_map.update({name: file_name for name in shard_names})
    total_size = sum(t.numel() * t.element_size() for t in state_dict.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (out_dir / hf_io.BIN_INDEX_FILE).write_text(json.dumps(index))


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def checkpoints(model, tmp_path_factory):
    """One directory per checkpoint format, all holding `model`."""
    root = tmp_path_factory.mktemp("checkpoints")
    model.save_pretrained(root / "safetensors")
    model.save_pretrained(root / "safetensors_sharded", max_shard_size="50KB")
    save_bin(model, root / "bin", shards=1)
    save_bin(model, root / "bin_sharded", shards=5)
    assert (root / "safetensors" / hf_io.SAFETENSORS_FILE).is_file()
    assert (root / "safetensors_sharded" / hf_io.SAFETENSORS_INDEX_FILE).is_file()
    return {name: root / name for name in FORMATS}


def input_ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(1))  # (B, T)


def shards_of(checkpoint: Path, names) -> set[str]:
    index = json.loads((checkpoint / hf_io.SAFETENSORS_INDEX_FILE).read_text())["weight_map"]
    return {index[name] for name in names}


# ---------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------


def test_expected_names_match_hf_state_dict(model):
    assert expected_tensor_names(model.config) == set(model.state_dict())


def test_expected_names_with_biases_match_hf_state_dict():
    biased = tiny_model(attention_bias=True, mlp_bias=True)
    names = expected_tensor_names(biased.config)
    assert names == set(biased.state_dict())
    assert "model.layers.3.self_attn.o_proj.bias" in names
    assert "model.layers.0.mlp.down_proj.bias" in names


def test_expected_names_for_a_stage(model):
    names = expected_tensor_names(model.config, layers=[1, 2], embed=False, head=False)
    assert names == {n for n in model.state_dict() if n.startswith(("model.layers.1.",
                                                                    "model.layers.2."))}
    first = expected_tensor_names(model.config, layers=[0], head=False)
    assert "model.embed_tokens.weight" in first and "lm_head.weight" not in first
    with pytest.raises(ValueError, match="layer index 4 is outside 0..3"):
        expected_tensor_names(model.config, layers=[4])


@pytest.mark.parametrize("checkpoint_format", FORMATS)
def test_checkpoint_tensor_names(model, checkpoints, checkpoint_format):
    assert checkpoint_tensor_names(checkpoints[checkpoint_format]) == set(model.state_dict())


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("checkpoint_format", FORMATS)
def test_load_config(model, checkpoints, checkpoint_format):
    config = load_llama_config(checkpoints[checkpoint_format])
    assert isinstance(config, transformers.LlamaConfig)
    assert config.num_hidden_layers == 4 and config.num_key_value_heads == 2
    assert config.hidden_size == model.config.hidden_size


@pytest.mark.parametrize("checkpoint_format", FORMATS)
def test_load_tensors_for_a_stage(model, checkpoints, checkpoint_format):
    names = expected_tensor_names(model.config, layers=[2, 3], embed=False, head=True)
    tensors = load_tensors(checkpoints[checkpoint_format], names)
    reference = model.state_dict()
    assert set(tensors) == names
    for name, tensor in tensors.items():
        assert tensor.dtype == reference[name].dtype
        assert torch.equal(tensor, reference[name]), name


@pytest.mark.parametrize("checkpoint_format", FORMATS)
def test_load_missing_names(checkpoints, checkpoint_format):
    path = checkpoints[checkpoint_format]
    missing = [f"model.layers.{i}.mlp.gate_proj.weight" for i in range(4, 11)]  # 7 absent
    with pytest.raises(CheckpointError) as error:
        load_tensors(path, ["model.norm.weight", *missing])
    message = str(error.value)
    assert str(path) in message and "7 requested tensor(s)" in message
    assert "model.layers.4.mlp.gate_proj.weight" in message and "(and 2 more)" in message


def test_only_needed_shards_are_opened(model, checkpoints, monkeypatch):
    path = checkpoints["safetensors_sharded"]
    opened = []
    real_safe_open = hf_io.safe_open

    def spy(file, *args, **kwargs):
        opened.append(Path(file).name)
        return real_safe_open(file, *args, **kwargs)

    monkeypatch.setattr(hf_io, "safe_open", spy)
    names = expected_tensor_names(model.config, layers=[1], embed=False, head=False)
    load_tensors(path, names)
    all_shards = set(json.loads((path / hf_io.SAFETENSORS_INDEX_FILE).read_text())
                     ["weight_map"].values())
    needed = shards_of(path, names)
    assert len(needed) < len(all_shards)  # otherwise the test proves nothing
    assert sorted(opened) == sorted(needed)  # each needed shard once, no others


@pytest.mark.parametrize("checkpoint_format", ["safetensors_sharded", "bin_sharded"])
def test_unneeded_shards_are_never_read(model, checkpoints, checkpoint_format, tmp_path):
    """Corrupt every shard a stage does not need: loading that stage still works."""
    source = checkpoints[checkpoint_format]
    index_name = (hf_io.SAFETENSORS_INDEX_FILE if checkpoint_format.startswith("safetensors")
                  else hf_io.BIN_INDEX_FILE)
    weight_map = json.loads((source / index_name).read_text())["weight_map"]
    names = {"model.layers.0.self_attn.q_proj.weight"}
    needed = {weight_map[name] for name in names}
    path = tmp_path / "ckpt"
    path.mkdir()
    for file in source.iterdir():
        data = file.read_bytes()
        if file.name in set(weight_map.values()) - needed:
            data = b"not a tensor file"
        (path / file.name).write_bytes(data)

    tensors = load_tensors(path, names)
    assert torch.equal(tensors["model.layers.0.self_attn.q_proj.weight"],
                       model.model.layers[0].self_attn.q_proj.weight)
    # Asking for a tensor of a corrupted shard fails and names that shard.
    corrupted = sorted(set(weight_map.values()) - needed)[0]
    victim = next(name for name, shard in weight_map.items() if shard == corrupted)
    with pytest.raises(CheckpointError, match=f"cannot read .*{corrupted}"):
        load_tensors(path, [victim])


def test_tied_head_comes_from_embedding(tmp_path):
    tied = tiny_model(tie_word_embeddings=True)
    tied.save_pretrained(tmp_path / "tied")
    assert "lm_head.weight" not in checkpoint_tensor_names(tmp_path / "tied")
    tensors = load_tensors(tmp_path / "tied", ["lm_head.weight", "model.norm.weight"])
    assert set(tensors) == {"lm_head.weight", "model.norm.weight"}
    assert torch.equal(tensors["lm_head.weight"], tied.model.embed_tokens.weight)
    both = load_tensors(tmp_path / "tied", ["lm_head.weight", "model.embed_tokens.weight"])
    # A copy: fine-tuning the head on a stage must not edit the embedding through shared memory.
    assert both["lm_head.weight"].data_ptr() != both["model.embed_tokens.weight"].data_ptr()


def test_tied_checkpoint_without_embedding_is_an_error(tmp_path):
    tied = tiny_model(tie_word_embeddings=True)
    path = tmp_path / "tied_without_embedding"
    path.mkdir()
    state_dict = {n: t for n, t in tied.state_dict().items() if n not in ("lm_head.weight", hf_io.EMBED_NAME)}
    torch.save(state_dict, path / hf_io.BIN_FILE)
    tied.config.save_pretrained(path)
    message = "tie_word_embeddings=True but no model.embed_tokens.weight: that one tensor is both"
    for names in (["lm_head.weight"], [hf_io.EMBED_NAME, "model.norm.weight"]):
        with pytest.raises(CheckpointError, match=message):
            load_tensors(path, names)
    with pytest.raises(CheckpointError, match=message):
        load_model(path)


def test_stage_tensor_names_tied_and_untied(model):
    tied_config = tiny_config(tie_word_embeddings=True)
    layer_1 = expected_tensor_names(model.config, [1], embed=False, head=False)
    head = {"model.norm.weight", "lm_head.weight"}
    embed_and_norm = {hf_io.EMBED_NAME, "model.norm.weight"}
    # (first stage, has an exit) -> the extra names beside the decoder layer, untied and tied.
    for first, exit_, untied, tied in [(True, False, {hf_io.EMBED_NAME}, embed_and_norm),
                                       (False, True, head, embed_and_norm),
                                       (True, True, head | {hf_io.EMBED_NAME}, embed_and_norm),
                                       (False, False, set(), set())]:
        assert stage_tensor_names(model.config, [1], first, exit_) == layer_1 | untied
        assert stage_tensor_names(tied_config, [1], first, exit_) == layer_1 | tied


def test_untied_checkpoint_without_head_is_an_error(model, checkpoints, tmp_path):
    path = tmp_path / "headless"
    path.mkdir()
    state_dict = {n: t for n, t in model.state_dict().items() if n != "lm_head.weight"}
    torch.save(state_dict, path / hf_io.BIN_FILE)
    model.config.save_pretrained(path)
    with pytest.raises(CheckpointError, match="lacks 1 requested tensor.*lm_head.weight"):
        load_tensors(path, ["lm_head.weight"])


# ---------------------------------------------------------------------------------------------
# load_llama_config errors
# ---------------------------------------------------------------------------------------------


def test_config_errors(model, tmp_path):
    def check(path, problem):
        with pytest.raises(CheckpointError) as error:
            load_llama_config(path)
        assert str(path) in str(error.value)
        assert problem in str(error.value)

    check(tmp_path / "nowhere", "does not exist")
    (tmp_path / "a_file").write_text("x")
    check(tmp_path / "a_file", "is not a directory")

    empty = tmp_path / "empty"
    empty.mkdir()
    check(empty, "has no config.json")

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    check(broken, "is not valid JSON")

    mistral = tmp_path / "mistral"
    mistral.mkdir()
    (mistral / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    check(mistral, "model_type='mistral'")

    no_weights = tmp_path / "no_weights"
    model.config.save_pretrained(no_weights)
    check(no_weights, "has no weight files")


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def logits_of(model_or_dir, ids):
    if not isinstance(model_or_dir, torch.nn.Module):
        model_or_dir = transformers.AutoModelForCausalLM.from_pretrained(
            model_or_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model_or_dir(ids).logits


def test_save_full_model_round_trip(model, tmp_path):
    out = save_hf_checkpoint(model.state_dict(), model.config, tmp_path / "export")
    ids = input_ids()
    assert (logits_of(out, ids) - logits_of(model, ids)).abs().max().item() == 0
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_hidden_layers"] == 4
    assert config["dtype"] == config["torch_dtype"] == "float32"
    assert checkpoint_tensor_names(out) == set(model.state_dict())
    # Loadable by this module too, which is how a later fine-tuning run would start from it.
    assert load_llama_config(out).num_key_value_heads == 2
    # Readable by whoever may read the directory, as the other files are.
    assert {path.name: path.stat().st_mode & 0o777 for path in out.iterdir()}["model.safetensors"] == 0o644


def test_exit_reference_indexing(model):
    """hidden_states[k] is the output of decoder layer k-1 (index 0 is the embedding output)."""
    captured = {}
    hook = model.model.layers[1].register_forward_hook(
        lambda module, args, output: captured.update(h=output[0] if isinstance(output, tuple)
                                                     else output))
    try:
        with torch.no_grad():
            hidden_states = model.model(input_ids(), output_hidden_states=True).hidden_states
    finally:
        hook.remove()
    assert len(hidden_states) == 5  # embeddings + 4 layers
    assert torch.equal(hidden_states[2], captured["h"])


def test_save_exit_layer(model, tmp_path):
    out = save_hf_checkpoint(model.state_dict(), model.config, tmp_path / "exit2", exit_layer=2)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 2
    kept = expected_tensor_names(model.config, layers=[0, 1])
    assert checkpoint_tensor_names(out) == kept

    ids = input_ids()
    with torch.no_grad():
        after_layer_2 = model.model(ids, output_hidden_states=True).hidden_states[2]  # (B, T, H)
        reference = model.lm_head(model.model.norm(after_layer_2))  # (B, T, V)
    exported = logits_of(out, ids)
    assert exported.shape == (2, 11, 128)
    assert (exported - reference).abs().max().item() == 0
    # And it really is a different model from the full one.
    assert (exported - logits_of(model, ids)).abs().max().item() > 1e-3


def test_save_keeps_dtype(model, tmp_path):
    bf16 = {name: tensor.to(torch.bfloat16) for name, tensor in model.state_dict().items()}
    out = save_hf_checkpoint(bf16, model.config, tmp_path / "bf16", exit_layer=3)
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"
    with safe_open(str(out / hf_io.SAFETENSORS_FILE), framework="pt") as file:
        assert {file.get_tensor(name).dtype for name in file.keys()} == {torch.bfloat16}
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert loaded.dtype == torch.bfloat16 and len(loaded.model.layers) == 3


def test_save_tied_model(tmp_path):
    tied = tiny_model(tie_word_embeddings=True)
    out = save_hf_checkpoint(tied.state_dict(), tied.config, tmp_path / "tied")
    ids = input_ids()
    assert (logits_of(out, ids) - logits_of(tied, ids)).abs().max().item() == 0

    drifted = dict(tied.state_dict())
    drifted["lm_head.weight"] = drifted["lm_head.weight"] + 1
    with pytest.raises(CheckpointError, match="lm_head.weight differs"):
        save_hf_checkpoint(drifted, tied.config, tmp_path / "drifted")
    assert not (tmp_path / "drifted").exists()


@pytest.mark.parametrize("exit_layer", [None, 2])
def test_tied_export_keeps_one_matrix(tmp_path, exit_layer):
    """A tied model, as the training checkpoint reader returns it (no lm_head.weight), exports to a
    tied directory with the matrix stored once; transformers and load_model both read it back tied,
    with the logits of exit N."""
    hf = tiny_model(tie_word_embeddings=True)
    hf.save_pretrained(tmp_path / "source")
    ours = load_model(tmp_path / "source").eval()
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    state = dict(ours.named_parameters())
    assert "lm_head.weight" not in state
    out = save_hf_checkpoint(state, ours.config, tmp_path / "export", exit_layer=exit_layer)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    names = checkpoint_tensor_names(out)
    assert hf_io.EMBED_NAME in names and "lm_head.weight" not in names
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert len(loaded.model.layers) == (exit_layer or 4)
    ids = input_ids()
    with torch.no_grad():
        expected = ours(ids, exit_layer=exit_layer)
        assert (logits_of(loaded, ids) - expected).abs().max().item() <= 1e-6
        reloaded = load_model(out).eval()
        assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
        assert (reloaded(ids) - expected).abs().max().item() <= 1e-6
    if exit_layer:  # the exit really differs from the full model
        assert (expected - logits_of(hf, ids)).abs().max().item() > 1e-3


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_overwrite_refusal_and_replacement(model, tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    before = snapshot(out)
    with pytest.raises(CheckpointError, match="exists and is not empty.*overwrite=True"):
        save_hf_checkpoint(model.state_dict(), model.config, out)
    assert snapshot(out) == before
    assert os.listdir(tmp_path) == ["export"]  # no staging directory left behind

    save_hf_checkpoint(model.state_dict(), model.config, out, exit_layer=1, overwrite=True)
    assert not (out / "notes.txt").exists()
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 1
    assert os.listdir(tmp_path) == ["export"]  # no staging or backup directory left behind


def test_empty_out_dir_is_used(model, tmp_path):
    (tmp_path / "export").mkdir()
    save_hf_checkpoint(model.state_dict(), model.config, tmp_path / "export")
    assert (tmp_path / "export" / hf_io.SAFETENSORS_FILE).is_file()


def test_failure_mid_write_leaves_existing_dir_intact(model, tmp_path, monkeypatch):
    out = tmp_path / "export"
    save_hf_checkpoint(model.state_dict(), model.config, out, exit_layer=2)
    before = snapshot(out)

    def failing_save_file(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hf_io, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_hf_checkpoint(model.state_dict(), model.config, out, overwrite=True)
    assert snapshot(out) == before
    assert os.listdir(tmp_path) == ["export"]
    with pytest.raises(OSError, match="disk full"):
        save_hf_checkpoint(model.state_dict(), model.config, tmp_path / "fresh")
    assert os.listdir(tmp_path) == ["export"]


@pytest.mark.parametrize("exit_layer", [0, 5, -1, 2.0, True])
def test_bad_exit_layer_writes_nothing(model, tmp_path, exit_layer):
    out = tmp_path / "nested" / "export"
    with pytest.raises(CheckpointError, match=r"exit_layer .* is out of range: .* must be an integer in 1..4"):
        save_hf_checkpoint(model.state_dict(), model.config, out, exit_layer=exit_layer)
    assert os.listdir(tmp_path) == []


def test_bad_state_dict_writes_nothing(model, tmp_path):
    incomplete = dict(model.state_dict())
    del incomplete["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(CheckpointError, match="lacks 1 tensor.*model.layers.1.mlp.up_proj"):
        save_hf_checkpoint(incomplete, model.config, tmp_path / "export")
    # Missing tensors beyond the exit do not matter.
    save_hf_checkpoint(incomplete, model.config, tmp_path / "exit1", exit_layer=1)

    extra = dict(model.state_dict())
    extra["model.layers.4.mlp.up_proj.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="not LlamaForCausalLM parameters.*layers.4"):
        save_hf_checkpoint(extra, model.config, tmp_path / "extra")

    mixed = dict(model.state_dict())
    mixed["model.norm.weight"] = mixed["model.norm.weight"].half()
    with pytest.raises(CheckpointError, match="mixes dtypes"):
        save_hf_checkpoint(mixed, model.config, tmp_path / "mixed")
    assert sorted(os.listdir(tmp_path)) == ["exit1"]


def test_save_copies_tokenizer(model, tmp_path):
    out = save_hf_checkpoint(model.state_dict(), model.config, tmp_path / "export",
                             tokenizer_dir=TOKENIZER_DIR, exit_layer=2)
    source = transformers.AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    copied = transformers.AutoTokenizer.from_pretrained(str(out))
    text = "Below is an instruction that describes a task. Write a response."
    assert copied(text)["input_ids"] == source(text)["input_ids"]
    assert copied.eos_token_id == source.eos_token_id
