"""Generation from a SoFT model: any exit, self-speculative decoding, confidence-based dynamic exit.

Exit n of a SoFT model is `layers[:n] -> model.norm -> lm_head`; every strategy runs the one
`soft_ds.model.Llama` and its one shared head (`Llama.head`), so no weight is ever copied:

    generator = SoftGenerator.from_pretrained("runs/soft/hf-full")  # a `soft-ds export` directory
    generator.generate(prompts, exit_layer=12)                      # the 12-layer sub-model
    generator.generate_speculative(prompts, draft_exit=12, draft_tokens=4)
    generator.generate_dynamic(prompts, threshold=0.9)              # first confident exit per token
    calibration = calibrate(generator, calibration_prompts(generator.tokenizer, 32), target=0.97)
    generator.generate_dynamic(prompts, calibration.thresholds)     # per-exit thresholds, calibrated

`prompts` are lists of token ids (e.g. `data.templates.encode_prompt(record, tokenizer)`); the
result is a `Generation` holding each prompt's new tokens (ending with the eos when one is
produced) and the counters the benchmark reports. Prompts of different lengths are batched with
left padding, and batched output equals unbatched output (`cache.py`).

The package, one module per piece:
    cache.py        KVCache (per-sequence valid columns and rotary positions), left_pad
    core.py         CachedModel (prefill, run layers, embed a new token, the shared head), Sampling,
                    picking and confidence, the per-sequence bookkeeping (Outputs, Generation)
    exit.py         generate_at_exit: the exit-n sub-model
    speculative.py  generate_speculative: exit n drafts, the full model verifies; speculative_accept
    dynamic.py      generate_dynamic: each token stops at its first confident exit
    calibrate.py    calibrate: per-exit thresholds meeting a requested agreement with the full model
    generator.py    SoftGenerator: a model with its tokenizer and exits, the three as methods
    command.py      the `soft-ds generate` command (as eval/command.py is `soft-ds eval`'s)
"""

from soft_ds.inference.cache import KVCache, left_pad
from soft_ds.inference.calibrate import Calibration, calibrate, calibration_prompts, prefix_agreement
from soft_ds.inference.core import (CONFIDENCE_MEASURES, DTYPES, CachedModel, Generation, Sampling,
                                    checkpoint_tokenizer, confidence)
from soft_ds.inference.dynamic import generate_dynamic
from soft_ds.inference.exit import generate_at_exit
from soft_ds.inference.generator import SoftGenerator
from soft_ds.inference.speculative import generate_speculative, speculative_accept

__all__ = ["CONFIDENCE_MEASURES", "DTYPES", "CachedModel", "Calibration", "Generation", "KVCache", "Sampling",
           "SoftGenerator", "calibrate", "calibration_prompts", "checkpoint_tokenizer", "confidence", "generate_at_exit",
           "generate_dynamic", "generate_speculative", "left_pad", "prefix_agreement", "speculative_accept"]
