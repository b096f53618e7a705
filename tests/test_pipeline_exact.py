"""The pipeline computes exactly the SoFT loss and its gradients.

Each case launches the real `deepspeed` launcher on CPU ranks (gloo), trains two steps with
SGD(lr=1) (so a parameter update *is* the gradient) and compares, for every parameter on every
rank, against a plain single-process PyTorch computation of the same loss on the same weights and
batches. Four stages catch the inter-stage tuple-order bug (a float after the int64 targets
receives its gradient into the wrong buffer). The packed cases carry several records per row
(positions restarting at each record, attention confined to it) through the same tuple.

The tied cases tie the embedding to the lm_head: one matrix whose gradient is the embedding's plus
every exit's, summed over stage 0 and the stages with exits. tied_pp2_dp2_clip_fused's stage 0 holds the
embedding and exits 2 and 4; tied_pp4_sft_zero0_clip_fused's stage 0 holds no exit (the tie spans stages
0 and 3 only, and stage 0 holds the final norm without using it).
"""

import glob
import json
import os

import pytest
import torch

from conftest import deepspeed_launch
from _pipeline_worker import SEED, reference_run
from soft_ds.exit_schedule import ExitSchedule

# The fused exit loss (gradients computed in the forward pass) in chunks of 5 counted tokens: a micro-batch
# has up to 32 positions, so several chunks and a ragged last one. In fp32 it adds the head's weight
# gradient straight into weight.grad (ZeRO-1 and ZeRO-0, tied and untied) unless told to keep it.
FUSED = ["--exit-loss", "fused", "--chunk-tokens", 5]
TOL = 1e-6  # absolute, for losses
# Parameters: relative to the parameter's largest entry (at least 1). After SGD at lr 1 an entry is
# its gradient, and a tied embedding's gradient sums thousands of fp32 terms in another order than
# the reference's: worst seen 1.2e-6 of the largest entry (2.15e-6 at 1.81: packed, tied, dp 2,
# act-ckpt, chunked, on an AMD EPYC; the rounding depends on the CPU's kernels). A lost or doubled
# gradient moves entries by tens of percent.
PARAM_TOL = 4e-6
# bf16 and autocast cases (DeepSpeed's bf16 optimizer; torch_autocast) against the fp32 reference:
# (loss, parameters) with the same scaling. bf16 keeps 8 bits of mantissa (a step of 2^-8 = 0.4 %); after two SGD steps at lr 1.0 the
# entries differ by up to 0.6 % of the largest, where a wrong share or a lost gradient moves them by
# tens of percent.
BF16_TOL = (1e-3, 2e-2)
CASES = {
    # name: (processes, worker args, reference args); the reference is always the whole plain loss.
    "pp1": (1, ["--pp", 1, "--gas", 2], dict(mode="soft", gas=2, dp=1, clip=0.0)),
    "pp2_sft_zero0_clip_fused_kept": (2, ["--pp", 2, "--gas", 2, "--zero", 0, "--clip", 0.5, "--mode", "sft",
                                          *FUSED, "--kept-weight-gradient"], dict(mode="sft", gas=2, dp=1, clip=0.5)),
    "pp4_clip_fused": (4, ["--pp", 4, "--gas", 3, "--clip", 0.5, *FUSED], dict(mode="soft", gas=3, dp=1, clip=0.5)),
    "pp2_dp2_actckpt_chunked": (4, ["--pp", 2, "--gas", 2, "--act-ckpt", "--exit-loss", "chunked", "--chunk-tokens", 7],
                                dict(mode="soft", gas=2, dp=2, clip=0.0)),
    "tied_pp1": (1, ["--pp", 1, "--gas", 2, "--tied"], dict(mode="soft", gas=2, dp=1, clip=0.0, tied=True)),
    "tied_pp2_dp2_clip_fused": (4, ["--pp", 2, "--gas", 2, "--clip", 0.5, "--tied", *FUSED],
                                dict(mode="soft", gas=2, dp=2, clip=0.5, tied=True)),
    "tied_pp4_sft_zero0_clip_fused": (4, ["--pp", 4, "--gas", 3, "--zero", 0, "--clip", 0.5, "--mode", "sft", "--tied",
                                          *FUSED], dict(mode="sft", gas=3, dp=1, clip=0.5, tied=True)),
    # Packed rows (positions and record mask through the tuple, after the floats), 4 stages.
    "packed_pp4_clip": (4, ["--pp", 4, "--gas", 3, "--clip", 0.5, "--packed"],
                        dict(mode="soft", gas=3, dp=1, clip=0.5, packed=True)),
    "packed_tied_pp2_dp2_actckpt_chunked": (4, ["--pp", 2, "--gas", 2, "--act-ckpt", "--exit-loss", "chunked",
                                                "--chunk-tokens", 7, "--tied", "--packed"],
                                            dict(mode="soft", gas=2, dp=2, clip=0.0, tied=True, packed=True)),
    # Exit schedules (soft_ds.exit_schedule): random-k runs the last layer and one other exit each
    # step, so two of stages 0-2 skip their only exit (their head copy gets no gradient of its own);
    # the warm-up skips stage 0's exits at step 0 (a tied head: the embedding still uses it) and
    # weighs them 1/2 at step 1.
    "random_k_pp4_clip": (4, ["--pp", 4, "--gas", 3, "--clip", 0.5, "--exit-schedule", "random-k",
                              "--exit-sample-k", 2],
                          dict(mode="soft", gas=3, dp=1, clip=0.5, schedule=ExitSchedule("random-k", 2, 0, SEED))),
    # bf16, ZeRO-1: the exit loss "auto" runs under bf16 (chunked), on a tied model; and the fused loss,
    # which under bf16 keeps its weight gradient for backward.
    "bf16_tied_pp2_chunked": (2, ["--pp", 2, "--gas", 2, "--bf16", "--tied", "--exit-loss", "chunked",
                                  "--chunk-tokens", 5], dict(mode="soft", gas=2, dp=1, clip=0.0, tied=True)),
    "bf16_pp2_fused": (2, ["--pp", 2, "--gas", 2, "--bf16", *FUSED], dict(mode="soft", gas=2, dp=1, clip=0.0)),
    # torch_autocast (fp32 weights, bf16 matmuls), ZeRO-1 over 2 data-parallel ranks, a tied head:
    # activation checkpointing must recompute each layer under the same autocast as its forward.
    "autocast_tied_pp2_dp2_actckpt_chunked": (4, ["--pp", 2, "--gas", 2, "--autocast", "--act-ckpt", "--tied",
                                                  "--exit-loss", "chunked", "--chunk-tokens", 5],
                                              dict(mode="soft", gas=2, dp=2, clip=0.0, tied=True)),
    # ... and the fused loss, whose weight gradient autocast leaves fp32, so it is added directly.
    "autocast_pp2_fused": (2, ["--pp", 2, "--gas", 2, "--autocast", *FUSED], dict(mode="soft", gas=2, dp=1, clip=0.0)),
    "warmup_tied_pp2_dp2": (4, ["--pp", 2, "--gas", 2, "--tied", "--exit-warmup", 2],
                            dict(mode="soft", gas=2, dp=2, clip=0.0, tied=True, schedule=ExitSchedule(warmup_steps=2))),
    # ZeRO's overlap_comm reduces gradients from autograd hooks, which a gradient written straight
    # into .grad never fires; DeepSpeed turns it off for pipelines, so the direct write stays exact.
    "overlap_comm_pp2_dp2_fused": (4, ["--pp", 2, "--gas", 2, "--overlap-comm", *FUSED],
                                   dict(mode="soft", gas=2, dp=2, clip=0.0)),
    # Packed rows under autocast through SDPA, and through flash-varlen (tests/standin/flash_attn: the
    # real kernel's argument contract, computed with SDPA) under autocast and under bf16.
    "packed_autocast_pp2": (2, ["--pp", 2, "--gas", 2, "--autocast", "--packed"],
                            dict(mode="soft", gas=2, dp=1, clip=0.0, packed=True)),
    "flash_packed_autocast_pp2_actckpt": (2, ["--pp", 2, "--gas", 2, "--autocast", "--packed", "--act-ckpt",
                                              "--flash-standin"], dict(mode="soft", gas=2, dp=1, clip=0.0, packed=True)),
    "flash_packed_bf16_tied_pp2": (2, ["--pp", 2, "--gas", 2, "--bf16", "--packed", "--tied", "--flash-standin"],
                                   dict(mode="soft", gas=2, dp=1, clip=0.0, packed=True, tied=True)),
}
STEPS = 2


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    """One `deepspeed` launch per process count runs all of that count's cases in turn: {case: folder}."""
    out = tmp_path_factory.mktemp("pipeline")
    folders = {}
    for procs in sorted({procs for procs, _, _ in CASES.values()}):
        group = {name: worker_args for name, (n, worker_args, _) in CASES.items() if n == procs}
        cases_file = out / f"cases_{procs}.json"
        cases_file.write_text(json.dumps({name: list(map(str, a)) for name, a in group.items()}))
        deepspeed_launch(procs, "tests/_pipeline_worker.py", "--out", out, "--steps", STEPS, "--cases", cases_file)
        folders.update({name: out / name for name in group})
    return folders


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, launches):
    procs, _, ref_args = CASES[request.param]
    ranks = [torch.load(f) for f in sorted(glob.glob(os.path.join(launches[request.param], "rank*.pt")))]
    assert len(ranks) == procs
    return ranks, reference_run(steps=STEPS, **ref_args), ref_args


