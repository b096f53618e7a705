"""Train the small LLaMA-style SentencePiece tokenizer bundled in data/tokenizer/.

The real LLaMA tokenizer cannot be redistributed freely and is far larger than tests need, so the
repository ships a 4096-piece tokenizer trained on the bundled Alpaca subset. It follows LLaMA's
SentencePiece recipe (BPE, byte fallback, split digits, identity normalization, dummy prefix,
<unk>=0 <s>=1 </s>=2, no pad piece) so code written against it works unchanged with a real
LLaMA tokenizer.

    soft-ds train-tokenizer --data data/alpaca_5000.json --vocab-size 4096 --out data/tokenizer
"""

import io
import tempfile
from pathlib import Path

import sentencepiece as spm

from soft_ds.data.records import DataError, load_records
from soft_ds.settings import ArgumentParser

# The model is shipped in the repository; keep it under this size (bytes) so clones stay light.
MAX_TOKENIZER_DIR_BYTES = 1_000_000
# Files an earlier run (or another tokenizer) may have left in --out that would shadow ours.
STALE_TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)


def alpaca_lines(records):
    """Yield the training text of Alpaca records: instruction, input and output, one line each.

    Text is split on newlines so no piece ever contains "\\n": as in LLaMA, a newline is then
    encoded through byte fallback as <0x0A>.
    """
    for record in records:
        for field in ("instruction", "input", "output"):
            for line in record[field].split("\n"):
                if line.strip():
                    yield line


def train_sentencepiece(records, vocab_size):
    """Return the serialized SentencePiece model (bytes) trained on the Alpaca text."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=alpaca_lines(records),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        # LLaMA's special ids; no pad piece (pad_id=-1), callers pad with eos.
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        # LLaMA's normalization: none, keep whitespace as written, prepend one space ("▁").
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        byte_fallback=True,
        character_coverage=0.99995,
        # Determinism: use every sentence in file order on one thread (no sampling, no shuffling).
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=1,
        max_sentence_length=1 << 16,
        minloglevel=2,
    )
    return model.getvalue()


def write_tokenizer_dir(model_bytes, out_dir):
    """Write tokenizer.model and the Hugging Face config files into out_dir; return the tokenizer."""
    from transformers import LlamaTokenizer

    out_dir = Path(out_dir)
    # Load from a scratch directory holding only tokenizer.model: stale config files in out_dir
    # from an earlier run must not influence how the new model is read. The class is named
    # explicitly (soft_ds.data.tokenizer.load_tokenizer does the same for bare .model files): with no config,
    # AutoTokenizer falls back to a generic conversion that drops the dummy-prefix "▁", and
    # LlamaTokenizer stops adding <s> unless asked, unlike LLaMA's published tokenizers.
    with tempfile.TemporaryDirectory() as scratch:
        (Path(scratch) / "tokenizer.model").write_bytes(model_bytes)
        tokenizer = LlamaTokenizer.from_pretrained(scratch, add_bos_token=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        # Remove only files a tokenizer directory holds, never the directory: --out may be shared.
        for name in STALE_TOKENIZER_FILES:
            (out_dir / name).unlink(missing_ok=True)
        (out_dir / "tokenizer.model").write_bytes(model_bytes)
        tokenizer.save_pretrained(out_dir)
    return tokenizer


def check_tokenizer_dir(out_dir, vocab_size, record):
    """Reload out_dir as a user would and fail loudly if it is not the tokenizer we trained."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    sentencepiece = spm.SentencePieceProcessor(model_file=str(Path(out_dir) / "tokenizer.model"))
    problems = []
    if type(tokenizer).__name__ != "LlamaTokenizer":
        problems.append(f"AutoTokenizer loads it as {type(tokenizer).__name__}, not LlamaTokenizer")
    if len(tokenizer) != vocab_size:
        problems.append(f"len(tokenizer) is {len(tokenizer)}, expected {vocab_size}")
    if (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) != (0, 1, 2):
        problems.append(
            "special ids (unk, bos, eos) are "
            f"{(tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)}, "
            "expected (0, 1, 2)"
        )
    samples = [
        record["instruction"] + "\n" + record["output"],
        "Tabs\tand  double spaces, digits 12345, accents café, emoji 🦙.",
    ]
    for text in samples:
        ids = tokenizer.encode(text, add_special_tokens=False)
        decoded = tokenizer.decode(ids)
        if decoded != text:
            problems.append(f"round trip changed {text!r} into {decoded!r}")
        if tokenizer.unk_token_id in ids:
            problems.append(f"{text!r} encodes to <unk> despite byte fallback")
        # The Hugging Face conversion must split text exactly as SentencePiece itself does.
        if ids != sentencepiece.encode(text):
            problems.append(f"{text!r}: Hugging Face and SentencePiece token ids differ")
        if tokenizer.encode(text)[0] != tokenizer.bos_token_id:
            problems.append("encode() does not start with <s>")
    size = sum(path.stat().st_size for path in Path(out_dir).iterdir() if path.is_file())
    if size > MAX_TOKENIZER_DIR_BYTES:
        problems.append(f"{out_dir} holds {size} bytes, more than {MAX_TOKENIZER_DIR_BYTES}")
    if problems:
        raise DataError(f"the tokenizer written to {out_dir} failed its check: " + "; ".join(problems))
    return size


def parse_args(argv=None):
    parser = ArgumentParser(
        description="Train a LLaMA-style SentencePiece BPE tokenizer (byte fallback, split digits, "
        "identity normalization) on the instruction, input and output text of an Alpaca JSON file, "
        "and write it as a Hugging Face tokenizer directory (tokenizer.model plus the files "
        "save_pretrained writes) loadable with AutoTokenizer.from_pretrained(OUT).",
    )
    parser.add_argument(
        "--data",
        default="data/alpaca_5000.json",
        help="Alpaca-format JSON file: a list of {instruction, input, output} objects "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=4096,
        help="number of pieces, including <unk>, <s>, </s> and the 256 byte pieces "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--out",
        default="data/tokenizer",
        help="output directory, created if needed; tokenizer files already in it are replaced "
        "(default: %(default)s)",
    )
    return parser.parse_args(argv)


def main(argv=None):
    """`soft-ds train-tokenizer`: train, write, reload and check; DataError on bad input."""
    args = parse_args(argv)
    # 3 special pieces + 256 byte pieces must fit, with room for merges.
    if args.vocab_size <= 259:
        raise DataError(f"--vocab-size {args.vocab_size} is too small: byte fallback alone needs 259")
    records = load_records(args.data)  # checked before any training
    model_bytes = train_sentencepiece(records, args.vocab_size)
    write_tokenizer_dir(model_bytes, args.out)
    size = check_tokenizer_dir(args.out, args.vocab_size, records[0])
    print(f"wrote {args.out} ({args.vocab_size} pieces, {size} bytes)")
