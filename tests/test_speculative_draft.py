"""Cheaper self-speculative drafts: the reduced-vocabulary draft head (FR-Spec) and adaptive draft
length (a confidence stop, Kangaroo; transformers' +2/-1 schedule). The verifier is the full model
in every case, so greedy output must stay the full model's, token for token. The "debug" tiny
model in float64, as in test_inference.py."""

import pytest
import test_inference
import torch
from conftest import run_cli
from test_inference import MAX_NEW, hf_model, ours, random_prompts

from soft_ds.data.records import BUNDLED_RECORDS
from soft_ds.data.targets import frequent_tokens, response_token_counts
from soft_ds.data.tokenizer import BUNDLED_TOKENIZER, load_tokenizer
from soft_ds.inference import Sampling, SoftGenerator, speculative_accept
from soft_ds.inference import command as generate_command
from soft_ds.inference.speculative import ReducedHead
from soft_ds.model import preset_config

REPO_DATA = BUNDLED_RECORDS
VOCAB = 512  # the debug preset's


# test_inference's fixtures: one torch thread (autouse) and a tiny checkpoint with the bundled tokenizer.
one_thread, checkpoint = test_inference.one_thread, test_inference.checkpoint


@pytest.fixture(scope="module")
def agreeing():
    """Shallow exits often agree with the full model (test_inference's `agreeing`)."""
    return ours(hf_model(preset_config("debug")), embed_scale=10.0)


@pytest.fixture(scope="module")
def confident():
    """As `agreeing`, with a sharper head: the draft's top probability spreads over (0.05, 0.5)."""
    return ours(hf_model(preset_config("debug")), embed_scale=10.0, head_scale=10.0)


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    hf = hf_model(preset_config("debug", tie_word_embeddings=True), seed=3)
    directory = tmp_path_factory.mktemp("tied") / "tied"
    hf.save_pretrained(directory)
    generator = SoftGenerator.from_pretrained(directory, dtype=torch.float64)
    with torch.no_grad():
        generator.model.model.embed_tokens.weight.mul_(10.0)  # agreeing exits, as above
    return generator


@pytest.fixture(scope="module")
def many():
    return random_prompts(24, seed=7)


def subset(size, seed=0):
    """`size` distinct ids of the debug vocabulary, in a random order (so the subset's order is not
    the vocabulary's and an index mix-up cannot go unnoticed)."""
    return torch.randperm(VOCAB, generator=torch.Generator().manual_seed(seed))[:size]


def in_batches(generate_fn, prompts, sizes=(1, 3, 8, 12)):
    """Run `generate_fn(batch)` over prompts in batches of the given sizes; concatenated tokens,
    summed drafted and accepted counts."""
    tokens, drafted, accepted, start = [], 0, 0, 0
    for size in sizes:
        result = generate_fn(prompts[start:start + size])
        tokens += result.tokens
        drafted, accepted, start = drafted + result.drafted, accepted + result.accepted, start + size
    assert start == len(prompts)
    return tokens, drafted, accepted


# --- the reduced head --------------------------------------------------------------------------


@pytest.mark.parametrize("model_name", ["agreeing", "tied"])
def test_reduced_head_is_the_full_head_restricted_to_the_subset(request, model_name):
    generator = request.getfixturevalue(model_name)
    ids = subset(100, seed=1)
    head = ReducedHead(generator.model, ids)
    hidden = torch.randn(3, 5, generator.config.hidden_size, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(2))
    full = generator.model.head(hidden)  # (3, 5, V)
    reduced = head(hidden)  # (3, 5, 100)
    assert reduced.shape == (3, 5, 100)
    assert (reduced - full[..., ids]).abs().max() < 1e-12
    # The rows were gathered from the model's own head: a changed subset changes the logits.
    assert (ReducedHead(generator.model, subset(100, seed=2))(hidden) - full[..., ids]).abs().max() > 1e-3


