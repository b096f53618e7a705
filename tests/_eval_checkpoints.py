"""Tiny exported checkpoints and data files for the evaluation tests (test_evaluate, test_judge,
test_triviaqa): the "debug" model at 4 layers with the bundled 4,096-piece tokenizer, saved as
`soft-ds export` saves one."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from test_model import hf_reference

from soft_ds.model import preset_config

REPO = Path(__file__).resolve().parent.parent
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
NUM_LAYERS = 4


def tiny_config(**overrides):
    return preset_config("debug", **{"num_hidden_layers": NUM_LAYERS, "vocab_size": 4096, "bos_token_id": 1,
                                     "eos_token_id": 2, "pad_token_id": 0, **overrides})


def save_checkpoint(directory: Path, seed: int, **overrides) -> Path:
    """A random HF LlamaForCausalLM (perturbed norms) with the bundled tokenizer, in float32."""
    hf_reference(tiny_config(**overrides), seed).float().save_pretrained(directory)
    for name in TOKENIZER_FILES:
        shutil.copy(REPO / "data" / "tokenizer" / name, directory / name)
    return directory


# A minimal chat template for the bundled tokenizer (which has none): each turn ends with its eos.
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def _update_json(file: Path, **values) -> None:
    file.write_text(json.dumps({**json.loads(file.read_text()), **values}))


def add_chat_template(tokenizer_dir: Path) -> Path:
    """Give the copy of the bundled tokenizer in tokenizer_dir the chat template CHAT_TEMPLATE."""
    _update_json(tokenizer_dir / "tokenizer_config.json", chat_template=CHAT_TEMPLATE)
    return tokenizer_dir


def record_chat_template(directory: Path) -> Path:
    """Make an export trained with `--template chat`: its tokenizer gets CHAT_TEMPLATE and its
    config.json records the template, as `soft-ds export` records it."""
    _update_json(add_chat_template(directory) / "config.json", soft_ds_template="chat")
    return directory


def write_alpaca(path: Path, count: int = 16) -> Path:
    """The first `count` records of the bundled Alpaca sample, as a .json list."""
    records = json.loads((REPO / "data" / "alpaca_5000.json").read_text())[:count]
    path.write_text(json.dumps(records))
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads on a shared 2-core machine (as in test_inference).
    Autouse in every test module that imports it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_cli_refuses(args, capsys, out: Path, message: str) -> None:
    """`soft-ds eval args` stops with exit code 2 and one `error:` line holding message, no
    traceback, and writes nothing to out."""
    result = run_cli(capsys, "eval", *args)
    error = result.stderr
    assert result.returncode == 2 and message in error and "Traceback" not in error, error
    assert [line for line in error.splitlines() if "error:" in line] == [error.splitlines()[-1]]
    assert not out.exists()
