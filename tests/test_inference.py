"""soft_ds.inference and its commands on the "debug" tiny model, in float64 so that token equality with
a reference cannot be broken by rounding (the batched and cached kernels sum in other orders)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import run_cli
from test_model import hf_reference

from soft_ds import inference
from soft_ds.bench import inference as benchmark_inference
from soft_ds.inference import command as generate_command
from soft_ds.inference import Sampling, SoftGenerator, speculative_accept
from soft_ds.inference import KVCache
from soft_ds.model import Llama, preset_config

REPO = Path(__file__).resolve().parent.parent
MAX_NEW = 10


def hf_model(config, seed=0) -> transformers.LlamaForCausalLM:
    """A random HF LLaMA in float64 with perturbed norms (test_model.hf_reference)."""
    return hf_reference(config, seed).double()


def ours(hf, embed_scale=1.0, head_scale=1.0) -> SoftGenerator:
    """Our model on HF's weights. embed_scale > 1 makes the residual stream dominated by the
    embedding, so shallow exits often agree with the full model (as SoFT training makes them);
    head_scale > 1 makes the softmax peaked, so exits are sometimes confident."""
    model = Llama(hf.config)
    model.load_state_dict(hf.state_dict(), strict=True)
    model = model.double()
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(embed_scale)
        model.lm_head.weight.mul_(head_scale)
    return SoftGenerator(model)


def hf_submodel(hf, n) -> transformers.LlamaForCausalLM:
    """An HF LLaMA of `hf`'s first n layers, with its embedding, final norm and head (tied if it is)."""
    sub = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_dict(
        {**hf.config.to_dict(), "num_hidden_layers": n})).eval().to(hf.dtype)
    sub.load_state_dict({name: tensor for name, tensor in hf.state_dict().items()
                         if not name.startswith("model.layers.") or int(name.split(".")[2]) < n}, strict=True)
    return sub


def hf_greedy(model, prompts) -> list[list[int]]:
    """transformers' greedy `generate`, one prompt at a time (no padding), MAX_NEW tokens each."""
    return [model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                           do_sample=False, max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW, eos_token_id=None,
                           pad_token_id=0)[0, len(prompt):].tolist() for prompt in prompts]


def exits_taken(generation) -> list[int]:
    """The exit layer of every token a dynamic-exit generation emitted, over all its prompts."""
    return [layer for sequence in generation.exit_layers for layer in sequence]