@pytest.mark.parametrize("size", [8, 64, VOCAB])
@pytest.mark.parametrize("model_name", ["agreeing", "tied"])
def test_reduced_vocabulary_greedy_equals_full_greedy(request, many, size, model_name):
    """Batches of 1, 3, 8 and 12: identical to plain full greedy. The subset: the ids full greedy
    produces most often (as FR-Spec ranks the training data's), or every id in a shuffled order."""
    generator = request.getfixturevalue(model_name)
    full = generator.generate(many, max_new_tokens=MAX_NEW).tokens
    produced = torch.bincount(torch.tensor([token for tokens in full for token in tokens]), minlength=VOCAB)
    ids = subset(VOCAB) if size == VOCAB else frequent_tokens(produced, size)
    tokens, drafted, accepted = in_batches(lambda batch: generator.generate_speculative(
        batch, 3, 4, max_new_tokens=MAX_NEW, draft_vocabulary=ids), many)
    assert tokens == full
    plain = in_batches(lambda batch: generator.generate_speculative(batch, 3, 4, max_new_tokens=MAX_NEW), many)
    if size == VOCAB:
        # Every id, in another order: the same drafts as the full head, so the same counts.
        assert (drafted, accepted) == plain[1:]
    else:
        # Drafts accepted and rejected (the random tied model repeats its tokens, so its drafts are
        # all right), and with only 8 ids fewer accepted than the full head's: the subset is used.
        assert 0 < accepted and (accepted < drafted or model_name == "tied")
        if size == 8:
            assert accepted < plain[2]


def test_reduced_vocabulary_with_eos_equals_full(agreeing):
    prompts = random_prompts(8, seed=8)
    eos = agreeing.generate(prompts, max_new_tokens=MAX_NEW).tokens[2][4]
    full = agreeing.generate(prompts, max_new_tokens=MAX_NEW, eos_token_id=eos).tokens
    ids = torch.cat([torch.tensor([eos]), subset(64)[subset(64) != eos]])
    assert agreeing.generate_speculative(prompts, 3, 4, max_new_tokens=MAX_NEW, eos_token_id=eos,
                                         draft_vocabulary=ids).tokens == full


def test_reduced_vocabulary_sampling():
    """q zero outside the subset is valid for speculative sampling: the first emitted token is still
    distributed as p (Monte Carlo), and the acceptance rule sees q > 0 on every drafted token."""
    torch.manual_seed(0)
    V, B = 6, 40000
    p = torch.tensor([0.4, 0.2, 0.15, 0.1, 0.1, 0.05], dtype=torch.float64)
    q = torch.tensor([0.5, 0.0, 0.3, 0.0, 0.2, 0.0], dtype=torch.float64)  # the subset {0, 2, 4}
    generator = torch.Generator().manual_seed(1)
    drafts = torch.multinomial(q.expand(B, V), 1, replacement=True, generator=generator)  # (B, 1)
    target = torch.stack([p, torch.full((V,), 1.0 / V, dtype=torch.float64)]).expand(B, 2, V)
    accepted, after = speculative_accept(drafts, q.expand(B, 1, V), target, generator)
    first = torch.where(accepted >= 1, drafts[:, 0], after)
    assert (torch.bincount(first, minlength=V).double() / B - p).abs().max() < 0.01


def test_reduced_vocabulary_sampling_path(agreeing):
    prompts = random_prompts(6, seed=10)
    full = agreeing.generate(prompts, max_new_tokens=MAX_NEW).tokens
    ids = subset(300)
    one_token_nucleus = agreeing.generate_speculative(prompts, 2, 3, max_new_tokens=MAX_NEW,
                                                      sampling=Sampling(1.0, 1e-9), draft_vocabulary=ids)
    assert one_token_nucleus.tokens == full and one_token_nucleus.accepted > 0
    seeded = [agreeing.generate_speculative(prompts, 2, 3, max_new_tokens=MAX_NEW, sampling=Sampling(0.8, 0.95, seed),
                                            draft_vocabulary=ids).tokens for seed in (5, 5, 6)]
    assert seeded[0] == seeded[1] != seeded[2]


