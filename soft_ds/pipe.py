"""The LLaMA model cut into DeepSpeed pipeline stages, with SoFT exits computed where they live.

Layer list (global indices):  embed, layer 1, [exit 1], layer 2, [exit 2], ..., layer L, exit L
An exit follows its decoder layer. Every exit runs the *one* shared head (final norm + lm_head):
a `TiedLayerSpec` under the key "head", built once per stage that holds an exit, its gradients
all-reduced across those stages by DeepSpeed. A model with tied embeddings makes the embedding
part of that head (`TiedHead`: final norm + embedding matrix): stage 0 embeds through the same
tied layer, so the one head spans stage 0 and every stage with an exit, and its gradient (the
embedding's plus every exit's) is summed over exactly those stages. The SFT+ICT baseline (exits
with `own_head`) puts an ordinary layer with its own head there instead ("exit_head") and freezes
everything else.

The inter-stage tuple, declared once and asserted by every layer:

    (hidden, running_loss, targets, positions)
    hidden        (B, T, H) float (bf16 under bf16 training; fp32 under autocast)
    running_loss  ()        fp32: sum over the exits passed so far of w_n / sum(w) * L_n (the step's
                            exits and weights: soft_ds.exit_schedule; a skipped exit adds nothing)
    targets       (B, T)    int64 next-token targets, -100 where not counted
    positions     (B, T)    int64 position of each token in its record: 0 where a record starts
                            (packed rows; 0..T-1 when unpacked), from which every decoder layer
                            rebuilds its rotary angles and block-diagonal mask (`model.record_mask`)

Floats come first on purpose: DeepSpeed reuses its receive buffers by tuple position and sends
gradients for float tensors only, so a float after the int64 tensors would receive its gradient
into an int64 tensor's buffer (wrong gradients at >= 3 stages). The last stage's loss is the running
loss: each exit's loss is added on its own stage, so only hidden states cross stage boundaries.
"""

from functools import partial

import torch
import torch.distributed as torch_dist
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from deepspeed.runtime.pipe import schedule
from deepspeed.runtime.pipe.engine import PipelineEngine
from torch import nn

from soft_ds.checkpoint import HEAD_FILE
from soft_ds.exit_schedule import ExitSchedule
from soft_ds.exits import exit_loss
from soft_ds.hf_io import EXIT_HEAD_PREFIX, hf_name
from soft_ds.model import DecoderLayer, HeadView, SharedHead, TiedHead, check_supported, tied_embeddings
from soft_ds.partition import plan_stages

HEAD_KEY = "head"


def unpack(inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    assert isinstance(inputs, tuple) and len(inputs) == 4, \
        f"inter-stage tuple must be (hidden, running_loss, targets, positions), got {type(inputs)} of {len(inputs)}"
    hidden, running_loss, targets, positions = inputs
    assert hidden.is_floating_point() and hidden.dim() == 3, f"hidden: {hidden.dtype} {tuple(hidden.shape)}"
    assert running_loss.dtype == torch.float32 and running_loss.dim() == 0, "running_loss: fp32 scalar"
    assert targets.dtype == torch.int64 and targets.shape == hidden.shape[:2], "targets: int64 (B, T)"
    assert positions.dtype == torch.int64 and positions.shape == hidden.shape[:2], "positions: int64 (B, T)"
    return hidden, running_loss, targets, positions


def embed_forward(module, inputs):
    """(input_ids, targets, positions) -> (hidden, running_loss = 0, targets, positions), through
    `module.embed_tokens` (an EmbeddingPipe's own, or a tied model's TiedHead's)."""
    input_ids, targets, positions = inputs
    hidden = module.embed_tokens(input_ids)
    return hidden, torch.zeros((), dtype=torch.float32, device=hidden.device), targets, positions


class EmbeddingPipe(nn.Module):
    """The token embedding of an untied model."""

    def __init__(self, config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)

    def forward(self, inputs):
        return embed_forward(self, inputs)


def precision(autocast: bool, device_type: str):
    """The context a layer computes in: bf16 matmuls on fp32 weights under `soft.autocast`.

    Each layer enters it itself, not the engine around the whole forward (DeepSpeed's
    `torch_autocast`): activation checkpointing recomputes a layer in backward, outside any
    forward-wide context, and the recomputation must run the forward's arithmetic."""
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast)


