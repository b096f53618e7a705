"""Tokenizer loading: a Hugging Face tokenizer directory or a LLaMA SentencePiece .model file."""

import shutil
import tempfile
from pathlib import Path

from transformers import AutoTokenizer, LlamaTokenizer

from soft_ds.data.records import BUNDLED, DataError

BUNDLED_TOKENIZER = str(BUNDLED / "tokenizer")  # trained on the bundled Alpaca sample (data/README.md)


def load_tokenizer(path):
    """Load a tokenizer from a Hugging Face tokenizer directory or a SentencePiece .model file.

    The result always has bos and eos ids. Without a pad token, pad is set to eos: padding sits
    to the right of every real token and carries IGNORE_INDEX targets (`batching.collate`), so its id
    never reaches the loss or the attention of a real token.
    """
    path = Path(path)
    if not path.exists():
        # Checked here because from_pretrained would take a missing path for a Hub model id.
        raise DataError(f"tokenizer {path}: no such file or directory")
    try:
        if path.is_file():
            tokenizer = _load_sentencepiece(path)
        elif (path / "tokenizer.model").is_file() and not (
            (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file()
        ):
            # A directory holding only tokenizer.model: without a config, AutoTokenizer picks a
            # generic conversion that drops SentencePiece's dummy-prefix "▁".
            tokenizer = _load_sentencepiece(path / "tokenizer.model")
        else:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as error:  # any failure means the same thing to the user: unusable file
        raise DataError(f"tokenizer {path}: cannot be loaded ({type(error).__name__}: {error})") from error
    if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        raise DataError(
            f"tokenizer {path}: needs both a bos and an eos token "
            f"(bos_token_id={tokenizer.bos_token_id}, eos_token_id={tokenizer.eos_token_id})"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_sentencepiece(model_path):
    """A LLaMA SentencePiece model file as a Hugging Face LlamaTokenizer."""
    # transformers loads vocabularies from directories only, and in 5.x
    # LlamaTokenizer(vocab_file=...) silently builds a 3-token tokenizer; so load from a scratch
    # directory. add_bos_token matches LLaMA's published tokenizers, which prepend <s>.
    with tempfile.TemporaryDirectory() as scratch:
        shutil.copyfile(model_path, Path(scratch) / "tokenizer.model")
        return LlamaTokenizer.from_pretrained(scratch, add_bos_token=True)
