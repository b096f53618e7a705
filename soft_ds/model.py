"""Plain-PyTorch LLaMA pieces and the one shared exit head.

No DeepSpeed here: the pipeline wrappers live in `pipe.py`. Parameter names follow Hugging Face's
`LlamaForCausalLM` (`model.layers.{i}.self_attn.q_proj.weight`, ...) so checkpoints load and export
without renaming. The configuration object is a Hugging Face `LlamaConfig`.

A SoFT model is an ordinary LLaMA: exit n is `layers[:n] -> norm -> lm_head`, with the same final
norm and lm_head that the full model uses (`SharedHead`). A model with tied embeddings
(`tie_word_embeddings`, as SmolLM2 and LLaMA 3.2 1B/3B) has one matrix for the input embedding and
every exit's lm_head (`TiedHead` in the pipeline, one shared Parameter in `Llama`). The SFT+ICT
baseline instead gives exit n a head of its own (`Llama.exit_heads`, trained on a frozen model);
the last layer keeps the model's head.
"""

import functools
import importlib.util
import logging
import os
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig

from soft_ds.exits import check_exit_layer
from soft_ds.memo import TensorMemo

# Named tiny models for demos and tests. "debug" is the workhorse of every CPU test.
PRESETS = {
    "debug": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, max_position_embeddings=512),
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=8, num_attention_heads=8,
                 num_key_value_heads=4, vocab_size=4096, max_position_embeddings=1024),
}


# LLaMA 2 shapes (the released config.json files): what the planner and benchmarks size against.
LLAMA2_SIZES = {
    "7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    "13B": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                num_key_value_heads=40, vocab_size=32000),
    "70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=32000),
}


def llama2_config(size: str) -> LlamaConfig:
    return LlamaConfig(**LLAMA2_SIZES[size.upper()])


def preset_config(name: str, **overrides) -> LlamaConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return LlamaConfig(**{**PRESETS[name], **overrides})