class DecoderLayerPipe(DecoderLayer):
    def __init__(self, config, frozen: bool = False, autocast: bool = False):
        super().__init__(config)
        self.frozen = frozen
        self.autocast = autocast

    def forward(self, inputs):
        hidden, running_loss, targets, positions = unpack(inputs)
        if self.frozen:
            # Nothing before a frozen layer trains (SFT+ICT freezes the whole base), so no
            # gradient needs to flow back through it; the engine sends zeros upstream instead.
            hidden = hidden.detach()
        with precision(self.autocast, hidden.device.type):
            # fp32 in, fp32 out: the residual sums bf16 matmul outputs into the fp32 stream.
            hidden = super().forward(hidden, positions)
        return hidden, running_loss, targets, positions


class ExitLossMeter:
    """Per-exit losses seen by this stage since the last `reset` (detached, for logging only)."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.sums: dict[int, torch.Tensor] = {}
        self.counts: dict[int, int] = {}

    def add(self, layer: int, loss: torch.Tensor):
        self.sums[layer] = self.sums.get(layer, 0.0) + loss.detach().float()
        self.counts[layer] = self.counts.get(layer, 0) + 1


class ExitLossSettings:
    """How this stage's exits compute their loss (`exits.exit_loss`), one object shared by them all.

    weight_grad_scale: set by `build_engine` where the fused loss may add the head's weight gradient
    straight into `weight.grad` in the forward pass instead of keeping a (V, H) tensor per exit per
    micro-batch in flight: the gradient the engine's backward brings to the running loss (1 /
    gradient accumulation steps; each exit's loss gets its share of it). Only fp32 training: under
    bf16 DeepSpeed's optimizer clears the bf16 gradients at each backward and reads its own fp32
    copies, so bf16 keeps the weight gradient for backward. Only the shared head: an own head
    (SFT+ICT) is a checkpointable layer, whose forward activation checkpointing would run twice."""

    def __init__(self, implementation: str, chunk_tokens: int, autocast: bool = False):
        self.implementation = implementation
        self.chunk_tokens = chunk_tokens
        self.autocast = autocast  # the head's matmuls in bf16 (logits still reach the loss as fp32)
        self.weight_grad_scale: float | None = None

    def loss(self, head, hidden, targets, share: float, direct: bool) -> torch.Tensor:
        scale = self.weight_grad_scale if direct and self.implementation == "fused" else None
        with precision(self.autocast, hidden.device.type):
            return exit_loss(head, hidden, targets, self.implementation, self.chunk_tokens,
                             weight_grad_factor=None if scale is None else share * scale)


def exit_forward(head, inputs, *, layer: int, shares: dict[int, float], settings: ExitLossSettings,
                 meter: ExitLossMeter, direct: bool = True):
    """Exit after `layer`: add shares[layer] * L_layer to the running loss, pass the hidden state
    on. `shares` is the module's for the current step; an exit absent from it is skipped this step
    and its head does not run."""
    hidden, running_loss, targets, positions = unpack(inputs)
    share = shares.get(layer)
    if share is None:
        return inputs
    loss = settings.loss(head, hidden, targets, share, direct)
    meter.add(layer, loss)
    return hidden, running_loss + share * loss, targets, positions


class OwnHeadExitPipe(SharedHead):
    """An exit with a head of its own (the SFT+ICT baseline), trained while the model is frozen."""

    def __init__(self, config, layer: int, shares: dict[int, float], settings: ExitLossSettings,
                 meter: ExitLossMeter):
        super().__init__(config)
        self.exit_args = dict(layer=layer, shares=shares, settings=settings, meter=meter, direct=False)

    def forward(self, inputs):
        # The head as its parts: passing `self` would call this forward again.
        return exit_forward(HeadView(self.norm, self.output_weight), inputs, **self.exit_args)


def running_loss_of(outputs, _labels=None) -> torch.Tensor:
    """The pipeline's loss_fn: the last stage's running loss is the whole SoFT loss."""
    return unpack(outputs)[1]


def layer_layout(num_layers: int, exits) -> list[tuple[str, int]]:
    """Global pipeline layer list as (kind, layer number): ("embed", 0), ("decoder", i), then after
    an exit's layer ("exit", n) for the shared head or ("exit_head", n) for a head of its own."""
    kinds = {e.layer: "exit_head" if e.own_head else "exit" for e in exits}
    layout = [("embed", 0)]
    for i in range(1, num_layers + 1):
        layout.append(("decoder", i))
        if i in kinds:
            layout.append((kinds[i], i))
    return layout