def tolerances(request) -> tuple[float, float]:
    """(loss, parameter) tolerances of the running case."""
    args = CASES[request.node.callspec.params["case"]][1]
    return BF16_TOL if "--bf16" in args or "--autocast" in args else (TOL, PARAM_TOL)


def test_loss_matches_reference(request, case):
    ranks, (losses, exit_losses, _), _ = case
    tol = tolerances(request)[0]
    for rank in ranks:
        for step in range(STEPS):
            assert abs(rank["losses"][step] - losses[step]) <= tol, (rank["stage"], step)
            assert set(rank["exit_losses"][step]) == set(exit_losses[step]), step  # the exits that ran
            for layer, value in exit_losses[step].items():
                assert abs(rank["exit_losses"][step][layer] - value) <= tol, (layer, step)


def test_every_parameter_update_matches_reference(request, case):
    ranks, (_, _, params), _ = case
    tol = tolerances(request)[1]
    for rank in ranks:
        assert rank["params"][0], "a stage without parameters"
        for step in range(STEPS):
            for name, value in rank["params"][step].items():
                ref = params[step][name]
                diff = (value.float() - ref).abs().max().item()
                scale = max(1.0, ref.abs().max().item())
                assert diff <= tol * scale, f"stage {rank['stage']} dp {rank['dp_rank']} step {step} {name}: {diff}"
    # The whole model is covered once the stages are put together.
    covered = set().union(*(r["params"][0] for r in ranks))
    assert covered == set(params[0])


