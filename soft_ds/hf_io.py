"""Hugging Face LLaMA checkpoints: read only the tensors a pipeline stage needs; export a model.

The project's model uses exactly the state-dict names of `transformers.LlamaForCausalLM`
(see `expected_tensor_names`), so a checkpoint's tensors go to the model by name, no renaming.

Reading is selective on purpose: a pipeline stage asks for its own names and only the shards that
hold them are opened, so a 13B model is never materialised whole on every rank.

Writing (`save_hf_checkpoint`) produces a directory `AutoModelForCausalLM.from_pretrained` loads:
the whole model, or the exit-N sub-model (decoder layers[:N] -> final norm -> lm_head; in SoFT all
exits share that one head, so nothing else is needed). An SFT+ICT model's per-exit heads
(`exit_heads.{n}.norm.weight`, `exit_heads.{n}.lm_head.weight`) go to a side file,
`exit_heads.safetensors`, that transformers ignores and `load_model` reads; its exit-N export
uses exit N's own head as the sub-model's norm + lm_head.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Mapping

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

from soft_ds.exits import check_exit_layer
from soft_ds.model import tied_embeddings

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX_FILE = "pytorch_model.bin.index.json"
# Order of preference when a directory holds more than one format (as transformers does:
# safetensors first, and a single file before an index).
WEIGHT_FILES = (SAFETENSORS_FILE, SAFETENSORS_INDEX_FILE, BIN_FILE, BIN_INDEX_FILE)

EXIT_HEADS_FILE = "exit_heads.safetensors"  # SFT+ICT only: the per-exit heads
EXIT_HEAD_PREFIX = "exit_heads."

EMBED_NAME = "model.embed_tokens.weight"
NORM_NAME = "model.norm.weight"
HEAD_NAME = "lm_head.weight"

# How many missing names an error message lists before it summarises the rest.
_MAX_NAMES_IN_ERROR = 5


class CheckpointError(ValueError):
    """A checkpoint directory (to read or to write) is missing, malformed or inconsistent."""


# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------


def expected_tensor_names(
    config: transformers.LlamaConfig,
    layers: Iterable[int] | None = None,
    embed: bool = True,
    head: bool = True,
) -> set[str]:
    """State-dict names of a LlamaForCausalLM, or of the part of it one pipeline stage holds.

    layers: decoder layer indices to include (default: all `num_hidden_layers`).
    embed: include the token embedding.
    head: include the shared head, i.e. the final norm and lm_head.
    """
    num_layers = config.num_hidden_layers
    layers = range(num_layers) if layers is None else list(layers)
    names: set[str] = set()
    if embed:
        names.add(EMBED_NAME)
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < num_layers:
            raise ValueError(f"layer index {layer!r} is outside 0..{num_layers - 1} "
                             f"(the config has num_hidden_layers={num_layers})")
        prefix = f"model.layers.{layer}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names.add(f"{prefix}.self_attn.{proj}.weight")
            if getattr(config, "attention_bias", False):
                names.add(f"{prefix}.self_attn.{proj}.bias")
        for proj in ("gate_proj", "up_proj", "down_proj"):
            names.add(f"{prefix}.mlp.{proj}.weight")
            if getattr(config, "mlp_bias", False):
                names.add(f"{prefix}.mlp.{proj}.bias")
        names.add(f"{prefix}.input_layernorm.weight")
        names.add(f"{prefix}.post_attention_layernorm.weight")
    if head:
        names.update((NORM_NAME, HEAD_NAME))
    return names


def _list_names(names: Iterable[str]) -> str:
    names = sorted(names)
    shown = ", ".join(names[:_MAX_NAMES_IN_ERROR])
    if len(names) > _MAX_NAMES_IN_ERROR:
        shown += f" (and {len(names) - _MAX_NAMES_IN_ERROR} more)"
    return shown


def hf_name(kind: str, number: int, local_name: str) -> str:
    """Hugging Face name of a pipeline layer's parameter (kinds as in `pipe.layer_layout`; the
    shared head is kind "exit", an SFT+ICT exit's own head "exit_head"). Training loads and
    export writes through this one map."""
    if kind == "embed":
        return f"model.{local_name}"
    if kind == "decoder":
        return f"model.layers.{number - 1}.{local_name}"
    if kind == "exit_head":
        return f"{EXIT_HEAD_PREFIX}{number}.{local_name}"
    # The shared head: SharedHead's norm + lm_head, or a tied model's TiedHead (norm + embedding).
    return {"norm.weight": NORM_NAME, "embed_tokens.weight": EMBED_NAME}.get(local_name, local_name)


def stage_tensor_names(config: transformers.LlamaConfig, layers: Iterable[int], first_stage: bool,
                       has_exit: bool) -> set[str]:
    """Names of the tensors one pipeline stage holds, as `pipe.SoftPipelineModule` builds it: its
    decoder layers (0-based `layers`), the embedding on the first stage, the shared head (final
    norm + lm_head) once on a stage with an exit. Under tied embeddings the head's matrix is the
    embedding, so a stage that holds either holds both the embedding and the final norm."""
    if tied_embeddings(config):
        holds = first_stage or has_exit
        return expected_tensor_names(config, layers, embed=holds, head=holds) - {HEAD_NAME}
    return expected_tensor_names(config, layers, embed=first_stage, head=has_exit)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _find_weight_file(path: Path) -> Path | None:
    for file_name in WEIGHT_FILES:
        if (path / file_name).is_file():
            return path / file_name
    return None


def load_llama_config(path: str | os.PathLike) -> transformers.LlamaConfig:
    """Read and check a LLaMA checkpoint directory's config.json.

    Also checks that the directory holds weights, so a bad path fails here, at start-up, rather
    than later when a stage first loads its tensors.
    """
    path = Path(path)
    if not path.is_dir():
        what = "does not exist" if not path.exists() else "is not a directory"
        raise CheckpointError(f"checkpoint path {path} {what}; expected a Hugging Face "
                              "checkpoint directory (config.json + weights)")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"checkpoint directory {path} has no config.json")
    config = read_llama_config_file(config_file)
    if _find_weight_file(path) is None:
        raise CheckpointError(f"checkpoint directory {path} has no weight files "
                              f"(looked for {', '.join(WEIGHT_FILES)})")
    return config


def read_llama_config_file(config_file: str | os.PathLike) -> transformers.LlamaConfig:
    """A LlamaConfig from a config.json, checked to be JSON and model_type 'llama' (no weights
    needed: the planner sizes runs from the config alone)."""
    config_file = Path(config_file)
    try:
        raw = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{config_file} is not valid JSON: {error}") from error
    if not isinstance(raw, dict):
        raise CheckpointError(f"{config_file} must hold a JSON object, got {type(raw).__name__}")
    model_type = raw.get("model_type")
    if model_type != "llama":
        found = "has no model_type" if model_type is None else f"has model_type={model_type!r}"
        raise CheckpointError(f"{config_file} {found}; only LLaMA checkpoints "
                              "(model_type='llama') are supported")
    return transformers.LlamaConfig.from_dict(raw)


def load_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu"):
    """A whole `soft_ds.model.Llama` from a Hugging Face checkpoint directory, with the per-exit
    heads of an SFT+ICT model when the directory holds EXIT_HEADS_FILE."""
    from soft_ds.model import Llama
    path = Path(path)
    config = load_llama_config(path)
    model = Llama(config)
    heads_file = path / EXIT_HEADS_FILE
    heads = {}
    if heads_file.is_file():
        try:
            with safe_open(str(heads_file), framework="pt", device="cpu") as f:
                heads = {name: f.get_tensor(name) for name in f.keys()}
        except Exception as error:
            raise CheckpointError(f"cannot read {heads_file}: {error}") from error
        layers = sorted({int(name.split(".")[1]) for name in heads})
        model.add_exit_heads(layers)
    names = [name for name, _ in model.named_parameters() if not name.startswith(EXIT_HEAD_PREFIX)]
    model.load_state_dict({**load_tensors(path, names), **heads}, strict=True)
    return model.to(device=device, dtype=dtype)


def exit_heads_from_shared(weight_source):
    """Wrap a weight source so that exit heads (`exit_heads.{n}.*`, absent from a base
    checkpoint) start as copies of the model's final norm and lm_head: SFT+ICT's starting point."""
    def source(names) -> dict[str, torch.Tensor]:
        names = list(names)
        own = [name for name in names if name.startswith(EXIT_HEAD_PREFIX)]
        base = {hf_name("exit", 0, name.split(".", 2)[2]) for name in own}
        tensors = weight_source(sorted((set(names) - set(own)) | base))
        for name in own:
            tensors[name] = tensors[hf_name("exit", 0, name.split(".", 2)[2])].clone()
        return {name: tensors[name] for name in names}
    return source


def _open_bin(file: Path) -> dict[str, torch.Tensor]:
    """A .bin state dict, memory-mapped: tensors are only read from disk when touched."""
    try:
        return torch.load(file, mmap=True, weights_only=True, map_location="cpu")
    except Exception as error:  # torch raises several types for corrupt or legacy-format files
        raise CheckpointError(f"cannot read {file}: {error}") from error


def _read_index(index_file: Path) -> dict[str, Path]:
    try:
        index = json.loads(index_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{index_file} is not valid JSON: {error}") from error
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_file} has no 'weight_map' object")
    return {name: index_file.parent / shard for name, shard in weight_map.items()}


def _weight_map(path: Path) -> dict[str, Path]:
    """Tensor name -> the file that holds it. Reads only indexes and headers, never tensor data."""
    weight_file = _find_weight_file(path)
    if weight_file is None:
        raise CheckpointError(f"checkpoint directory {path} has no weight files "
                              f"(looked for {', '.join(WEIGHT_FILES)})")
    if weight_file.name.endswith(".index.json"):
        return _read_index(weight_file)
    if weight_file.name == SAFETENSORS_FILE:
        try:
            with safe_open(str(weight_file), framework="pt", device="cpu") as shard:
                names = list(shard.keys())
        except Exception as error:  # safetensors raises its own error type for bad headers
            raise CheckpointError(f"cannot read {weight_file}: {error}") from error
        return {name: weight_file for name in names}
    return {name: weight_file for name in _open_bin(weight_file)}


def checkpoint_tensor_names(path: str | os.PathLike) -> set[str]:
    """Names of all tensors stored in a checkpoint directory (no tensor data is read)."""
    return set(_weight_map(Path(path)))


def load_tensors(path: str | os.PathLike, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Load just `names` from a checkpoint directory, opening only the files that hold them.

    Works for single-file and sharded checkpoints, safetensors or .bin. A tied-embedding
    checkpoint stores no lm_head; asking for it then returns a copy of the embedding (a copy,
    so that fine-tuning the head does not silently change the embedding on the same stage).
    """
    path = Path(path)
    requested = set(names)
    wanted = set(requested)
    weight_map = _weight_map(path)

    tied = EMBED_NAME not in weight_map or HEAD_NAME not in weight_map
    tied = tied and tied_embeddings(load_llama_config(path))
    head_from_embedding = tied and HEAD_NAME in wanted and HEAD_NAME not in weight_map
    if head_from_embedding:
        wanted.discard(HEAD_NAME)
        wanted.add(EMBED_NAME)

    missing = wanted - weight_map.keys()
    if tied and EMBED_NAME in missing:
        raise CheckpointError(f"checkpoint {path} has tie_word_embeddings=True but no {EMBED_NAME}: "
                              "that one tensor is both the input embedding and the output head")
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {len(missing)} requested tensor(s): "
                              f"{_list_names(missing)}")

    names_by_file: dict[Path, list[str]] = defaultdict(list)
    for name in wanted:
        names_by_file[weight_map[name]].append(name)

    tensors: dict[str, torch.Tensor] = {}
    for file, file_names in sorted(names_by_file.items()):
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path}: shard {file.name} (holding "
                                  f"{_list_names(file_names)}) does not exist")
        if file.suffix == ".safetensors":
            try:
                with safe_open(str(file), framework="pt", device="cpu") as shard:
                    for name in file_names:
                        tensors[name] = shard.get_tensor(name)
            except CheckpointError:
                raise
            except Exception as error:
                raise CheckpointError(f"cannot read {file}: {error}") from error
        else:
            state_dict = _open_bin(file)
            for name in file_names:
                if name not in state_dict:
                    raise CheckpointError(f"{file} lacks {name}, which its index says it holds")
                # Clone so the result owns its memory instead of pinning the whole mmap'd shard.
                tensors[name] = state_dict[name].clone()
            del state_dict

    if head_from_embedding:
        tensors[HEAD_NAME] = tensors[EMBED_NAME].clone()
        if EMBED_NAME not in requested:
            del tensors[EMBED_NAME]
    return tensors


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _check_exit_layer(exit_layer: int | None, num_layers: int) -> int:
    if exit_layer is None:
        return num_layers
    try:
        return check_exit_layer(exit_layer, num_layers, "exit_layer")
    except ValueError as error:
        raise CheckpointError(str(error)) from None