class SoftPipelineModule(PipelineModule):
    """LLaMA as a DeepSpeed PipelineModule with SoFT exits on exit-aligned stages."""

    def __init__(self, config, exits, topology, seq_len: int, exit_loss: str = "whole", exit_chunk_tokens: int = 0,
                 activation_checkpoint_interval: int = 0, exit_schedule: ExitSchedule = ExitSchedule(),
                 autocast: bool = False):
        check_supported(config)
        self.config = config
        self.exits = tuple(exits)
        self.layout = layer_layout(config.num_hidden_layers, self.exits)
        self.stages = plan_stages(config, [e.layer for e in self.exits], topology.get_dim("pipe"), seq_len)
        self.meter = ExitLossMeter()
        self.exit_loss_settings = ExitLossSettings(exit_loss, exit_chunk_tokens, autocast)
        # SFT+ICT: only the exits' own heads train; the model itself is frozen.
        self.frozen_base = any(e.own_head for e in self.exits)
        self.exit_schedule = exit_schedule
        # {layer: share of the loss} of the exits that run this step, read by every exit layer of
        # this stage: updated in place by `schedule_exits`, never replaced.
        self.shares: dict[int, float] = dict(exit_schedule.shares(self.exits, None))
        self.tied = tied_embeddings(config)
        head_class, head_attrs = (TiedHead, ["norm.weight", "embed_tokens.weight"]) if self.tied \
            else (SharedHead, ["norm.weight", "lm_head.weight"])
        specs = []
        for kind, number in self.layout:
            exit_args = dict(layer=number, settings=self.exit_loss_settings, meter=self.meter, shares=self.shares)
            if kind == "embed" and self.tied:
                specs.append(TiedLayerSpec(HEAD_KEY, head_class, config, tied_weight_attr=head_attrs,
                                           forward_fn=embed_forward))
            elif kind == "embed":
                specs.append(LayerSpec(EmbeddingPipe, config))
            elif kind == "decoder":
                specs.append(LayerSpec(DecoderLayerPipe, config, frozen=self.frozen_base, autocast=autocast))
            elif kind == "exit_head":
                specs.append(LayerSpec(OwnHeadExitPipe, config, **exit_args))
            else:
                # forward_fn keeps DeepSpeed from saving the head once per exit (8 copies at 13B):
                # save_state_dict below writes it once.
                specs.append(TiedLayerSpec(HEAD_KEY, head_class, config, tied_weight_attr=head_attrs,
                                           forward_fn=partial(exit_forward, **exit_args)))
        super().__init__(layers=specs, topology=topology, loss_fn=running_loss_of,
                         partition_method="exit_aligned",
                         activation_checkpoint_interval=activation_checkpoint_interval)
        if self.frozen_base:
            for name, param in self.local_hf_parameters().items():
                param.requires_grad_(name.startswith(EXIT_HEAD_PREFIX))

    def schedule_exits(self, step: int | None):
        """Run optimizer step `step`'s exits at their shares (the same on every rank: a function of
        the seed and the step); None: every exit at its configured share (validation)."""
        self.shares.clear()
        self.shares.update(self.exit_schedule.shares(self.exits, step))

    def extra_parameters(self) -> int:
        """Parameters the exits' own heads add to the model, over the whole pipeline (SFT+ICT)."""
        head = self.config.hidden_size * (self.config.vocab_size + 1)  # lm_head + norm
        return head * sum(e.own_head for e in self.exits)

    # -- partitioning --------------------------------------------------------------------------
    def _partition_layers(self, method="exit_aligned"):
        # Stage s holds the layer-list entries from its first decoder layer (stage 0: from the
        # embedding) up to and including its last decoder layer's exit, if any.
        parts = [0]
        for stage in self.stages[:-1]:
            end = self.layout.index(("decoder", stage.last_layer)) + 1
            if end < len(self.layout) and self.layout[end][0] != "decoder":  # its exit
                end += 1
            parts.append(end)
        parts.append(len(self.layout))
        self.parts = parts
        stage_id = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=parts[stage_id], stop=parts[stage_id + 1])

    def in_shared_head(self, kind: str) -> bool:
        """Whether a layer of this kind runs the shared head module (the tie key HEAD_KEY)."""
        return kind == "exit" or (kind == "embed" and self.tied)

    def fill_unused_tied_gradients(self):
        """Give each trainable tied weight this stage holds but did not use a zero gradient.

        Stage 0 of a tied model without an exit holds the final norm (part of the tied head) and
        never runs it. The engine all-reduces each tied gradient over the stages that hold the
        weight, but skips a missing one (fp32: `grad` None; bf16: no `_hp_grad`, which only a
        gradient creates), and the other stages would then wait on a collective this stage never
        joins. A zero joins the sum instead, so the update, hence the weight, stays identical on
        every stage. A frozen weight (SFT+ICT) has no gradient on any stage and stays out."""
        for weight, _ in self.get_tied_weights_and_groups():
            if weight.requires_grad and weight.grad is None:
                weight.grad = torch.zeros_like(weight)

    def _synchronize_tied_weights(self):
        # DeepSpeed broadcasts the tied parameters in place with autograd on, which records a node
        # without a backward kernel on them (deprecated by torch); copying weights needs no graph.
        with torch.no_grad():
            super()._synchronize_tied_weights()

    def local_layout(self) -> list[tuple[str, int]]:
        return self.layout[self._local_start:self._local_stop]

    # -- weights under Hugging Face names ------------------------------------------------------
    def local_hf_parameters(self) -> dict[str, torch.nn.Parameter]:
        """{HF name: parameter} for every parameter this stage holds (the shared head once)."""
        out = {}
        for (kind, number), func in zip(self.local_layout(), self.forward_funcs):
            module = self.tied_modules[HEAD_KEY] if self.in_shared_head(kind) else func
            out.update({hf_name(kind, number, local): p for local, p in module.named_parameters()})
        return out

    @torch.no_grad()
    def load_hf_weights(self, weight_source):
        """Copy weights in from `weight_source(names) -> {name: tensor}`, reading only this stage's."""
        params = self.local_hf_parameters()
        tensors = weight_source(sorted(params))
        for name, param in params.items():
            tensor = tensors[name]
            if tensor.shape != param.shape:
                raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != model {tuple(param.shape)}")
            param.copy_(tensor)

    # -- checkpoints: the tied head (with a tied model's embedding) is written once --------------
    def save_state_dict(self, save_dir, checkpoint_engine, exclude_frozen_params=False):
        super().save_state_dict(save_dir, checkpoint_engine, exclude_frozen_params)
        # One writer for the head: data-parallel replica 0, first stage that holds it.
        comm = self.tied_comms.get(HEAD_KEY)
        if (HEAD_KEY in self.tied_modules and self._grid.data_parallel_id == 0
                and (comm is None or self.global_rank == min(comm["ranks"]))):
            head = self.tied_modules[HEAD_KEY].state_dict()
            checkpoint_engine.save({k: v.clone() for k, v in head.items()}, f"{save_dir}/{HEAD_FILE}")

    def load_state_dir(self, load_dir, checkpoint_engine, strict=True):
        if HEAD_KEY in self.tied_modules:
            self.tied_modules[HEAD_KEY].load_state_dict(
                checkpoint_engine.load(f"{load_dir}/{HEAD_FILE}", map_location="cpu"), strict=strict)
        super().load_state_dir(load_dir, checkpoint_engine, strict)

    # -- per-exit losses, reduced over the whole job -------------------------------------------
    def reduce_exit_losses(self) -> dict[int, float]:
        """Mean loss per exit since the last meter reset, averaged over data-parallel ranks and
        gathered from every stage (a collective: every rank calls it). Exits that did not run (a
        step's skipped exits) are left out."""
        layers = [e.layer for e in self.exits]
        device = next(self.parameters()).device
        values = torch.zeros(2, len(layers), dtype=torch.float64, device=device)  # (loss, ran) per exit
        for i, layer in enumerate(layers):
            if layer in self.meter.sums:  # device arithmetic: the one host sync is tolist() below
                values[0, i] = self.meter.sums[layer].to(device, torch.float64) / self.meter.counts[layer]
                values[1, i] = 1.0
        torch_dist.all_reduce(values, group=self.world_group)  # each exit lives on one stage
        values /= self._grid.data_parallel_size
        self.meter.reset()
        return {layer: loss for layer, loss, ran in zip(layers, *values.tolist()) if ran > 0}


