"""A stand-in for flash-attn 2's `flash_attn_varlen_func`, for CPU tests of the packed flash-varlen
path: it asserts the contract of the real kernel's arguments, then computes the same attention
with SDPA (so training through it can be compared with the fp32 reference).

The contract (flash-attn 2.x, `flash_attn_interface.flash_attn_varlen_func`): q (total_q, h, d),
k and v (total_k, h_kv, d), 3-D, one dtype in {fp16, bf16}, on one device, last dimension
contiguous; h_kv divides h; d a multiple of 8, at most 256; cu_seqlens_q/k int32, 1-D, contiguous,
on q's device, starting at 0, non-decreasing, ending at the token count; max_seqlen_q/k Python ints
at least the longest span. Only what soft-ds passes is modelled: causal, no dropout, default scale.
`CALLS` counts the calls, so a test can tell the kernel really ran.
"""

import torch
import torch.nn.functional as F

__version__ = "2.standin"
CALLS = [0]


def _check_spans(cu, total, max_len, q, name):
    assert isinstance(cu, torch.Tensor) and cu.dtype == torch.int32, f"{name}: int32 tensor, got {cu.dtype}"
    assert cu.dim() == 1 and cu.is_contiguous(), f"{name}: 1-D contiguous"
    assert cu.device == q.device, f"{name} on {cu.device}, q on {q.device}"
    lengths = cu[1:] - cu[:-1]
    assert int(cu[0]) == 0 and int(cu[-1]) == total, f"{name}: 0 .. {total}, got {int(cu[0])} .. {int(cu[-1])}"
    assert bool((lengths >= 0).all()), f"{name}: non-decreasing"
    assert isinstance(max_len, int) and not isinstance(max_len, bool), f"max_seqlen for {name}: a Python int"
    assert max_len >= int(lengths.max()), f"max_seqlen {max_len} below the longest span {int(lengths.max())}"


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, **unused):
    assert q.dim() == k.dim() == v.dim() == 3, "q, k, v: (tokens, heads, head_dim)"
    assert q.dtype == k.dtype == v.dtype, f"one dtype for q, k, v: got {q.dtype}, {k.dtype}, {v.dtype}"
    assert q.dtype in (torch.float16, torch.bfloat16), f"fp16 or bf16 only, got {q.dtype}"
    assert q.device == k.device == v.device
    assert k.shape == v.shape and q.shape[-1] == k.shape[-1], f"shapes q {q.shape}, k {k.shape}, v {v.shape}"
    assert q.shape[1] % k.shape[1] == 0, f"kv heads {k.shape[1]} must divide q heads {q.shape[1]}"
    assert q.shape[-1] % 8 == 0 and q.shape[-1] <= 256, f"head_dim {q.shape[-1]}"
    assert all(t.stride(-1) == 1 for t in (q, k, v)), "last dimension contiguous"
    assert dropout_p == 0.0 and softmax_scale is None and causal
    _check_spans(cu_seqlens_q, q.shape[0], max_seqlen_q, q, "cu_seqlens_q")
    _check_spans(cu_seqlens_k, k.shape[0], max_seqlen_k, q, "cu_seqlens_k")
    CALLS[0] += 1
    spans = cu_seqlens_q.tolist()
    out = []
    for start, end in zip(spans[:-1], spans[1:]):
        qs, ks, vs = (t[start:end].transpose(0, 1)[None] for t in (q, k, v))  # (1, heads, n, d)
        y = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=ks.shape[1] != qs.shape[1])
        out.append(y[0].transpose(0, 1))  # (n, h, d)
    return torch.cat(out)