def _select_tensors(state_dict: Mapping[str, torch.Tensor], config: transformers.LlamaConfig,
                    exit_layer: int) -> dict[str, torch.Tensor]:
    """The tensors of the exit-`exit_layer` model, contiguous and unshared (safetensors needs both)."""
    num_layers = config.num_hidden_layers
    full_names = expected_tensor_names(config)
    unexpected = set(state_dict) - full_names
    if unexpected:
        raise CheckpointError(f"state dict has {len(unexpected)} tensor(s) that are not "
                              f"LlamaForCausalLM parameters of this config ({num_layers} layers): "
                              f"{_list_names(unexpected)}")
    keep = expected_tensor_names(config, layers=range(exit_layer))
    if tied_embeddings(config):
        # Hugging Face stores a tied head only once, as the embedding. A head that has drifted
        # from the embedding would be lost on reload, so refuse rather than export a different model.
        if HEAD_NAME in state_dict and EMBED_NAME in state_dict \
                and not torch.equal(state_dict[HEAD_NAME], state_dict[EMBED_NAME]):
            raise CheckpointError("config has tie_word_embeddings=True but lm_head.weight differs "
                                  "from model.embed_tokens.weight; untie the config to keep both")
        keep.discard(HEAD_NAME)
    missing = keep - state_dict.keys()
    if missing:
        raise CheckpointError(f"state dict lacks {len(missing)} tensor(s) needed for "
                              f"{exit_layer} layer(s): {_list_names(missing)}")

    tensors = {name: state_dict[name].detach().to("cpu").contiguous().clone() for name in keep}
    dtypes = {tensor.dtype for tensor in tensors.values() if tensor.is_floating_point()}
    if len(dtypes) > 1:
        raise CheckpointError(f"state dict mixes dtypes {sorted(map(str, dtypes))}; cast it to "
                              "one dtype first (config.json can record only one)")
    return tensors