class SoftPipelineEngine(PipelineEngine):
    """PipelineEngine with two fixes SoFT needs.

    * Non-last stages run one `torch.autograd.backward` over all float outputs that require grad.
      The stock engine backpropagates each output separately with retain_graph (the stage's work
      done twice), and fails on a running_loss that does not require grad (a stage before any
      exit, as in SFT on several stages).
    * fp32 gradient clipping without ZeRO: the stock path reduces the norm over the wrong group
      (it measured the first stage only); here the norm is summed over the pipeline, counting the
      tied head once.
    """

    def train_batch(self, data_iter=None):
        # This step's exits, from the optimizer step count (restored on resume): no communication.
        self.module.schedule_exits(self.global_steps)
        return super().train_batch(data_iter)

    def eval_batch(self, *args, **kwargs):
        self.module.schedule_exits(None)  # validation measures every exit
        return super().eval_batch(*args, **kwargs)

    def _exec_backward_pass(self, buffer_id):
        if self.is_last_stage():
            return PipelineEngine._exec_backward_pass(self, buffer_id)
        assert not self.is_pipe_partitioned, "tensor-parallel partitioning is not supported"
        outputs = self.pipe_buffers["outputs"][buffer_id]
        floats = [t for t in outputs if t.is_floating_point()]
        assert len(floats) == len(self.grad_layer)
        pairs = [(out, grad) for out, grad in zip(floats, self.grad_layer) if out.requires_grad]
        if self.using_bf16_optimizer:
            self.optimizer.clear_lp_grads()
        self._running_engine_backward = True
        try:
            if pairs:  # none on an SFT+ICT stage that holds no trainable head
                torch.autograd.backward([out for out, _ in pairs], [grad for _, grad in pairs])
        finally:
            self._running_engine_backward = False
        self.module.fill_unused_tied_gradients()  # before bf16 copies gradients to fp32
        if self.using_bf16_optimizer and not self._config.bfloat16_config.immediate_grad_update:
            self.optimizer.update_hp_grads(clear_lp_grads=False)
        self.pipe_buffers["output_tensors"][buffer_id] = None
        self.pipe_buffers["outputs"][buffer_id] = None

    def _exec_send_grads(self, buffer_id):
        # An input the stage's loss does not depend on (the hidden state entering a frozen
        # SFT+ICT stage) has no gradient; the previous stage expects one tensor per float input.
        # Only there: anywhere else a missing gradient is a bug, and DeepSpeed's assertion stays.
        inputs = self.pipe_buffers["inputs"][buffer_id]
        for tensor in inputs if self.module.frozen_base and isinstance(inputs, tuple) else ():
            if tensor.is_floating_point() and tensor.grad is None:
                tensor.grad = torch.zeros_like(tensor)
        return PipelineEngine._exec_send_grads(self, buffer_id)

    def clip_fp32_gradients(self):
        max_norm = self.gradient_clipping()
        params = [p for p in self.module.parameters() if p.grad is not None]
        # Replicated tied parameters (the head on all but its first stage) count once.
        owned = [p for p in params if not getattr(p, "ds_pipe_replicated", False)]
        squares = torch.zeros((), dtype=torch.float64, device=self.device)
        for p in owned:
            squares += p.grad.detach().double().pow(2).sum()
        if self.is_pipe_parallel:
            torch_dist.all_reduce(squares, group=self.grid.get_pipe_parallel_group())
        total_norm = squares.sqrt().float()
        # Kept on the device: read back only when a progress line prints it (float() there).
        self._global_grad_norm = total_norm
        clip = (max_norm / (total_norm + 1e-6)).clamp(max=1.0)
        for p in params:
            p.grad.detach().mul_(clip.to(p.grad.dtype))

    _INSTRUCTION_MAP = {**PipelineEngine._INSTRUCTION_MAP, schedule.BackwardPass: _exec_backward_pass,
                        schedule.SendGrad: _exec_send_grads}