def head_dim(config: LlamaConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_parameters(config: LlamaConfig) -> dict:
    # transformers >= 5 keeps rope settings in `rope_parameters`; older configs use rope_theta/rope_scaling.
    params = getattr(config, "rope_parameters", None)
    if params:
        return dict(params)
    params = dict(getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_type", params.pop("type", "default"))
    params["rope_theta"] = getattr(config, "rope_theta", 10000.0)
    return params


def rope_inverse_frequencies(config: LlamaConfig) -> tuple[torch.Tensor, float]:
    """(head_dim/2,) inverse frequencies and the attention scaling, as Hugging Face computes them."""
    params = rope_parameters(config)
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        dim = head_dim(config)
        inv_freq = 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        return inv_freq, 1.0
    if rope_type in ("llama3", "linear"):
        # Static scalings (LLaMA 3.x): reuse transformers' reference formulas.
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
        return ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    raise ValueError(f"rope type {rope_type!r} is not supported (supported: default, llama3, linear)")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and cast back before the weight, exactly as LLaMA does.
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Rotary(nn.Module):
    """Rotary position embedding; cos/sin are computed per call from the positions (cheap).

    `inv_freq` is fp32 whatever the module is cast to. A floating buffer follows `.to(bfloat16)`,
    `.half()` and DeepSpeed's bf16 engine, and bf16 keeps 8 bits of it: the angle at position p is
    p x inv_freq, so at p = 2047 its rounding error is radians, silently. Casts move the buffer to
    their device but keep its fp32 values (`_apply`)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        inv_freq, self.scaling = rope_inverse_frequencies(config)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def _apply(self, fn, recurse=True):
        inv_freq = self.inv_freq
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:  # a dtype cast: keep the fp32 values, take the device
            self.inv_freq = inv_freq.to(self.inv_freq.device)
        return self

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (T,) or (B, T) -> cos, sin of shape (T, head_dim) or (B, T, head_dim)."""
        freqs = positions[..., None].float() * self.inv_freq.float()  # (..., T, head_dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (..., T, head_dim)
        return (emb.cos() * self.scaling).to(dtype), (emb.sin() * self.scaling).to(dtype)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads or config.num_attention_heads
        self.head_dim = head_dim(config)
        bias = getattr(config, "attention_bias", False)
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, hidden, bias=bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """mask: None for plain causal attention (one record per row: right padding, so a real
        token never sees a pad, and pads never reach the loss), or a packed row's `packed_mask`
        in the form its kernel takes (a (B, 1, T, T) boolean tensor for SDPA)."""
        B, T, _ = x.shape
        q, k, v = self._rotated_qkv(x, cos, sin)
        if isinstance(mask, VarlenSpans):  # flash-attn wants (tokens, heads, d) and the records' spans
            from flash_attn import flash_attn_varlen_func
            q, k, v = (t.transpose(1, 2).reshape(B * T, t.shape[1], self.head_dim) for t in (q, k, v))
            y = flash_attn_varlen_func(q, k, v, mask.cu_seqlens, mask.cu_seqlens, mask.max_len, mask.max_len,
                                       causal=True)  # (B*T, h, d)
            return self.o_proj(y.reshape(B, T, self.n_heads * self.head_dim))
        if mask is not None and not isinstance(mask, torch.Tensor):  # flex attention's BlockMask
            y = _flex_attention(q.device.type)(q, k, v, block_mask=mask, enable_gqa=self.n_kv_heads != self.n_heads)
        else:
            y = attention_sdpa(q, k, v, mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def forward_cached(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       cache, layer: int) -> torch.Tensor:
        """New tokens x (B, T, H) at the next columns of `layer` in `cache` (an inference.KVCache);
        cos/sin (B, 1, T, d).

        Appends their keys/values to the cache and attends over everything cached before them
        plus themselves, under the cache's mask (left padding, rejected drafts, causality)."""
        B, T, _ = x.shape
        q, k, v = self._rotated_qkv(x, cos, sin)
        keys, values, mask = cache.append(layer, k, v)  # (B, kv, S, d) x 2, (B, 1, T, S) or None
        y = attention_sdpa(q, keys, values, mask, causal=False)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def _rotated_qkv(self, x, cos, sin):
        """q (B, h, T, d), k and v (B, kv, T, d), all in the projections' dtype: under autocast the
        projections give bf16 while cos/sin come in the fp32 residual's dtype, and bf16 x fp32 would
        promote q and k to fp32 beside a bf16 v, which flash-attn and flex reject."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, h, T, d)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, kv, T, d)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        return q, k, v


def sdpa_expands_kv(device_type: str, mask, q_heads: int, kv_heads: int) -> bool:
    """Whether `attention_sdpa` repeats k/v to q's head count: on CUDA, for grouped-query attention
    under a mask. SDPA's `enable_gqa` runs only in its flash and math kernels, flash takes no mask,
    so a masked GQA call falls to math, which materialises (B, h, T, S) fp32 scores; repeated k/v
    keep the memory-efficient kernel. Elsewhere (CPU) enable_gqa costs nothing and stays."""
    return device_type == "cuda" and mask is not None and kv_heads != q_heads


def attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                   causal: bool | None = None) -> torch.Tensor:
    """SDPA of q (B, h, T, d) over k, v (B, kv, S, d) -> (B, h, T, d). mask: None or a boolean
    (B, 1, T, S) (True: may attend); causal: default is_causal exactly when there is no mask."""
    q_heads, kv_heads = q.shape[1], k.shape[1]
    if sdpa_expands_kv(q.device.type, mask, q_heads, kv_heads):
        # Query head i reads kv head i // (h / kv), as enable_gqa does.
        k, v = (t.repeat_interleave(q_heads // kv_heads, dim=1) for t in (k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None if causal is None else causal,
                                          enable_gqa=k.shape[1] != q_heads)


# Kernels for packed rows' block-diagonal causal attention, fastest first. All compute exact attention
# (no approximation; they differ in speed and rounding only). `packed_attention_kernel` picks the first
# the device has; SOFT_PACKED_ATTENTION names one instead (e.g. to compare them).
PACKED_KERNELS = ("flash-varlen", "flex", "sdpa-mask")
KERNEL_ENV = "SOFT_PACKED_ATTENTION"
FLASH_ATTN_MIN_CAPABILITY = (8, 0)  # flash-attn 2 runs on Ampere (sm80) and newer

logger = logging.getLogger("soft_ds")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the matmuls on `x` run in: autocast's when it is on for x's device, else x's."""
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype


def packed_attention_kernel(device_type: str, dtype: torch.dtype) -> str:
    """flash-attn's varlen kernel (CUDA, bf16/fp16, flash_attn importable on an sm80+ GPU), else flex
    attention (CUDA), else SDPA with a boolean mask (CPU: the only one that trains there; flex's CPU
    version has no backward). `dtype`: the compute dtype (`compute_dtype`), not the residual's."""
    return _kernel(device_type, dtype, os.environ.get(KERNEL_ENV, ""))


@functools.lru_cache(maxsize=None)
def flash_attn_problem() -> str | None:
    """Why flash-attn's varlen kernel cannot run here, or None when it can.

    Probed by importing it, not by finding it: a wheel built against another torch is found, then
    fails to import ("undefined symbol") inside the first step on every rank."""
    try:
        from flash_attn import flash_attn_varlen_func  # noqa: F401
    except ImportError as error:
        if isinstance(error, ModuleNotFoundError) and error.name == "flash_attn":
            return "flash_attn is not installed"
        return f"flash_attn is installed but does not import ({str(error).splitlines()[0][:200]})"
    except Exception as error:  # a broken extension can raise anything while loading
        return f"flash_attn is installed but does not import ({type(error).__name__}: {str(error)[:200]})"
    if torch.cuda.is_available() and torch.cuda.get_device_capability() < FLASH_ATTN_MIN_CAPABILITY:
        major, minor = torch.cuda.get_device_capability()
        return f"flash-attn needs compute capability 8.0 or newer; this GPU has {major}.{minor}"
    return None


@functools.lru_cache(maxsize=None)
def _kernel(device_type: str, dtype: torch.dtype, forced: str) -> str:
    if forced:
        if forced not in PACKED_KERNELS:
            raise ValueError(f"{KERNEL_ENV}={forced!r}: expected one of {', '.join(PACKED_KERNELS)}")
        if forced == "flash-varlen" and (device_type != "cuda" or flash_attn_problem()):
            raise ValueError(f"{KERNEL_ENV}=flash-varlen needs a CUDA device and the flash_attn package: "
                             f"{flash_attn_problem() or f'this run is on {device_type}'}")
        return forced
    if device_type == "cuda":
        if dtype in (torch.float16, torch.bfloat16):
            problem = flash_attn_problem()
            if problem is None:
                return "flash-varlen"
            if problem != "flash_attn is not installed":  # one line, once per process
                logger.warning(f"packed attention: not flash-varlen ({problem}); using flex")
        if importlib.util.find_spec("torch.nn.attention.flex_attention"):
            return "flex"
    return "sdpa-mask"


@functools.lru_cache(maxsize=None)
def _flex_attention(device_type: str):
    from torch.nn.attention.flex_attention import flex_attention
    # Compiled it is a fused kernel; on CPU (only when asked for by name) the eager reference runs.
    return torch.compile(flex_attention, dynamic=False) if device_type == "cuda" else flex_attention


@dataclass(frozen=True)
class VarlenSpans:
    """Packed records as flash-attn's varlen kernel takes them: the rows flattened to B*T tokens,
    cu_seqlens (records + 1,) int32 the offsets where each record starts (and the total), max_len
    the longest record."""
    cu_seqlens: torch.Tensor
    max_len: int


# Every decoder layer of a stage asks for the mask of the same positions tensor: only the first builds it.
_packed_masks = TensorMemo()


def packed_mask(positions: torch.Tensor, kernel: str):
    """Block-diagonal causal attention of packed rows ((B, T) positions, 0 where a record starts) in
    `kernel`'s form; None when no row holds a second record (plain causal attention then). Built once
    per positions tensor (the layers of one forward share it; `memo.TensorMemo`)."""
    return _packed_masks.get(positions, kernel, lambda p: _build_packed_mask(p, kernel))


def _build_packed_mask(positions: torch.Tensor, kernel: str):
    # Host syncs, once per micro-batch and stage (a GPU waits for each): whether any row holds a
    # second record (if none, plain causal attention is exact and faster); for flash-varlen also the
    # records' offsets (their count depends on the data) and the longest record (an int argument).
    starts = positions == 0  # (B, T)
    if not starts[:, 1:].any():
        return None
    if kernel == "sdpa-mask":
        return _block_causal(starts)
    if kernel == "flash-varlen":
        B, T = positions.shape
        begins = starts.reshape(-1).nonzero().squeeze(1)  # every row starts a record: rows never merge
        ends = torch.cat((begins, begins.new_tensor([B * T])))
        return VarlenSpans(ends.to(torch.int32), int((ends[1:] - ends[:-1]).max()))
    from torch.nn.attention.flex_attention import create_block_mask
    record = starts.cumsum(-1)  # (B, T) record number of each token

    def same_record_causal(b, h, q, kv):
        return (record[b, q] == record[b, kv]) & (q >= kv)

    B, T = positions.shape
    return create_block_mask(same_record_causal, B, None, T, T, device=positions.device)


def record_mask(positions: torch.Tensor) -> torch.Tensor | None:
    """Block-diagonal causal attention for packed rows: (B, T) positions, 0 where a record starts
    -> (B, 1, T, T) bool, True where query i may attend key j (j <= i, same record). None when no
    row holds a second record, so one record per row keeps SDPA's causal kernel (and its numbers).
    The tail padding continues the last record's positions: it attends to that record and no
    counted token attends to it."""
    starts = positions == 0  # (B, T)
    if not starts[:, 1:].any():
        return None
    return _block_causal(starts)


def _block_causal(starts: torch.Tensor) -> torch.Tensor:
    """(B, T) record starts -> (B, 1, T, T) bool: same record and j <= i."""
    record = starts.cumsum(-1)  # (B, T) record number of each token
    T = starts.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=starts.device).tril()  # (T, T)
    return ((record[:, :, None] == record[:, None, :]) & causal)[:, None]  # (B, 1, T, T)


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        bias = getattr(config, "mlp_bias", False)
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)
        self.rotary = Rotary(config)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, H) -> (B, T, H). positions: None for 0..T-1 (one record per row), or a packed
        row's (B, T) positions, restarting at 0 where each record starts (`record_mask`)."""
        if positions is None:
            cos, sin = self.rotary(torch.arange(x.shape[1], device=x.device), x.dtype)  # (T, d)
            mask = None
        else:
            cos, sin = (t[:, None] for t in self.rotary(positions, x.dtype))  # (B, 1, T, d): per row
            mask = packed_mask(positions, packed_attention_kernel(x.device.type, compute_dtype(x)))
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_cached(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       cache, layer: int) -> torch.Tensor:
        """(B, T, H) -> (B, T, H) for new tokens whose keys/values go to cache layer `layer`.

        cos, sin: (B, 1, T, head_dim) from `rotary(positions)`, computed once per step by the caller
        (all layers share the rotary frequencies). The training path above is untouched."""
        x = x + self.self_attn.forward_cached(self.input_layernorm(x), cos, sin, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class SharedHead(nn.Module):
    """The model's final RMSNorm + lm_head: the one head every exit uses."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def output_weight(self) -> nn.Parameter:
        """The (V, H) output projection (the fused exit loss multiplies by it directly)."""
        return self.lm_head.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden))  # (..., V)


class TiedHead(nn.Module):
    """The shared head of a tied model: the final RMSNorm and the token embedding, whose matrix is
    also the output projection. The pipeline's stage 0 embeds with it, every exit projects with it."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)

    @property
    def output_weight(self) -> nn.Parameter:
        """The (V, H) output projection: the embedding matrix."""
        return self.embed_tokens.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # The same product as nn.Linear with this (V, H) weight: exactly the untied head's numbers.
        return F.linear(self.norm(hidden), self.embed_tokens.weight)  # (..., V)


class HeadView:
    """A head given by its parts, norm then the (V, H) `output_weight`, for heads that are not a
    module of their own (a whole Llama's `model.norm` + `lm_head`); `exit_loss` takes it like
    SharedHead or TiedHead."""

    def __init__(self, norm: nn.Module, output_weight: nn.Parameter):
        self.norm = norm
        self.output_weight = output_weight

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(hidden), self.output_weight)  # (..., V)


