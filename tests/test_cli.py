"""The installed `soft-ds` command: its help lists every subcommand, each subcommand's --help
answers through the installed script, and a library ValueError becomes one `error:` line."""

import subprocess

import pytest

from conftest import REPO, run_cli, soft_ds_command
from soft_ds.cli import COMMANDS


def soft_ds(*args):
    return subprocess.run([soft_ds_command(), *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_help_lists_every_subcommand():
    out = soft_ds("--help")
    assert out.returncode == 0, out.stderr
    listed = {line.split()[0] for line in out.stdout.splitlines() if line.startswith("    ") and line.split()}
    assert set(COMMANDS) <= listed, out.stdout


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_subcommand_answers_help_through_the_installed_command(name):
    out = soft_ds(name, "--help")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: soft-ds {name}"), out.stdout[:200]


def test_unknown_subcommand_is_an_error():
    out = soft_ds("fly")
    assert out.returncode == 2 and "invalid choice: 'fly'" in out.stderr


def test_library_value_error_is_one_error_line(capsys):
    out = run_cli(capsys, "plan", "--ds-config", "ds_configs/tiny_pp2.json", "--model", "/nonexistent/config.json")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert [line for line in out.stderr.splitlines() if line] == [out.stderr.strip()]
    assert out.stderr.startswith("error: --model '/nonexistent/config.json' is neither a named size")
