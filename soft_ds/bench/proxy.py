"""The cost proxy of LLaMA 2 13B that both benchmarks measure: the 13B's proportions at a width a
CPU can run.

The proxy keeps the 13B's depth (40 layers, so its exit set {12, 16, ..., 40}) and its shape
(no GQA; intermediate about 2.7 x hidden), and shrinks the width. Its vocabulary is solved for so
that head FLOPs / decoder-layer FLOPs is the 13B's at the paper's sequence length (0.512 at 512,
`partition.head_to_layer_ratio`): head FLOPs are linear in the vocabulary and a layer's do not
depend on it. With that ratio and the depth kept, what the exit heads cost relative to the layers
(training overhead, decoding speed per exit) has the 13B's proportions.
"""

from __future__ import annotations

from transformers import LlamaConfig

from soft_ds.model import llama2_config
from soft_ds.partition import decoder_layer_flops, head_flops, head_to_layer_ratio

LLAMA2_13B = llama2_config("13B")
LLAMA2_13B_SEQ_LEN = 512  # the paper fine-tunes LLaMA 2 13B at 512 tokens


def head_layer_ratio(config: LlamaConfig) -> float:
    """Head FLOPs / decoder-layer FLOPs at the 13B's sequence length (LLaMA 2 13B: 0.512)."""
    return head_to_layer_ratio(config, LLAMA2_13B_SEQ_LEN)


def proxy_config(layers: int, hidden: int, intermediate: int, heads: int, vocab: int | None = None,
                 seq_len: int = LLAMA2_13B_SEQ_LEN) -> LlamaConfig:
    """The proxy's shape; vocab None: `matched_vocab_size` at `seq_len`."""
    if vocab is None:
        vocab = matched_vocab_size(layers, hidden, intermediate, heads, seq_len)
    return LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                       max_position_embeddings=max(4096, seq_len), tie_word_embeddings=False)


def matched_vocab_size(layers: int, hidden: int, intermediate: int, heads: int,
                       seq_len: int = LLAMA2_13B_SEQ_LEN) -> int:
    """The vocabulary at which the proxy's head / decoder-layer FLOPs at `seq_len` equal LLaMA 2
    13B's at its own sequence length."""
    shape = proxy_config(layers, hidden, intermediate, heads, vocab=LLAMA2_13B.vocab_size, seq_len=seq_len)
    head_flops_per_token_id = head_flops(shape) / shape.vocab_size  # head FLOPs are linear in the vocabulary
    return round(head_layer_ratio(LLAMA2_13B) * decoder_layer_flops(shape, seq_len) / head_flops_per_token_id)
