"""How good is each exit: language-model loss and perplexity, and KL to a reference by output position.

Works on exported Hugging Face checkpoints of any training mode: SFT, SoFT, or SFT + ICT
(separate exit heads). Exit n is always `model.head(layers[:n] output, exit n)`, so a model with
its own head per exit is evaluated through that head and a SoFT model through its one shared
head, by the same code.

    model = hf_io.load_model("runs/soft/hf-full")
    lm_metrics(model, val_set, exit_layers=[2, 4, 6, 8], pad_id=0)
        -> {2: {"loss": 3.1, "ppl": 22.2, "tokens": 9120}, ...}
    kl_by_position(model, reference, prompts, responses, exit_layers=[2, 4, 6, 8])
        -> {2: {"kl": [per position], "count": [per position], "mean": 0.41}, ...}

`lm_metrics` is the held-out cross-entropy of the response tokens (and the closing eos) with the
training template and masking (`data.splits.build_datasets` / `data.batching.collate`), averaged
over all counted tokens of the set; every exit comes from one forward per batch
(`Llama.hidden_states`).

`kl_by_position` is the paper's Figure 2: on responses a reference model generated, the
KL(reference || exit) of the next-token distributions at each response position, averaged over the
prompts whose response reaches that position.

`lm_by_exit` and `kl_by_exit` run them over several checkpoints (`soft-ds eval lm` and `kl`),
loading one model at a time; `kl_by_exit` also chooses what each model is compared with.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm import tqdm

from soft_ds.data.batching import collate
from soft_ds.data.targets import IGNORE_INDEX
from soft_ds.eval.inputs import Checkpoint
from soft_ds.exits import check_exit_layers
from soft_ds.inference import SoftGenerator
from soft_ds.model import Llama


def _device(model: Llama) -> torch.device:
    return model.model.embed_tokens.weight.device


# --------------------------------------------------------------------------------------------
# Loss and perplexity per exit


@torch.inference_mode()
def lm_metrics(model: Llama, dataset, exit_layers, pad_id: int, batch_size: int = 8,
               desc: str = "loss") -> dict[int, dict]:
    """Held-out cross-entropy of every exit, over response tokens only.

    dataset: tokenized records with input_ids and targets (`data.splits.build_datasets`'s validation split).
    Returns {n: {"loss": mean CE per counted token (nats), "ppl": exp(loss), "tokens": count}}.
    Batches are right-padded to their longest record (`data.batching.collate`), which changes no logit.
    """
    exit_layers = check_exit_layers(exit_layers, model.config.num_hidden_layers)
    totals = {n: torch.zeros((), dtype=torch.float64) for n in exit_layers}
    tokens = 0
    # Records of similar length share a batch (less padding); the sums do not depend on the order.
    lengths = [len(ids) for ids in dataset["input_ids"]]
    order = sorted(range(len(dataset)), key=lengths.__getitem__)
    bar = tqdm(total=len(dataset), desc=desc, unit="record")
    for first in range(0, len(dataset), batch_size):
        examples = [dataset[index] for index in order[first:first + batch_size]]
        ids, targets = collate(examples, max(len(e["input_ids"]) for e in examples), pad_id)  # (B, T) x 2
        ids, targets = ids.to(_device(model)), targets.to(_device(model))
        counted = targets != IGNORE_INDEX  # (B, T)
        hidden = model.hidden_states(ids, exit_layers)  # {n: (B, T, H)}
        for n in exit_layers:
            logits = model.head(hidden[n][counted], n).float()  # (N, V): counted positions only
            totals[n] += F.cross_entropy(logits, targets[counted], reduction="sum").double().cpu()
        tokens += int(counted.sum())
        bar.update(len(examples))
    bar.close()
    if tokens == 0:
        raise ValueError("the evaluation set has no response token to score")
    results = {}
    for n in exit_layers:
        loss = float(totals[n]) / tokens
        results[n] = {"loss": loss, "ppl": math.exp(loss) if loss < 700 else float("inf"), "tokens": tokens}
    return results


# --------------------------------------------------------------------------------------------
# Generation and KL by output position


def generate_responses(generator: SoftGenerator, prompts: list[list[int]], exit_layer: int | None,
                       max_new_tokens: int, eos_token_id: int | None, batch_size: int = 8,
                       desc: str = "generating") -> list[list[int]]:
    """Greedy responses (token ids, ending with the eos when one was produced), with a progress bar."""
    responses: list[list[int]] = []
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt")
    for first in range(0, len(prompts), batch_size):
        batch = prompts[first:first + batch_size]
        responses += generator.generate(batch, exit_layer=exit_layer, max_new_tokens=max_new_tokens,
                                        eos_token_id=eos_token_id).tokens
        bar.update(len(batch))
    bar.close()
    return responses


def responses_by_exit(checkpoint: Checkpoint, prompts: list[list[int]], max_new_tokens: int, batch_size: int,
                      dtype: torch.dtype, device: str | torch.device) -> dict[int, list[str]]:
    """Each of the checkpoint's exits answers every prompt greedily: {exit: decoded responses}.
    The model is loaded once for all its exits."""
    model, tokenizer = checkpoint.load(dtype, device), checkpoint.tokenizer
    generator = SoftGenerator(model, tokenizer)
    texts = {}
    for n in checkpoint.exits:
        tokens = generate_responses(generator, prompts, n, max_new_tokens, tokenizer.eos_token_id, batch_size,
                                    desc=f"{checkpoint.name} exit {n}")
        texts[n] = [tokenizer.decode(response, skip_special_tokens=True) for response in tokens]
    return texts


def _response_positions(prompts, responses, pad_id: int, device):
    """Right-padded prompt + response ids (B, T) and, for every response token, the (row, column)
    whose logits predict it and its response position: three (N,) index tensors."""
    sequences = [prompt + response for prompt, response in zip(prompts, responses)]
    ids = torch.full((len(sequences), max(map(len, sequences))), pad_id, dtype=torch.long)
    rows, columns, positions = [], [], []
    for row, (prompt, response, sequence) in enumerate(zip(prompts, responses, sequences)):
        ids[row, :len(sequence)] = torch.as_tensor(sequence)
        rows += [row] * len(response)
        columns += range(len(prompt) - 1, len(prompt) - 1 + len(response))
        positions += range(len(response))
    as_tensor = lambda values: torch.as_tensor(values, dtype=torch.long, device=device)  # noqa: E731
    return ids.to(device), as_tensor(rows), as_tensor(columns), as_tensor(positions)


@torch.inference_mode()
def kl_by_position(model: Llama, reference: Llama, prompts: list[list[int]], responses: list[list[int]],
                   exit_layers, reference_exit: int | None = None, batch_size: int = 8,
                   pad_id: int = 0, desc: str = "KL") -> dict[int, dict]:
    """KL(reference || exit n) of the next-token distributions along the given responses.

    prompts[i] + responses[i] is read by both models; response token t of prompt i is predicted at
    column len(prompts[i]) - 1 + t. reference may be `model` itself (then one forward serves both)
    and reference_exit defaults to its last layer.

    Returns {n: {"kl": [mean KL at response position t], "count": [responses reaching position t],
    "mean": mean KL over all response tokens}}. Responses differ in length (an eos ends one early):
    position t is averaged over the `count[t]` responses that have a token t, never over padding.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if model.config.vocab_size != reference.config.vocab_size:
        raise ValueError(f"the model's vocabulary ({model.config.vocab_size}) differs from the reference's "
                         f"({reference.config.vocab_size}): their distributions cannot be compared")
    exit_layers = check_exit_layers(exit_layers, model.config.num_hidden_layers)
    reference_exit = reference.config.num_hidden_layers if reference_exit is None else reference_exit
    check_exit_layers([reference_exit], reference.config.num_hidden_layers, "the reference")
    longest = max(len(response) for response in responses)
    sums = {n: torch.zeros(longest, dtype=torch.float64) for n in exit_layers}
    counts = torch.zeros(longest, dtype=torch.long)
    device = _device(model)
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt")
    for first in range(0, len(prompts), batch_size):
        batch = slice(first, first + batch_size)
        ids, rows, columns, positions = _response_positions(prompts[batch], responses[batch], pad_id, device)
        same_model = reference is model
        wanted = set(exit_layers) | ({reference_exit} if same_model else set())
        hidden = model.hidden_states(ids, wanted)  # {n: (B, T, H)}
        reference_hidden = hidden if same_model else reference.hidden_states(ids, [reference_exit])
        reference_logp = F.log_softmax(
            reference.head(reference_hidden[reference_exit][rows, columns], reference_exit).float(), -1)
        for n in exit_layers:
            logp = F.log_softmax(model.head(hidden[n][rows, columns], n).float(), -1)  # (N, V)
            # sum_v p_ref (log p_ref - log p_exit): exactly 0 where the two log-probabilities are equal.
            kl = F.kl_div(logp, reference_logp, log_target=True, reduction="none").sum(-1)  # (N,)
            sums[n].index_add_(0, positions.cpu(), kl.double().cpu())
        counts += torch.bincount(positions.cpu(), minlength=longest)
        bar.update(len(ids))
    bar.close()
    total_tokens = int(counts.sum())
    return {n: {"kl": (sums[n] / counts).tolist(), "count": counts.tolist(),
                "mean": float(sums[n].sum()) / total_tokens} for n in exit_layers}


# --------------------------------------------------------------------------------------------
# Over several checkpoints, one model in memory at a time


def lm_by_exit(checkpoints: list[Checkpoint], records, pad_id: int, batch_size: int, dtype: torch.dtype,
               device: str | torch.device) -> dict[str, dict]:
    """`lm_metrics` of every checkpoint's exits on the same records:
    {name: {"path", "num_layers", "exits": {"n": {"loss", "ppl", "tokens"}}}}."""
    results = {}
    for checkpoint in checkpoints:
        model = checkpoint.load(dtype, device)
        metrics = lm_metrics(model, records, checkpoint.exits, pad_id, batch_size, desc=f"loss {checkpoint.name}")
        results[checkpoint.name] = {"path": str(checkpoint.path), "num_layers": checkpoint.num_layers,
                                    "exits": {str(n): values for n, values in metrics.items()}}
        del model
    return results


def check_reference(checkpoints: list[Checkpoint], reference: Checkpoint | None) -> None:
    """A KL reference must be comparable with every checkpoint: one vocabulary, and its name may
    name a checkpoint only if it is the same directory."""
    if reference is None:
        return
    for checkpoint in checkpoints:
        if checkpoint.name == reference.name and checkpoint.path != reference.path:
            raise ValueError(f"--reference {reference.name}={reference.path}: the name {reference.name!r} is a "
                             "--model with another path")
    different = [c.name for c in checkpoints if c.config.vocab_size != reference.config.vocab_size]
    if different:
        raise ValueError(f"{', '.join(different)}: vocabulary size differs from the reference {reference.name}'s "
                         f"({reference.config.vocab_size}); KL needs one vocabulary")


def kl_by_exit(checkpoints: list[Checkpoint], reference: Checkpoint | None, prompts: list[list[int]], tokenizer,
               max_new_tokens: int, batch_size: int, dtype: torch.dtype,
               device: str | torch.device) -> tuple[dict[str, dict], dict[str, list[str]]]:
    """`kl_by_position` of every checkpoint's exits along greedy responses to `prompts`.

    With a reference (one `check_reference` accepts), the reference answers once and every
    checkpoint is compared with the reference's last layer along those responses; a checkpoint in
    the reference's directory is read from the very same model object (its last exit's KL is then
    exactly 0). Without one, each checkpoint answers for itself and is compared with its own last
    layer. Returns ({name: {"path", "reference", "exits": {"n": {"kl", "count", "mean"}}}},
    {name of each model that answered: its decoded responses}).
    """
    def respond(model, name):
        return generate_responses(SoftGenerator(model, tokenizer), prompts, None, max_new_tokens,
                                  tokenizer.eos_token_id, batch_size, desc=f"responses of {name}")

    def decode(responses):
        return [tokenizer.decode(response, skip_special_tokens=True) for response in responses]

    reference_model = reference_responses = None
    texts = {}
    if reference is not None:
        reference_model = reference.load(dtype, device)
        reference_responses = respond(reference_model, reference.name)
        texts[reference.name] = decode(reference_responses)
    results = {}
    for checkpoint in checkpoints:
        if reference is None:
            model = against = checkpoint.load(dtype, device)
            responses = respond(model, checkpoint.name)
            texts[checkpoint.name] = decode(responses)
        else:
            model = reference_model if checkpoint.path == reference.path else checkpoint.load(dtype, device)
            against, responses = reference_model, reference_responses
        kl = kl_by_position(model, against, prompts, responses, checkpoint.exits, batch_size=batch_size,
                            pad_id=tokenizer.pad_token_id, desc=f"KL {checkpoint.name}")
        results[checkpoint.name] = {
            "path": str(checkpoint.path),
            "reference": reference.name if reference is not None else f"{checkpoint.name} (own last layer)",
            "exits": {str(n): values for n, values in kl.items()}}
        del model, against
    return results, texts