def test_updates_are_not_trivial(case):
    """Guard against a vacuous comparison: training moved every parameter."""
    _, (losses, _, params), ref_args = case
    first, last = params[0], params[-1]
    assert all(not torch.equal(first[k], last[k]) for k in first)
    assert losses[0] > 0


def test_fused_cases_add_the_weight_gradient_directly(request, case):
    """The fp32 fused cases run the direct weight gradient (so the comparisons above test it), the
    kept case, the bf16 one and the others do not."""
    ranks, _, _ = case
    args = CASES[request.node.callspec.params["case"]][1]
    expected = "fused" in args and "--kept-weight-gradient" not in args and "--bf16" not in args
    assert all(rank["direct_weight_gradient"] == expected for rank in ranks)
    # overlap_comm asked for: DeepSpeed's pipeline engine built its ZeRO optimizer without it (were
    # it on, build_engine would keep the weight gradient: pipe.direct_weight_gradient_exact).
    assert all(rank["overlap_comm"] in (False, None) for rank in ranks)


def test_bf16_runs_accumulate_gradients_in_fp32(launches):
    """bf16 under ZeRO-1 gets DeepSpeed's BF16_Optimizer (fp32 gradient accumulation, from
    config.precision_keys), not the ZeRO optimizer that sums bf16 gradients; and every cast leaves
    the rotary frequencies fp32."""
    bf16 = [name for name, (_, args, _) in CASES.items() if "--bf16" in args]
    assert bf16
    for name in bf16:
        ranks = [torch.load(f) for f in glob.glob(os.path.join(launches[name], "rank*.pt"))]
        assert ranks and {rank["optimizer"] for rank in ranks} == {"BF16_Optimizer"}, name
        assert {dtype for rank in ranks for dtype in rank["inv_freq_dtypes"]} == {"torch.float32"}, name