def random_prompts(count, seed, vocab=512, max_len=24):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (count,), generator=generator).tolist()
    return [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in lengths]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a shared machine a second OpenMP thread
    spinning for a busy core can make these tests many times slower. (The benchmark sets it too.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def hf():
    return hf_model(preset_config("debug"))  # 8 layers, hidden 64, 4 heads over 2 kv heads, vocab 512


@pytest.fixture(scope="module")
def plain(hf):
    return ours(hf)


@pytest.fixture(scope="module")
def agreeing(hf):
    return ours(hf, embed_scale=10.0)


@pytest.fixture(scope="module")
def peaked(hf):
    return ours(hf, embed_scale=3.0, head_scale=30.0)


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(6, seed=1)


# --- 1. any exit ------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 5, 8])
def test_exit_generation_equals_hf_submodel_generate(hf, plain, prompts, n):
    """Exit n, batched with left padding == an HF LLaMA of the first n layers, one prompt at a time."""
    ours_batched = plain.generate(prompts, exit_layer=n, max_new_tokens=MAX_NEW).tokens
    assert ours_batched == hf_greedy(hf_submodel(hf, n), prompts)
    # ...and the exits really differ (the comparison above could not pass with the wrong depth).
    assert plain.generate(prompts, exit_layer=1, max_new_tokens=MAX_NEW).tokens != ours_batched


def test_batched_equals_unbatched(plain, prompts):
    batched = plain.generate(prompts, exit_layer=3, max_new_tokens=MAX_NEW).tokens
    assert batched == [plain.generate([prompt], exit_layer=3, max_new_tokens=MAX_NEW).tokens[0] for prompt in prompts]


def test_eos_stops_each_sequence(plain, prompts):
    free = plain.generate(prompts, max_new_tokens=MAX_NEW).tokens
    eos = free[0][3]
    stopped = plain.generate(prompts, max_new_tokens=MAX_NEW, eos_token_id=eos).tokens
    for full, cut in zip(free, stopped):
        expected = full[:full.index(eos) + 1] if eos in full else full
        assert cut == expected
    assert len(stopped[0]) <= 4


def test_sampling_is_seeded_and_top_p_near_zero_is_greedy(plain, prompts):
    one = plain.generate(prompts, max_new_tokens=MAX_NEW, sampling=Sampling(1.0, 0.9, seed=3)).tokens
    assert one == plain.generate(prompts, max_new_tokens=MAX_NEW, sampling=Sampling(1.0, 0.9, seed=3)).tokens
    assert one != plain.generate(prompts, max_new_tokens=MAX_NEW, sampling=Sampling(1.0, 0.9, seed=4)).tokens
    nucleus_of_one = plain.generate(prompts, max_new_tokens=MAX_NEW, sampling=Sampling(1.0, 1e-9, seed=3)).tokens
    assert nucleus_of_one == plain.generate(prompts, max_new_tokens=MAX_NEW).tokens


def test_bad_arguments_name_the_problem(plain, prompts):
    with pytest.raises(ValueError, match="out of range"):
        plain.generate(prompts, exit_layer=9)
    with pytest.raises(ValueError, match="draft exit 8 is out of range"):
        plain.generate_speculative(prompts, draft_exit=8)
    with pytest.raises(ValueError, match="draft_tokens"):
        plain.generate_speculative(prompts, draft_exit=2, draft_tokens=0)
    with pytest.raises(ValueError, match="threshold"):
        plain.generate_dynamic(prompts, threshold=1.5)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        plain.generate([[5], []])
    with pytest.raises(ValueError, match="top_p"):
        Sampling(1.0, 0.0)


# --- 2. self-speculative decoding ---------------------------------------------------------------


@pytest.mark.parametrize("draft_exit,k", [(1, 1), (2, 3), (4, 5), (6, 2), (7, 4)])
def test_speculative_greedy_equals_full_greedy(agreeing, draft_exit, k):
    """24 prompts of 1..24 tokens in batches of 1, 3, 8 and 12: identical to plain full greedy."""
    many = random_prompts(24, seed=7)
    full = agreeing.generate(many, max_new_tokens=MAX_NEW).tokens
    got, drafted, accepted = [], 0, 0
    start = 0
    for size in (1, 3, 8, 12):
        result = agreeing.generate_speculative(many[start:start + size], draft_exit, k, max_new_tokens=MAX_NEW)
        got += result.tokens
        drafted, accepted = drafted + result.drafted, accepted + result.accepted
        start += size
    assert got == full
    # Partial acceptance: rejections, rollbacks and holes in batches were all exercised.
    assert 0.05 < accepted / drafted < 0.95


def test_speculative_with_eos_equals_full(agreeing):
    many = random_prompts(8, seed=8)
    eos = agreeing.generate(many, max_new_tokens=MAX_NEW).tokens[2][4]
    full = agreeing.generate(many, max_new_tokens=MAX_NEW, eos_token_id=eos).tokens
    assert agreeing.generate_speculative(many, 3, 4, max_new_tokens=MAX_NEW, eos_token_id=eos).tokens == full
    assert any(len(tokens) < MAX_NEW for tokens in full)


def test_speculative_shares_the_draft_layers_cache(agreeing, monkeypatch):
    """After the prompt, layers[:n] only ever see one new token (the draft's steps) and layers[n:]
    see each round's k + 1 tokens in one call: the verifier reuses the draft's layer-n states."""
    calls = []
    original = type(agreeing.model.model.layers[0]).forward_cached

    def counting(layer, x, cos, sin, cache, index):
        calls.append((index, x.shape[1]))
        return original(layer, x, cos, sin, cache, index)

    monkeypatch.setattr(type(agreeing.model.model.layers[0]), "forward_cached", counting)
    prompts, n, k = random_prompts(3, seed=9), 3, 4
    result = agreeing.generate_speculative(prompts, n, k, max_new_tokens=13)
    width = max(map(len, prompts))
    decode = [(index, rows) for index, rows in calls if rows != width]  # drop the prompt's pass
    shallow = [rows for index, rows in decode if index < n]
    deep = [rows for index, rows in decode if index >= n]
    assert set(shallow) == {1}
    assert len(deep) == result.steps * (8 - n)
    assert max(deep) == k + 1
    assert sum(shallow) / n == sum(deep) / (8 - n)  # every token through every layer exactly once


def test_speculative_sampling_keeps_the_target_distribution():
    """Monte Carlo: the first emitted token of a round is distributed as p, whatever q is."""
    torch.manual_seed(0)
    V, B = 5, 40000
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05], dtype=torch.float64)
    q = torch.tensor([0.1, 0.1, 0.3, 0.2, 0.3], dtype=torch.float64)
    generator = torch.Generator().manual_seed(1)
    drafts = torch.multinomial(q.expand(B, V), 1, replacement=True, generator=generator)  # (B, 1)
    target = torch.stack([p, torch.full((V,), 1.0 / V, dtype=torch.float64)]).expand(B, 2, V)
    accepted, after = speculative_accept(drafts, q.expand(B, 1, V), target, generator)
    first = torch.where(accepted >= 1, drafts[:, 0], after)
    frequencies = torch.bincount(first, minlength=V).double() / B
    assert (frequencies - p).abs().max() < 0.01
    assert 0.3 < accepted.double().mean() < 0.9  # both branches taken


