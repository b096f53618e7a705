"""build_datasets: an Alpaca file as tokenized, seeded train and validation `datasets.Dataset`s.

The one module of soft_ds.data that imports `datasets`; training and the held-out evaluations
(`soft-ds eval lm / kl / answers`) read their records through it.
"""

import logging

import datasets
import torch

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
    records = datasets.Dataset.from_list(load_records(data_path))
    if not 0 <= val_size < len(records):
        raise DataError(
            f"data file {data_path}: val_size={val_size} must be at least 0 and below the "
            f"{len(records)} records it holds"
        )
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    val_indices, train_indices = sorted(order[:val_size]), sorted(order[val_size:])

    # keep_in_memory and a fixed fingerprint: no cache files anywhere, and no attempt to hash
    # the tokenizer captured by the function.
    tokenized = records.map(
        tokenize_record,
        fn_kwargs={"tokenizer": tokenizer, "max_length": max_length, "template": template},
        keep_in_memory=True,
        load_from_cache_file=False,
        new_fingerprint=f"tokenized-{template}-{max_length}",
        desc="tokenizing",
    )
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