def tied_embeddings(config: LlamaConfig) -> bool:
    """Whether the model's lm_head is its input embedding (Hugging Face stores that matrix once)."""
    return bool(getattr(config, "tie_word_embeddings", False))


def check_supported(config: LlamaConfig) -> None:
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={config.hidden_act!r}: LLaMA uses silu")
    rope_inverse_frequencies(config)  # raises on unsupported rope types


def hf_shapes(config: LlamaConfig) -> dict[str, torch.Size]:
    """{HF parameter name: shape} for the whole model, without allocating it."""
    with torch.device("meta"):
        return {name: p.shape for name, p in Llama(config).named_parameters()}


def random_weights(config: LlamaConfig, seed: int):
    """A weight source `names -> {name: tensor}` for a randomly initialised model.

    Every tensor is drawn from its own generator, seeded by (seed, name), so a pipeline stage can
    create exactly its own tensors and any stage layout gets the same model (as HF initialises:
    normal(0, initializer_range), norms at 1, biases at 0).
    """
    shapes = hf_shapes(config)
    std = getattr(config, "initializer_range", 0.02)

    def source(names) -> dict[str, torch.Tensor]:
        out = {}
        for name in names:
            if name.endswith("norm.weight"):
                out[name] = torch.ones(shapes[name])
            elif name.endswith(".bias"):
                out[name] = torch.zeros(shapes[name])
            else:
                generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                out[name] = torch.empty(shapes[name]).normal_(0.0, std, generator=generator)
        return out

    return source


