"""Runs a few SoFT training steps on the DeepSpeed pipeline (launched by the `deepspeed` launcher
from tests/test_pipeline_exact.py) and saves, per rank, its parameters after every step and the
losses. Also the single-process reference the test compares against (`reference_run`)."""

import argparse
import contextlib
import json
import os
import sys

import torch
from torch.overrides import TorchFunctionMode

from soft_ds.config import precision_keys
from soft_ds.exit_schedule import ExitSchedule
from soft_ds.exits import IGNORE_INDEX, exit_loss, make_exits
from soft_ds.model import DecoderLayer, Llama, preset_config, random_weights

SEQ_LEN, MICRO_BATCH, SEED = 16, 2, 0
STANDIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "standin")  # tests/standin/flash_attn


def tiny_config(tied=False):
    """The debug preset; tied: its embedding is also the lm_head (tie_word_embeddings)."""
    return preset_config("debug", tie_word_embeddings=tied)


def make_batches(step: int, count: int, vocab: int, packed: bool = False) -> list[tuple[torch.Tensor, ...]]:
    """`count` micro-batches (input_ids, targets, positions) for one step; targets masked like real
    data: a prompt part and right padding at -100, and one micro-batch with nothing counted at
    step 1. packed: each row holds records of 2..7 tokens back to back, positions restarting at
    each, each record with its own prompt part and its last target at -100 (as data.batching.collate_rows)."""
    g = torch.Generator().manual_seed(1000 + step)
    batches = []
    for m in range(count):
        ids = torch.randint(0, vocab, (MICRO_BATCH, SEQ_LEN), generator=g)
        targets = torch.randint(0, vocab, (MICRO_BATCH, SEQ_LEN), generator=g)
        positions = torch.arange(SEQ_LEN).repeat(MICRO_BATCH, 1)  # (B, T)
        for b in range(MICRO_BATCH):
            if packed:
                start = 0
                while start < SEQ_LEN - 2:
                    length = min(int(torch.randint(2, 8, (1,), generator=g)), SEQ_LEN - start)
                    prompt = int(torch.randint(1, length, (1,), generator=g))
                    targets[b, start:start + prompt] = IGNORE_INDEX
                    targets[b, start + length - 1] = IGNORE_INDEX
                    positions[b, start:] -= positions[b, start].clone()
                    start += length
                targets[b, start:] = IGNORE_INDEX  # padding
                continue
            prompt = int(torch.randint(1, SEQ_LEN // 2, (1,), generator=g))
            pad = int(torch.randint(0, SEQ_LEN // 3, (1,), generator=g))
            targets[b, :prompt] = IGNORE_INDEX
            if pad:
                targets[b, -pad:] = IGNORE_INDEX
        if step == 1 and m == count - 1:
            targets[:] = IGNORE_INDEX
        batches.append((ids, targets, positions))
    return batches


def reference_run(mode, gas, dp, steps, clip, lr=1.0, tied=False, packed=False, schedule=ExitSchedule()):
    """Plain PyTorch: the same SoFT loss (mean over all micro-batches of the step, each exit's loss
    the whole plain cross-entropy whatever the pipeline's exit loss implementation), SGD(lr),
    optional clipping; each step over the exits `schedule` runs at it, at their weights (the weighted
    mean over those exits, computed here rather than from the schedule's shares). Returns per-step losses, per-step exit losses,
    per-step parameters (a tied model's one embedding/head matrix as model.embed_tokens.weight: its
    gradient sums both uses)."""
    config = tiny_config(tied)
    model = Llama.from_weights(config, random_weights(config, SEED))
    all_exits = make_exits(None, config.num_hidden_layers, mode=mode)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    losses, exit_history, params = [], [], []
    for step in range(steps):
        batches = make_batches(step, gas * dp, config.vocab_size, packed)
        weights = schedule.weights(all_exits, step)  # {layer: weight} of the exits that run
        optimizer.zero_grad()
        total, per_exit = 0.0, {layer: 0.0 for layer in weights}
        for ids, targets, positions in batches:
            hidden = model.hidden_states(ids, list(weights), positions)
            exit_losses = {n: exit_loss(model.head, h, targets) for n, h in hidden.items()}
            soft = sum(exit_losses[n] * w for n, w in weights.items()) / sum(weights.values())
            loss = soft / len(batches)
            loss.backward()
            total += loss.item()
            for n, value in exit_losses.items():
                per_exit[n] += value.item() / len(batches)
        if clip:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            assert norm > clip, f"gradient norm {norm} below {clip}: this case would not test clipping"
        optimizer.step()
        losses.append(total)
        exit_history.append(per_exit)
        params.append({k: v.detach().clone() for k, v in model.named_parameters()})
    return losses, exit_history, params


def parse_case(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--pp", type=int, required=True)
    parser.add_argument("--gas", type=int, default=2)
    parser.add_argument("--zero", type=int, default=1)
    parser.add_argument("--clip", type=float, default=0.0)
    parser.add_argument("--mode", default="soft")
    parser.add_argument("--act-ckpt", action="store_true")
    parser.add_argument("--exit-loss", default="whole", help="the pipeline's exit loss implementation")
    parser.add_argument("--chunk-tokens", type=int, default=0)
    parser.add_argument("--kept-weight-gradient", action="store_true",
                        help="the fused loss keeps its weight gradient for backward even where fp32 would add it directly")
    parser.add_argument("--tied", action="store_true", help="tie the embedding to the lm_head")
    parser.add_argument("--packed", action="store_true", help="several records per row")
    parser.add_argument("--bf16", action="store_true", help="DeepSpeed's bf16 training (its BF16 optimizer)")
    parser.add_argument("--autocast", action="store_true", help="fp32 weights, bf16 matmuls (soft.autocast)")
    parser.add_argument("--overlap-comm", action="store_true", help="ZeRO's overlap_comm (gradient hooks)")
    parser.add_argument("--flash-standin", action="store_true",
                        help="packed attention through tests/standin/flash_attn (flash-varlen's contract, on CPU)")
    parser.add_argument("--exit-schedule", default="all")
    parser.add_argument("--exit-sample-k", type=int, default=0)
    parser.add_argument("--exit-warmup", type=int, default=0)
    return parser.parse_args([str(a) for a in argv])


def case_schedule(args) -> ExitSchedule:
    return ExitSchedule(args.exit_schedule, args.exit_sample_k, args.exit_warmup, SEED)


def run_case(args, steps: int) -> dict:
    """One case on this rank: build the pipeline and engine, train `steps` steps, return what the
    test compares (this rank's stage, losses and parameters after every step)."""
    from soft_ds.pipe import build_engine, build_pipeline

    world = torch.distributed.get_world_size()
    dp = world // args.pp
    config = tiny_config(args.tied)
    exits = make_exits(None, config.num_hidden_layers, mode=args.mode)
    module = build_pipeline(config, exits, args.pp, SEQ_LEN, random_weights(config, SEED),
                            exit_loss=args.exit_loss, exit_chunk_tokens=args.chunk_tokens,
                            activation_checkpointing=args.act_ckpt, exit_schedule=case_schedule(args),
                            autocast=args.autocast)
    ds_config = {
        "train_micro_batch_size_per_gpu": MICRO_BATCH, "gradient_accumulation_steps": args.gas,
        "train_batch_size": MICRO_BATCH * args.gas * dp, "gradient_clipping": args.clip,
        "zero_optimization": {"stage": args.zero, "overlap_comm": args.overlap_comm},
        "zero_allow_untested_optimizer": True,
        "pipeline": {"use_reentrant": False, "activation_checkpoint_interval": int(args.act_ckpt)},
        "steps_per_print": 10**9, "bf16": {"enabled": args.bf16}, **precision_keys(args.bf16),
    }
    optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=1.0)
    engine = build_engine(module, ds_config, optimizer, direct_weight_gradient=not args.kept_weight_gradient)
    direct = module.exit_loss_settings.weight_grad_scale is not None and args.exit_loss == "fused"
    # The dtype each decoder-layer matmul produced (bf16 under bf16 or autocast, fp32 otherwise).
    matmul_dtypes = set()
    first_layer = next(m for m in module.modules() if isinstance(m, DecoderLayer))
    first_layer.self_attn.q_proj.register_forward_hook(
        lambda _module, _inputs, output: matmul_dtypes.add(str(output.dtype)))
    dp_rank = engine.grid.get_data_parallel_rank()
    result = {"stage": engine.stage_id, "dp_rank": dp_rank, "losses": [], "exit_losses": [], "params": [],
              "direct_weight_gradient": direct, "optimizer": type(engine.optimizer).__name__, "host_syncs": [],
              "overlap_comm": getattr(engine.optimizer, "overlap_comm", None),
              "inv_freq_dtypes": sorted({str(m.rotary.inv_freq.dtype) for m in module.modules()
                                         if isinstance(m, DecoderLayer)})}
    with attention_probe() as attention_calls:
        for step in range(steps):
            batches = make_batches(step, args.gas * dp, config.vocab_size, args.packed)
            mine = batches[dp_rank * args.gas:(dp_rank + 1) * args.gas]
            with HostSyncCounter() as syncs:
                loss = engine.train_batch(iter([((ids, t, positions), t) for ids, t, positions in mine]))
            result["host_syncs"].append(syncs.counts)
            result["losses"].append(float(loss))
            result["exit_losses"].append(module.reduce_exit_losses())
            result["params"].append({k: v.detach().clone() for k, v in module.local_hf_parameters().items()})
    engine.destroy()
    result["matmul_dtypes"] = sorted(matmul_dtypes)
    result["attention_calls"] = attention_calls
    return result


class HostSyncCounter(TorchFunctionMode):
    """Counts, by name, the calls in its block that make the host wait for the device on a GPU: a
    value read back (item, tolist, bool, int, float), a comparison read back (torch.equal) and an
    output whose size depends on the data (nonzero). On CPU they cost nothing, but they are the
    same calls a GPU run makes, so their number per train_batch is the GPU's sync count."""

    SYNCS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__,
             torch.Tensor.__float__, torch.equal, torch.Tensor.nonzero, torch.nonzero}

    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.SYNCS:
            self.counts[func.__name__] = self.counts.get(func.__name__, 0) + 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def attention_probe():
    """Every attention kernel call of the block, as {"kernel (q, k, v dtypes)": count}: SDPA and the
    flash-attn stand-in (a kernel gets one dtype for q, k and v, or flash-attn and flex refuse it)."""
    import torch.nn.functional as F
    calls = {}
    wrapped = {F: "scaled_dot_product_attention"}
    if "flash_attn" in sys.modules:
        wrapped[sys.modules["flash_attn"]] = "flash_attn_varlen_func"
    originals = {owner: getattr(owner, name) for owner, name in wrapped.items()}

    def probe(kernel, original):
        def call(q, k, v, *args, **kwargs):
            key = f"{kernel} ({q.dtype}, {k.dtype}, {v.dtype})".replace("torch.", "")
            calls[key] = calls.get(key, 0) + 1
            if kernel == "flash_attn_varlen_func":
                # The stand-in's own contract checks read values back; the real kernel does not.
                with torch._C.DisableTorchFunction():
                    return original(q, k, v, *args, **kwargs)
            return original(q, k, v, *args, **kwargs)
        return call

    for owner, name in wrapped.items():
        setattr(owner, name, probe(name, originals[owner]))
    try:
        yield calls
    finally:
        for owner, name in wrapped.items():
            setattr(owner, name, originals[owner])


@contextlib.contextmanager
def packed_kernel(args):
    """--flash-standin: packed rows go through flash-varlen, served by the stand-in module (CPU)."""
    if not args.flash_standin:
        yield
        return
    import soft_ds.model as model
    sys.path.insert(0, STANDIN)
    import flash_attn  # noqa: F401  (the stand-in)
    choose = model._kernel
    model._kernel = lambda device_type, dtype, forced: "flash-varlen"
    try:
        yield
    finally:
        model._kernel = choose
        sys.path.remove(STANDIN)


def main():
    """Every case of one launch, in turn, in the same processes: a launch costs each rank its
    imports and process-group start (seconds each on a small machine), so the test groups the cases
    by process count and launches once per count."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--cases", required=True, help="JSON file: {case name: [worker arguments]}")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()

    from soft_ds.distributed import init_distributed

    init_distributed("gloo")
    rank = torch.distributed.get_rank()
    with open(args.cases) as f:
        cases = json.load(f)
    for name, case_args in cases.items():
        case = parse_case(case_args)
        with packed_kernel(case):
            result = run_case(case, args.steps)
        os.makedirs(os.path.join(args.out, name), exist_ok=True)
        torch.save(result, os.path.join(args.out, name, f"rank{rank}.pt"))
        torch.distributed.barrier()


if __name__ == "__main__":
    main()