def test_speculative_sampling_path_with_one_token_nucleus_is_greedy(agreeing):
    many = random_prompts(6, seed=10)
    full = agreeing.generate(many, max_new_tokens=MAX_NEW).tokens
    sampled = agreeing.generate_speculative(many, 2, 3, max_new_tokens=MAX_NEW, sampling=Sampling(1.0, 1e-9))
    assert sampled.tokens == full
    seeded = [agreeing.generate_speculative(many, 2, 3, max_new_tokens=MAX_NEW, sampling=Sampling(0.8, 0.95, seed))
              .tokens for seed in (5, 5, 6)]
    assert seeded[0] == seeded[1] != seeded[2]


# --- 3. dynamic exit ---------------------------------------------------------------------------


@pytest.mark.parametrize("measure", ["max_prob", "margin"])
def test_dynamic_threshold_one_is_full_and_zero_is_first_exit(peaked, prompts, measure):
    full = peaked.generate(prompts, max_new_tokens=MAX_NEW).tokens
    first_exit = peaked.generate(prompts, exit_layer=peaked.exits[0], max_new_tokens=MAX_NEW).tokens
    never = peaked.generate_dynamic(prompts, 1.0, measure, max_new_tokens=MAX_NEW)
    always = peaked.generate_dynamic(prompts, 0.0, measure, max_new_tokens=MAX_NEW)
    assert never.tokens == full and set(exits_taken(never)) == {8}
    assert always.tokens == first_exit and set(exits_taken(always)) == {peaked.exits[0]}
    assert full != first_exit