# --- adaptive draft length -----------------------------------------------------------------------


def test_draft_stop_bounds_and_exactness(confident, many):
    full = confident.generate(many, max_new_tokens=MAX_NEW).tokens
    fixed = in_batches(lambda batch: confident.generate_speculative(batch, 3, 4, max_new_tokens=MAX_NEW), many)
    # 0: every draft is confident enough, so it is the fixed-k run.
    assert in_batches(lambda batch: confident.generate_speculative(batch, 3, 4, max_new_tokens=MAX_NEW,
                                                                  draft_stop=0.0), many) == fixed
    # 1: no draft is ever that sure: every round is one full-model step, nothing drafted.
    never = confident.generate_speculative(many, 3, 4, max_new_tokens=MAX_NEW, draft_stop=1.0)
    assert never.tokens == full and never.drafted == 0 and never.steps == MAX_NEW - 1
    # In between: exact, some rounds cut short. (A random model's confidence is not calibrated, so
    # its acceptance need not rise; a SoFT exit's does, see the benchmark.)
    tokens, drafted, accepted = in_batches(lambda batch: confident.generate_speculative(
        batch, 3, 4, max_new_tokens=MAX_NEW, draft_stop=0.2), many)
    assert tokens == full
    assert 0 < accepted < drafted < fixed[1]


def test_adaptive_k_is_exact_and_follows_the_schedule(agreeing, many):
    full = agreeing.generate(many, max_new_tokens=MAX_NEW).tokens
    tokens, drafted, accepted = in_batches(lambda batch: agreeing.generate_speculative(
        batch, 3, 2, max_new_tokens=MAX_NEW, adaptive=True, draft_vocabulary=subset(400)), many)
    assert tokens == full and 0 < accepted < drafted
    # A draft exit identical to the full model accepts everything: k = 1, 3, 5, ... then the end
    # cuts it (a round emits at most the remaining tokens). 1 + 2 + 4 + 6 = 13 tokens in 3 rounds.
    generator = ours(hf_model(preset_config("debug")), embed_scale=1.0)
    with torch.no_grad():
        for layer in generator.model.model.layers[4:]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    result = generator.generate_speculative(random_prompts(1, seed=3), 4, 1, max_new_tokens=13, adaptive=True)
    assert result.tokens == generator.generate(random_prompts(1, seed=3), max_new_tokens=13).tokens
    assert (result.steps, result.drafted, result.accepted) == (3, 1 + 3 + 5, 1 + 3 + 5)
    fixed = generator.generate_speculative(random_prompts(1, seed=3), 4, 1, max_new_tokens=13)
    assert fixed.steps == 6  # 1 + 2 per round


def test_bad_draft_options_name_the_problem(agreeing, many):
    cases = [
        (dict(draft_vocabulary=[3, 512]), r"draft vocabulary has token ids \[512\] outside the vocabulary 0..511"),
        (dict(draft_vocabulary=[3, 3]), "draft vocabulary repeats token ids"),
        (dict(draft_vocabulary=[]), "draft vocabulary must be a non-empty 1-D list"),
        (dict(draft_vocabulary=[0.5]), "draft vocabulary must be a non-empty 1-D list"),
        (dict(draft_stop=1.5), r"draft_stop must be in \[0, 1\]"),
        (dict(draft_stop=-0.1), r"draft_stop must be in \[0, 1\]"),
    ]
    for options, message in cases:
        with pytest.raises(ValueError, match=message):
            agreeing.generate_speculative(many[:2], 3, 4, **options)


# --- token frequencies and the command ----------------------------------------------------------