def _export_config(config: transformers.LlamaConfig, exit_layer: int,
                   dtype: torch.dtype | None) -> dict:
    config = copy.deepcopy(config)
    config.architectures = ["LlamaForCausalLM"]
    config.num_hidden_layers = exit_layer
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list):  # per-layer attributes must shrink with the layer count
        config.layer_types = layer_types[:exit_layer]
    config_dict = config.to_dict()
    if dtype is not None:
        dtype_name = str(dtype).removeprefix("torch.")
        # transformers >= 4.56 reads "dtype"; older releases read "torch_dtype". Write both.
        config_dict["dtype"] = dtype_name
        config_dict["torch_dtype"] = dtype_name
    return config_dict


def save_hf_checkpoint(
    state_dict: Mapping[str, torch.Tensor],
    config: transformers.LlamaConfig,
    out_dir: str | os.PathLike,
    tokenizer_dir: str | os.PathLike | None = None,
    exit_layer: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a Hugging Face LlamaForCausalLM directory; return its path.

    state_dict: the full model's tensors under LlamaForCausalLM names (see expected_tensor_names),
        in one dtype, which is kept and recorded in config.json.
    exit_layer: export the exit-N sub-model: layers[:N], then the final norm and lm_head (the
        shared SoFT head). Default: all layers.
    tokenizer_dir: copy this tokenizer in (loaded and re-saved with AutoTokenizer).
    overwrite: replace an existing non-empty out_dir. Without it such a directory is refused.

    Everything is checked before anything is written, and the directory is built beside out_dir
    and renamed into place at the end, so a failure leaves no half-written export and never
    damages an existing one.
    """
    out_dir = Path(out_dir)
    exit_layer = _check_exit_layer(exit_layer, config.num_hidden_layers)
    state_dict, exit_heads = _split_exit_heads(state_dict, exit_layer, config.num_hidden_layers)
    if out_dir.exists():
        if not out_dir.is_dir():
            raise CheckpointError(f"output path {out_dir} exists and is not a directory")
        if any(out_dir.iterdir()) and not overwrite:
            raise CheckpointError(f"output directory {out_dir} exists and is not empty; "
                                  "pass overwrite=True to replace it")
    tensors = _select_tensors(state_dict, config, exit_layer)
    floating = [tensor.dtype for tensor in tensors.values() if tensor.is_floating_point()]
    config_dict = _export_config(config, exit_layer, floating[0] if floating else None)
    tokenizer = None
    if tokenizer_dir is not None:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        staging.chmod(0o755)  # mkdtemp makes it private (0o700); the export should be readable
        (staging / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True)
                                             + "\n")
        exported_config = transformers.LlamaConfig.from_dict(config_dict)
        generation_config = transformers.GenerationConfig.from_model_config(exported_config)
        generation_config.save_pretrained(str(staging))
        # "format": "pt" is what transformers expects in the metadata of a PyTorch checkpoint.
        save_file(tensors, str(staging / SAFETENSORS_FILE), metadata={"format": "pt"})
        if exit_heads:
            save_file(exit_heads, str(staging / EXIT_HEADS_FILE), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
        for weights in (SAFETENSORS_FILE, EXIT_HEADS_FILE):
            if (staging / weights).is_file():
                (staging / weights).chmod(0o644)  # safetensors writes them private (0o600), unlike the rest
        _replace_directory(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _split_exit_heads(state_dict: Mapping[str, torch.Tensor], exit_layer: int, num_layers: int):
    """(the LlamaForCausalLM tensors, the per-exit heads to write beside them).

    Exporting exit N of a model with per-exit heads puts exit N's own head in the place of the
    final norm + lm_head, so the N-layer directory is the exit-N model; the other heads are
    dropped. A full export keeps them all in EXIT_HEADS_FILE."""
    heads = {name: tensor for name, tensor in state_dict.items() if name.startswith(EXIT_HEAD_PREFIX)}
    if not heads:
        return state_dict, {}
    state_dict = {name: tensor for name, tensor in state_dict.items() if name not in heads}
    if exit_layer == num_layers:
        return state_dict, {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in heads.items()}
    own = f"{EXIT_HEAD_PREFIX}{exit_layer}."
    if f"{own}lm_head.weight" in heads:
        state_dict[NORM_NAME] = heads[f"{own}norm.weight"]
        state_dict[HEAD_NAME] = heads[f"{own}lm_head.weight"]
    return state_dict, {}


def _replace_directory(new: Path, target: Path) -> None:
    """Move `new` to `target`, replacing what is there; on failure `target` is left as it was."""
    if not target.exists():
        new.rename(target)
        return
    backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    backup.rmdir()  # only the unique name is wanted; rename needs it free
    target.rename(backup)
    try:
        new.rename(target)
    except BaseException:
        backup.rename(target)
        raise
    shutil.rmtree(backup, ignore_errors=True)