def build_pipeline(config, exits, pipeline_stages: int, seq_len: int, weight_source, exit_loss: str = "whole",
                   exit_chunk_tokens: int = 0, activation_checkpointing: bool = False,
                   exit_schedule: ExitSchedule = ExitSchedule(), autocast: bool = False) -> SoftPipelineModule:
    """The stage of the model this rank holds, with its weights loaded (distributed must be up)."""
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology
    world = torch_dist.get_world_size()
    topology = PipeDataParallelTopology(num_pp=pipeline_stages, num_dp=world // pipeline_stages)
    module = SoftPipelineModule(config, exits, topology, seq_len, exit_loss=exit_loss,
                                exit_chunk_tokens=exit_chunk_tokens,
                                activation_checkpoint_interval=1 if activation_checkpointing else 0,
                                exit_schedule=exit_schedule, autocast=autocast)
    module.load_hf_weights(weight_source)
    return module


def direct_weight_gradient_exact(engine) -> bool:
    """Whether the fused exit loss may add the head's weight gradient straight into `weight.grad`.

    Only in fp32 (bf16's optimizer reads its own fp32 gradient buffers), and not where the ZeRO
    optimizer overlaps communication: that reduces each gradient from a hook that autograd fires
    when it accumulates the gradient, which a gradient written directly never fires. DeepSpeed
    (0.17-0.19) turns `overlap_comm` off for every PipelineModule, whatever the config says, so
    this asks the optimizer it built rather than the config."""
    if engine.bfloat16_enabled() or engine.fp16_enabled():
        return False
    return not getattr(engine.optimizer, "overlap_comm", False)


def build_engine(module: SoftPipelineModule, ds_config: dict, optimizer=None,
                 lr_multiplier=None, direct_weight_gradient: bool = True) -> SoftPipelineEngine:
    """The DeepSpeed engine; lr_multiplier(step) -> LR / peak LR gives the schedule.
    direct_weight_gradient: let the fused exit loss add the head's weight gradient in the forward
    pass where that is exact (fp32; see ExitLossSettings); False keeps it for backward everywhere."""
    import deepspeed
    scheduler = None
    if lr_multiplier is not None:
        scheduler = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_multiplier)  # noqa: E731
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, config=ds_config, lr_scheduler=scheduler,
        model_parameters=[p for p in module.parameters() if p.requires_grad])
    # deepspeed.initialize always builds a plain PipelineEngine; ours only overrides methods.
    engine.__class__ = SoftPipelineEngine
    if direct_weight_gradient and direct_weight_gradient_exact(engine):
        # The last stage's backward starts from loss / gradient_accumulation_steps (fp32: no loss
        # scaling); the running loss passes that gradient unchanged to every exit before it.
        module.exit_loss_settings.weight_grad_scale = 1.0 / engine.gradient_accumulation_steps()
    return engine