def test_host_syncs_per_train_batch_stay_within_budget(request, case):
    """A GPU waits for the device at each value read back. Per micro-batch and stage at most: the
    counted rows (their number depends on the data; every exit of the stage shares them) and
    whether any row holds a second record (the positions travel with every micro-batch; +2 for
    flash-varlen's record offsets and longest record); per train_batch DeepSpeed's own: its ZeRO
    optimizer's overflow check, and with clipping its norm check. Nothing per layer or per exit.
    The first step is left out: DeepSpeed exchanges the tensors' shapes there once."""
    ranks, _, _ = case
    args = CASES[request.node.callspec.params["case"]][1]
    micro_batches = args[args.index("--gas") + 1]
    per_micro_batch = 2 + 2 * ("--flash-standin" in args)
    budget = micro_batches * per_micro_batch + 1 + ("--clip" in args)
    for rank in ranks:
        for step, syncs in enumerate(rank["host_syncs"][1:], start=1):
            assert sum(syncs.values()) <= budget, (rank["stage"], step, syncs, budget)
            assert not {"equal", "item"} & set(syncs), (rank["stage"], step, syncs)


def test_attention_kernels_get_one_dtype(request, case):
    """Every attention kernel call of every rank got q, k and v in one dtype, the case's compute
    dtype (flash-attn and flex refuse mixed dtypes; SDPA under autocast would hide them); the
    flash-varlen cases really ran the stand-in kernel."""
    ranks, _, _ = case
    args = CASES[request.node.callspec.params["case"]][1]
    dtype = "bfloat16" if "--bf16" in args or "--autocast" in args else "float32"
    for rank in ranks:
        calls = rank["attention_calls"]
        assert calls, f"stage {rank['stage']}: no attention call seen"
        for key in calls:
            assert key.endswith(f"({dtype}, {dtype}, {dtype})"), (rank["stage"], key)
        flash = sum(n for key, n in calls.items() if key.startswith("flash_attn_varlen_func"))
        assert (flash > 0) == ("--flash-standin" in args), (rank["stage"], calls)


def test_matmuls_run_in_the_cases_precision(request, case):
    """bf16 and autocast cases really compute in bf16 (their tolerance is not covering an fp32 run),
    the others in fp32."""
    ranks, _, _ = case
    args = CASES[request.node.callspec.params["case"]][1]
    expected = ["torch.bfloat16"] if "--bf16" in args or "--autocast" in args else ["torch.float32"]
    assert all(rank["matmul_dtypes"] == expected for rank in ranks)


def test_tied_head_identical_on_every_stage(case):
    """The shared head's copies (with a tied model's embedding) end identical on every rank."""
    ranks, _, ref_args = case
    tied = ref_args.get("tied", False)
    names = ["model.norm.weight", "model.embed_tokens.weight" if tied else "lm_head.weight"]
    holders = [r for r in ranks if names[1] in r["params"][-1]]
    # Tied: stage 0 holds the matrix (and the final norm) too, whether or not it has an exit.
    last = max(r["stage"] for r in ranks)
    assert {r["stage"] for r in holders} >= ({0, last} if tied else {last})
    for rank in holders[1:]:
        for name in names:
            assert name in rank["params"][-1], (rank["stage"], name)
            assert torch.equal(rank["params"][-1][name], holders[0]["params"][-1][name])