def test_frequent_response_tokens_of_the_bundled_data():
    tokenizer = load_tokenizer(BUNDLED_TOKENIZER)
    counts = response_token_counts(REPO_DATA, tokenizer, 4096)
    ids = frequent_tokens(counts, 1024)
    assert ids.shape == (1024,) and ids.unique().numel() == 1024
    assert (counts[ids][:-1] >= counts[ids][1:]).all() and counts[ids[-1]] >= counts.sort(descending=True).values[1023]
    assert tokenizer.eos_token_id in ids[:20].tolist()  # every response ends with it
    assert 0.7 < counts[ids].sum() / counts.sum() < 1
    with pytest.raises(ValueError, match="outside the model's vocabulary of 512"):
        response_token_counts(REPO_DATA, tokenizer, 512)


def test_generate_cli_draft_options(checkpoint, capsys):
    directory, _ = checkpoint
    base = ["--model", str(directory), "--max-new-tokens", "8", "--prompt", "Name three primary colors."]
    full = generate_command.main(base)
    capsys.readouterr()
    texts = generate_command.main(base + ["--speculative-exit", "3", "--draft-tokens", "2", "--draft-vocab", "512",
                                  "--draft-stop", "0.1", "--adaptive-k", "--stats"])
    assert texts == full and "draft acceptance" in capsys.readouterr().err
    for extra, message in [
        (["--draft-vocab", "512"], "--draft-vocab: only with --speculative-exit"),
        (["--speculative-exit", "3", "--draft-vocab", "0"], "--draft-vocab must be a positive integer"),
        (["--speculative-exit", "3", "--draft-vocab", "5000"],
         "--draft-vocab 5000 exceeds the model's vocabulary (4096 tokens)"),
        (["--speculative-exit", "3", "--draft-stop", "2"], r"--draft-stop must be in [0, 1]"),
    ]:
        result = run_cli(capsys, "generate", *base, *extra)
        assert result.returncode == 2, extra
        assert message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_benchmark_draft_rows(checkpoint, capsys, tmp_path):
    """The benchmark's reduced-head, draft-stop, adaptive and transformers rows, each identical to
    full greedy, with a bound beside the speedup."""
    from soft_ds.bench import inference as benchmark_inference
    directory, _ = checkpoint
    benchmark_inference.main([
        "--model", str(directory), "--num-prompts", "2", "--max-new-tokens", "4", "--repeats", "1",
        "--draft-tokens", "2", "--thresholds", "1", "--exits", "3,8", "--draft-vocab", "256",
        "--draft-stop", "0.5", "--adaptive-k", "--no-proxy", "--plot", str(tmp_path / "speed.png")])
    out = capsys.readouterr().out
    assert "draft vocabularies: the most frequent response tokens of alpaca_5000.json (top 256:" in out
    rows = [row for row in map(str.split, out.splitlines()) if row[:2] == ["3", "2"] and len(row) > 10]
    kinds = sorted((row[2], " ".join(row[3:-9])) for row in rows)
    assert kinds == sorted((head, mode) for head in ("full", "256") for mode in ("fixed", "stop 0.5", "adaptive"))
    assert all(row[-1] == "100.0%" and row[-7].endswith("x") for row in rows)  # identical; a bound
    transformers_rows = [line.split() for line in out.split("assistant_early_exit")[1].splitlines()[3:5]]
    assert transformers_rows[0][0] == "greedy" and transformers_rows[1][:2] == ["3", "2"]
    assert all(row[-1] == "100.0%" for row in transformers_rows)
    with pytest.raises(ValueError, match="each of --draft-vocab 5000 exceeds the model's vocabulary"):
        benchmark_inference.main(["--model", str(directory), "--draft-vocab", "5000", "--no-proxy"])
    with pytest.raises(ValueError, match=r"each of --draft-stop must be in \[0, 1\]"):
        benchmark_inference.main(["--model", str(directory), "--draft-stop", "1.5", "--no-proxy"])
