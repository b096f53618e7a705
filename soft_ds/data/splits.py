"""build_datasets: an Alpaca file as tokenized, seeded train and validation `datasets.Dataset`s.

The one module of soft_ds.data that imports `datasets`; training and the held-out evaluations
(`soft-ds eval lm / kl / answers`) read their records through it.

Tokenizing is done once per data file, tokenizer, length and template, and kept on disk
(`tokenized_records`, in $SOFT_DS_CACHE, default ~/.cache/soft_ds; SOFT_DS_CACHE=off keeps
nothing): every rank of every launch, a resumed or requeued job and each evaluation would
otherwise tokenize the whole file again (5,000 Alpaca records: 3-4 s of one core each).
"""

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

import datasets
import torch

from soft_ds.data import targets, templates

from soft_ds.data.records import DataError, load_records
from soft_ds.data.targets import IGNORE_INDEX, tokenize_record
from soft_ds.data.templates import check_template

logger = logging.getLogger(__name__)


def tokenized_stats(dataset):
    """Counts a log line needs: records, truncated ones, ones with no target, target tokens."""
    lengths = dataset["untruncated_length"]
    stored = [len(ids) for ids in dataset["input_ids"]]
    counted = [sum(target != IGNORE_INDEX for target in targets) for targets in dataset["targets"]]
    return {
        "records": len(dataset),
        "truncated": sum(full > kept for full, kept in zip(lengths, stored)),
        "without_targets": sum(n == 0 for n in counted),
        "target_tokens": sum(counted),
        "longest_untruncated": max(lengths, default=0),
    }


def build_datasets(data_path, tokenizer, max_length, val_size, seed, template="alpaca"):
    """Load, split and tokenize an Alpaca file into (train, validation) `datasets.Dataset`s, each
    record in `template` (see tokenize_record).

    The validation set is val_size records drawn with torch.Generator().manual_seed(seed); both
    splits keep file order. Records whose prompt fills max_length have nothing to learn from and
    are dropped (a micro-batch made only of them would divide the loss by zero); truncated and
    dropped records are counted in the log. Rows keep the raw fields next to input_ids, targets
    and untruncated_length. Nothing is written to disk.
    """
    check_template(template, tokenizer)
    records = load_records(data_path)  # read and checked every time: its warnings are the run's
    if not 0 <= val_size < len(records):
        raise DataError(
            f"data file {data_path}: val_size={val_size} must be at least 0 and below the "
            f"{len(records)} records it holds"
        )
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    val_indices, train_indices = sorted(order[:val_size]), sorted(order[val_size:])

    tokenized = tokenized_records(data_path, records, tokenizer, max_length, template)
    splits = []
    for name, indices in (("train", train_indices), ("validation", val_indices)):
        split = tokenized.select(indices, keep_in_memory=True)
        stats = tokenized_stats(split)
        logger.info("%s split of %s: %s (max_length=%d)", name, data_path, stats, max_length)
        if stats["truncated"]:
            logger.warning(
                "%s: %d of %d %s records are longer than max_length=%d and were truncated",
                data_path, stats["truncated"], stats["records"], name, max_length,
            )
        if stats["without_targets"]:
            logger.warning(
                "%s: dropping %d %s records whose prompt alone fills max_length=%d",
                data_path, stats["without_targets"], name, max_length,
            )
            split = split.filter(
                lambda targets: any(target != IGNORE_INDEX for target in targets),
                input_columns="targets",
                keep_in_memory=True,
                load_from_cache_file=False,
            )
        splits.append(split)
    train, validation = splits
    if len(train) == 0:
        raise DataError(
            f"data file {data_path}: no training record has a response within max_length={max_length}"
        )
    return train, validation


def cache_dir() -> Path | None:
    """Where tokenized files are kept: $SOFT_DS_CACHE, default ~/.cache/soft_ds; None when "off"."""
    setting = os.environ.get("SOFT_DS_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "soft_ds"))
    return None if setting.lower() in ("off", "0", "") else Path(setting) / "tokenized"


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides the tokenizer's ids: the files it saves (vocabulary,
    merges or SentencePiece model, special tokens, chat template, added tokens)."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer.save_pretrained(scratch)
        for name in sorted(os.listdir(scratch)):
            digest.update(name.encode() + Path(scratch, name).read_bytes())
    return digest.hexdigest()


def cache_key(data_path, tokenizer, max_length: int, template: str) -> str:
    """What a tokenized file depends on: the data's bytes, the tokenizer, the length, the template,
    and the code that tokenizes (targets.py and templates.py, so a change to it is a new key)."""
    digest = hashlib.sha256(f"{max_length}|{template}|{tokenizer_fingerprint(tokenizer)}".encode())
    for path in (data_path, targets.__file__, templates.__file__):
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:32]


def tokenized_records(data_path, records: list[dict], tokenizer, max_length: int, template: str) -> datasets.Dataset:
    """Every record tokenized (`targets.tokenize_record`), the raw fields beside: from the cache
    when this data, tokenizer, length, template and code were tokenized before, else computed and
    stored there (written beside, renamed into place: concurrent ranks and a kill leave either
    the whole file or none)."""
    folder = cache_dir()
    key = cache_key(data_path, tokenizer, max_length, template) if folder else None
    if folder and (folder / key).is_dir():
        try:
            cached = datasets.load_from_disk(str(folder / key), keep_in_memory=True)
            logger.info("tokenized %s read from %s", data_path, folder / key)
            return cached
        except Exception as error:  # a damaged entry: tokenize again and replace it
            logger.warning("ignoring the damaged tokenized cache %s (%s)", folder / key, error)
            shutil.rmtree(folder / key, ignore_errors=True)
    # keep_in_memory and a fixed fingerprint: no `datasets` cache files, and no attempt to hash
    # the tokenizer captured by the function.
    tokenized = datasets.Dataset.from_list(records).map(
        tokenize_record,
        fn_kwargs={"tokenizer": tokenizer, "max_length": max_length, "template": template},
        keep_in_memory=True,
        load_from_cache_file=False,
        new_fingerprint=f"tokenized-{template}-{max_length}",
        desc="tokenizing",
    )
    if folder:
        folder.mkdir(parents=True, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".{key}-", dir=folder)
        tokenized.save_to_disk(staging)
        try:
            os.rename(staging, folder / key)
        except OSError:  # another rank stored it first
            shutil.rmtree(staging, ignore_errors=True)
    return tokenized