@pytest.mark.parametrize("batch", [1, 4])
def test_dynamic_exit_fills_deeper_caches_exactly(peaked, monkeypatch, batch):
    """Mixed exits: every token is its exit's choice on the true hidden states, and every cached
    key/value (deep ones of early-exited tokens included) equals a fresh full-depth pass's."""
    caches = []

    class RecordingCache(KVCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            caches.append(self)

    monkeypatch.setattr(inference.core, "KVCache", RecordingCache)
    prompts, threshold = random_prompts(batch, seed=11), 0.5
    result = peaked.generate_dynamic(prompts, threshold, max_new_tokens=16)
    cache = caches[0]
    assert len(set(exits_taken(result))) >= 3
    # Pass j (the prompt, then generated token j - 1) went as deep as token j's latest exit; a pass
    # followed by a deeper one had its missing keys/values filled by that later pass.
    depths = [max(sequence[j] for sequence in result.exit_layers) for j in range(16)]
    refilled = sum(any(later > depths[j] for later in depths[j + 1:]) for j in range(15))
    assert refilled > 0, "no early-exited token was ever carried deeper"

    caches.clear()
    fed = [prompt + tokens[:-1] for prompt, tokens in zip(prompts, result.tokens)]
    with torch.inference_mode():
        reference, _, _ = peaked.prefill(fed, 8, 0)
    assert reference.columns == cache.columns
    valid = cache.valid[:, :cache.columns]
    assert sum(cache.lengths) > 0
    for layer in range(8):
        filled = cache.lengths[layer]
        if filled == 0:  # no pass reached this layer, not even the prompt's
            continue
        for ours_kv, theirs_kv in ((cache.keys, reference.keys), (cache.values, reference.values)):
            difference = (ours_kv[layer][:, :, :filled] - theirs_kv[layer][:, :, :filled]).abs().amax(dim=(1, 3))
            assert difference[valid[:, :filled]].max() < 1e-10, f"layer {layer}"

    # Teacher-forced check of the exit rule on a cache-free forward of the same tokens.
    model = peaked.model
    for prompt, tokens, exits in zip(prompts, result.tokens, result.exit_layers):
        with torch.inference_mode():
            states = model.hidden_states(torch.tensor([prompt + tokens]), range(1, 9))
            for j, (token, exit_layer) in enumerate(zip(tokens, exits)):
                position = len(prompt) - 1 + j
                for layer in peaked.exits:
                    logits = model.head(states[layer][:, position])
                    if layer < exit_layer:
                        assert inference.confidence(logits, "max_prob").item() <= threshold
                    elif layer == exit_layer:
                        assert exit_layer == 8 or inference.confidence(logits, "max_prob").item() > threshold
                        assert logits.argmax(-1).item() == token
                        break


def test_dynamic_per_exit_thresholds(peaked, prompts):
    """All-equal per-exit thresholds are the global threshold; an exit of threshold 1 is never
    taken (nor its head computed); unequal thresholds really change where tokens stop."""
    exits = peaked.exits  # 2, 4, 6, 8
    for threshold in (0.0, 0.5, 0.9):
        same = {layer: threshold for layer in exits if layer < 8}
        ours = peaked.generate_dynamic(prompts, same, max_new_tokens=MAX_NEW)
        reference = peaked.generate_dynamic(prompts, threshold, max_new_tokens=MAX_NEW)
        assert (ours.tokens, ours.exit_layers) == (reference.tokens, reference.exit_layers)
    skipping = peaked.generate_dynamic(prompts, {2: 1.0, 4: 0.0, 6: 0.0}, max_new_tokens=MAX_NEW)
    assert set(exits_taken(skipping)) == {4}
    assert skipping.tokens == peaked.generate(prompts, exit_layer=4, max_new_tokens=MAX_NEW).tokens
    mixed = peaked.generate_dynamic(prompts, {2: 0.9, 4: 0.5}, max_new_tokens=MAX_NEW)
    layers = set(exits_taken(mixed))
    assert layers <= {2, 4, 8} and 4 in layers  # exit 6 is not in the rule
    with pytest.raises(ValueError, match="threshold exit 8 is out of range"):
        peaked.generate_dynamic(prompts, {8: 0.5})
    with pytest.raises(ValueError, match="threshold of exit 2 must be in"):
        peaked.generate_dynamic(prompts, {2: 1.5})


# --- 4b. tied embeddings -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """A tied HF LLaMA (one embedding/lm_head matrix, stored once) and our generator loaded from
    its directory, both in float64."""
    hf = hf_model(preset_config("debug", tie_word_embeddings=True), seed=3)
    directory = tmp_path_factory.mktemp("tied") / "tied"
    hf.save_pretrained(directory)
    generator = SoftGenerator.from_pretrained(directory, dtype=torch.float64)
    assert generator.model.lm_head.weight is generator.model.model.embed_tokens.weight
    return hf, generator


@pytest.mark.parametrize("n", [3, 8])
def test_tied_exit_generation_equals_hf_generate(tied, prompts, n):
    """Exit n of a tied model, batched, == transformers' generate on a tied n-layer model of the same
    weights (n = 8: the model itself), one prompt at a time."""
    hf, generator = tied
    sub = hf_submodel(hf, n)
    assert sub.lm_head.weight.data_ptr() == sub.model.embed_tokens.weight.data_ptr()
    assert generator.generate(prompts, exit_layer=n, max_new_tokens=MAX_NEW).tokens == hf_greedy(sub, prompts)


def test_tied_speculative_and_dynamic_equal_full(tied, prompts):
    _, generator = tied
    full = generator.generate(prompts, max_new_tokens=MAX_NEW).tokens
    speculative = generator.generate_speculative(prompts, 4, 3, max_new_tokens=MAX_NEW)
    assert speculative.tokens == full and speculative.drafted > 0
    first_exit = generator.generate(prompts, exit_layer=generator.exits[0], max_new_tokens=MAX_NEW).tokens
    assert generator.generate_dynamic(prompts, 1.0, max_new_tokens=MAX_NEW).tokens == full
    assert generator.generate_dynamic(prompts, 0.0, max_new_tokens=MAX_NEW).tokens == first_exit
    assert first_exit != full


# --- 5. Hugging Face directory, CLI, benchmark -------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny HF checkpoint with the bundled 4,096-piece tokenizer, as `soft-ds export` writes one."""
    directory = tmp_path_factory.mktemp("ckpt") / "soft"
    config = preset_config("debug", vocab_size=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = hf_model(config, seed=2).float()
    model.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        if (REPO / "data" / "tokenizer" / name).is_file():
            shutil.copy(REPO / "data" / "tokenizer" / name, directory / name)
    return directory, model


def test_from_pretrained_matches_hf(checkpoint):
    directory, hf = checkpoint
    generator = SoftGenerator.from_pretrained(directory)
    assert generator.tokenizer is not None and len(generator.tokenizer) == 4096
    ids = torch.randint(3, 4096, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (generator.model(ids) - hf(ids).logits).abs().max() < 1e-5


def run_generate(args, capsys):
    texts = generate_command.main(args)
    return texts, capsys.readouterr()


def test_generate_cli_modes(checkpoint, capsys, tmp_path):
    directory, _ = checkpoint
    base = ["--model", str(directory), "--max-new-tokens", "8"]
    full, output = run_generate(base + ["--prompt", "Name three primary colors."], capsys)
    assert output.out.strip() == full[0].strip() and len(full) == 1
    assert run_generate(base + ["--prompt", "Name three primary colors.", "--speculative-exit", "3",
                                "--draft-tokens", "2"], capsys)[0] == full
    dynamic, _ = run_generate(base + ["--prompt", "Name three primary colors.", "--dynamic-threshold", "1"], capsys)
    assert dynamic == full
    generator = SoftGenerator.from_pretrained(directory)
    from soft_ds.data.templates import encode_prompt
    exit3 = generator.generate([encode_prompt({"instruction": "Name three primary colors."}, generator.tokenizer)],
                               exit_layer=3, max_new_tokens=8, eos_token_id=2).tokens[0]
    texts, _ = run_generate(base + ["--prompt", "Name three primary colors.", "--exit", "3"], capsys)
    assert texts == [generator.tokenizer.decode(exit3, skip_special_tokens=True).strip()]

    records = [{"instruction": "Add 2 and 3.", "input": ""}, {"instruction": "Translate.", "input": "bonjour"},
               {"instruction": "Name three primary colors."}]
    file = tmp_path / "instructions.json"
    file.write_text(json.dumps(records))
    answers = tmp_path / "answers.json"
    texts, output = run_generate(base + ["--instructions", str(file), "--batch-size", "2", "--output", str(answers),
                                         "--temperature", "0.7", "--top-p", "0.9", "--stats"], capsys)
    assert len(texts) == 3 and output.out.count("--- [") == 3
    assert [record["output"] for record in json.loads(answers.read_text())] == texts
    assert "tokens/s" in output.err


def test_generate_cli_prompts_in_the_template_the_export_records(checkpoint, capsys, tmp_path):
    from _eval_checkpoints import record_chat_template
    from soft_ds.data.templates import encode_prompt
    directory, _ = checkpoint
    chat = record_chat_template(Path(shutil.copytree(directory, tmp_path / "chat")))
    record = {"instruction": "Name three primary colors."}
    generator = SoftGenerator.from_pretrained(chat)
    tokenizer = generator.tokenizer
    expected = {}
    for template in ("chat", "alpaca"):
        tokens = generator.generate([encode_prompt(record, tokenizer, template)], max_new_tokens=8,
                                    eos_token_id=2).tokens[0]
        expected[template] = [tokenizer.decode(tokens, skip_special_tokens=True).strip()]
    assert expected["chat"] != expected["alpaca"]
    base = ["--model", str(chat), "--max-new-tokens", "8", "--prompt", record["instruction"]]
    assert run_generate(base, capsys)[0] == expected["chat"]
    assert run_generate(base + ["--template", "alpaca"], capsys)[0] == expected["alpaca"]
    # The bundled tokenizer alone has no chat template to render.
    refused = run_cli(capsys, "generate", "--model", directory, "--prompt", "Hi", "--template", "chat")
    assert refused.returncode == 2
    assert refused.stderr.startswith("error: template 'chat' needs a tokenizer with a chat template")


def test_generate_starts_without_datasets(checkpoint, tmp_path):
    """`soft-ds generate` formats its prompts (soft_ds.data.templates) and reads a draft vocabulary's
    records (records, targets) without importing `datasets`, a second and more of start-up that only
    training's splits need. A fresh process, since this one has imported everything."""
    directory, _ = checkpoint
    records = tmp_path / "records.json"
    records.write_text(json.dumps([{"instruction": "Add 2 and 3.", "output": "The sum is 5."}]))
    argv = ["--model", str(directory), "--prompt", "Name three primary colors.", "--max-new-tokens", "2",
            "--speculative-exit", "3", "--draft-vocab", "64", "--draft-vocab-data", str(records)]
    code = ("import sys\n"
            "from soft_ds.inference import command\n"  # soft-ds generate
            f"command.main({argv!r})\n"
            "assert 'datasets' not in sys.modules, 'soft-ds generate imported datasets'\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip()  # it did generate


def test_generate_cli_skips_blank_instructions_and_says_so(checkpoint, capsys, caplog, tmp_path):
    """A record with nothing to answer is skipped and reported, the rest answered; one whose task is
    in its input (PandaLM's record 161) is answered."""
    directory, _ = checkpoint
    file = tmp_path / "instructions.json"
    file.write_text(json.dumps([{"instruction": "Add 2 and 3."}, {"instruction": " ", "input": " "},
                                {"instruction": " ", "input": "Name a colour."}]))
    texts, _ = run_generate(["--model", str(directory), "--max-new-tokens", "4", "--instructions", str(file)],
                            capsys)
    assert len(texts) == 2
    assert "skipping 1 record(s) with a blank instruction and input: [1]" in caplog.text


@pytest.mark.parametrize("extra,message", [
    (["--exit", "0"], "--exit 0 is out of range"),
    (["--exit", "9"], "--exit 9 is out of range"),
    (["--speculative-exit", "8"], "--speculative-exit 8 is out of range"),
    (["--speculative-exit", "2", "--draft-tokens", "0"], "--draft-tokens must be a positive integer"),
    (["--dynamic-threshold", "1.5"], "--dynamic-threshold must be in [0, 1]"),
    (["--dynamic-threshold", "-0.1"], "--dynamic-threshold must be in [0, 1]"),
    (["--temperature", "-1"], "--temperature must be >= 0"),
])
def test_generate_cli_rejects_bad_numbers(checkpoint, capsys, extra, message):
    directory, _ = checkpoint
    result = run_cli(capsys, "generate", "--model", directory, "--prompt", "hi", *extra)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_generate_cli_rejects_bad_inputs(checkpoint, capsys, tmp_path):
    directory, _ = checkpoint
    bad_records = tmp_path / "bad.json"
    bad_records.write_text(json.dumps([{"instruction": "ok"}, {"input": "no instruction"}]))
    cases = [
        (["--model", str(directory), "--prompt", "   "], "--prompt is empty"),
        (["--model", str(tmp_path / "missing"), "--prompt", "hi"], "does not exist"),
        (["--model", str(directory), "--instructions", str(tmp_path / "none.json")], "no such file"),
        (["--model", str(directory), "--instructions", str(bad_records)], "record 1 has no 'instruction' string"),
    ]
    for args, message in cases:
        result = run_cli(capsys, "generate", *args)
        assert result.returncode == 2
        assert message in result.stderr


def test_benchmark_smoke(checkpoint, capsys, tmp_path):
    directory, _ = checkpoint
    plot = tmp_path / "speed.png"
    goals = benchmark_inference.main([
        "--model", str(directory), "--num-prompts", "2", "--max-new-tokens", "3", "--repeats", "1",
        "--draft-tokens", "2", "--thresholds", "0,1", "--exits", "2,4,8", "--draft-exits", "4",
        "--proxy-layers", "4", "--proxy-hidden", "64", "--proxy-intermediate", "172", "--proxy-draft-exits", "2",
        "--plot", str(plot)])
    captured = capsys.readouterr()
    out = captured.out
    for text in ("tokens/s", "self-speculative", "dynamic exit", "13B cost proxy", "== summary"):
        assert text in out
    # Progress goes to stderr, a line per timed prompt batch, so that the report stays clean.
    assert "round 1/1, prompt batch 2/2: 6 configurations timed" in captured.err, captured.err
    assert "transformers round 1/1" in captured.err, captured.err
    assert "prompt batch" not in out
    assert set(goals) == {"model", "13B cost proxy"} and all(len(lines) == 3 for lines in goals.values())
    # Every exit, every (draft exit, k) and every threshold has its row, with a speed.
    assert sum(line.split()[0] in ("2", "4", "8") for line in out.splitlines() if "PASS" in line or "MISS" in line
               or "(full)" in line) >= 3
    assert plot.is_file() and plot.stat().st_size > 1000
    model_part = out.split("13B cost proxy")[0]
    drafts = [line.split()[:2] for line in model_part.split("draft  k   head")[1].split("transformers")[0].splitlines()[1:]
              if line.strip()]
    assert drafts == [["4", "2"]]  # --draft-exits 4: exit 2 is measured but drafts nothing
    with pytest.raises(ValueError, match=r"--draft-exits 3: each must be one of the measured exits below the last"):
        benchmark_inference.main(["--model", str(directory), "--exits", "2,4,8", "--draft-exits", "3", "--no-proxy"])


def _speculative_row(speedup, bound, identical=1.0):
    return dict(exit=20, k=4, head="8192", mode="fixed", speedup=speedup, bound=bound, of_bound=speedup / bound,
                acceptance=0.7, identical=identical)


@pytest.mark.parametrize("rows, verdict", [
    ({"speculative": [_speculative_row(1.4, 1.5)], "transformers": [{"exit": 20, "k": 4, "speedup": 0.9}]}, "PASS"),
    ({"speculative": [_speculative_row(1.4, 1.5)], "transformers": [{"exit": 20, "k": 4, "speedup": 1.2}]}, "MISS"),
    ({"speculative": [_speculative_row(1.2, 1.25)]}, "MISS"),  # below 1.3x greedy
    ({"speculative": [_speculative_row(1.4, 1.7)]}, "MISS"),  # 82% of its bound
    ({"speculative": [_speculative_row(1.4, 1.5), _speculative_row(1.0, 1.1, identical=0.99)]}, "MISS"),  # not exact
])
def test_speculative_goal(rows, verdict):
    line = benchmark_inference.speculative_goal(rows)
    assert line.split(": ", 1)[1].startswith(verdict), line