def _head_from_embedding(module, state_dict, prefix, *_):
    embed, head = f"{prefix}model.embed_tokens.weight", f"{prefix}lm_head.weight"
    if embed in state_dict and head not in state_dict:
        state_dict[head] = state_dict[embed]


class Llama(nn.Module):
    """A whole LLaMA in one process, with HF parameter names: the numerical reference for the
    pipeline, and the model inference uses. `forward(ids, exit_layer=n)` is exit n's logits."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        check_supported(config)
        self.config = config
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.model.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        # The shared head under its Hugging Face names: `model.norm` and `lm_head`.
        self.model.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if tied_embeddings(config):
            # One Parameter for both (named once, as model.embed_tokens.weight); a state dict that
            # stores only the embedding, as Hugging Face writes a tied model, fills the head from it.
            self.lm_head.weight = self.model.embed_tokens.weight
            self.register_load_state_dict_pre_hook(_head_from_embedding)
        # SFT+ICT only: {str(n): a separate norm + lm_head for exit n} (names exit_heads.{n}.*).
        self.exit_heads = nn.ModuleDict()

    def add_exit_heads(self, layers) -> None:
        """Give each exit in `layers` (below the last layer) its own head, the SFT+ICT baseline's."""
        for n in layers:
            # The last layer keeps the model's own head, so an own head sits at most one layer above it.
            check_exit_layer(n, self.config.num_hidden_layers, "exit head at layer",
                             deepest=self.config.num_hidden_layers - 1)
            self.exit_heads[str(n)] = SharedHead(self.config).to(self.lm_head.weight)

    @classmethod
    def from_weights(cls, config: LlamaConfig, weight_source) -> "Llama":
        model = cls(config)
        names = [name for name, _ in model.named_parameters()]
        model.load_state_dict(weight_source(names), strict=True)
        return model

    def hidden_states(self, input_ids: torch.Tensor, exit_layers,
                      positions: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
        """{n: hidden state after layer n} for every n in exit_layers, one pass; positions: a
        packed batch's (B, T) (see DecoderLayer.forward)."""
        wanted = set(exit_layers)
        x = self.model.embed_tokens(input_ids)
        out = {}
        for i, layer in enumerate(self.model.layers[:max(wanted)], start=1):
            x = layer(x, positions)
            if i in wanted:
                out[i] = x
        return out

    def forward(self, input_ids: torch.Tensor, exit_layer: int | None = None) -> torch.Tensor:
        n = self.config.num_hidden_layers if exit_layer is None else check_exit_layer(
            exit_layer, self.config.num_hidden_layers, "exit layer")
        return self.head(self.hidden_states(input_ids, [n])[n], n)  # (B, T, V)

    def exit_head(self, exit_layer: int | None = None) -> "SharedHead | HeadView":
        """Exit `exit_layer`'s head as a callable with `.norm` and `.output_weight` (for exit_loss):
        its own head if it has one (SFT+ICT), else the shared norm + lm_head."""
        if exit_layer is not None and str(exit_layer) in self.exit_heads:
            return self.exit_heads[str(exit_layer)]
        return HeadView(self.model.norm, self.lm_head.weight)

    def head(self, hidden: torch.Tensor, exit_layer: int | None = None) -> torch.Tensor:
        """Exit `exit_layer`'s head on `hidden`: its own head if it has one (SFT+ICT), else the
        shared head, as SharedHead.forward: final norm then lm_head."""
        if exit_layer is not None and str(exit_layer) in self.exit_heads:
            return self.exit_heads[str(exit_layer)](hidden)
        return self.lm_head(self.model.norm(hidden))
