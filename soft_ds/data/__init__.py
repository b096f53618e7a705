"""Alpaca instruction data, from file to micro-batch; one module per concern:

    records     read and validate Alpaca files (.json, .jsonl) and instruction lists; DataError;
                the bundled sample's paths (BUNDLED_RECORDS, BUNDLED_INSTRUCTIONS)
    tokenizer   load_tokenizer (a Hugging Face directory or a SentencePiece file); BUNDLED_TOKENIZER
    templates   prompt text and tokens: Stanford Alpaca's template or the tokenizer's chat template,
                and the template an exported checkpoint records
    targets     a record's tokens and shifted loss targets (IGNORE_INDEX where nothing is learnt);
                how often each token is a target (the speculative draft vocabulary)
    splits      build_datasets: a file as tokenized train and validation `datasets.Dataset`s
    packing     an epoch's rows (one record each, or several packed) and which rows every rank
                reads at an optimizer step; the real tokens a step holds
    batching    rows as fixed-shape (input_ids, targets, positions) tensors; each rank's micro-batches

Only `splits` imports `datasets`, so generation, judging and the draft vocabulary start without it.
This file imports nothing: import the module you use (`from soft_ds.data import records`).
"""
