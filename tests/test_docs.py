"""The documentation's commands name options and files that exist.

Every fenced shell block (```bash, ```sh or ``` without a language) of README.md and docs/*.md is
read line by line (joined over trailing backslashes; comments, #SBATCH lines and heredoc bodies
skipped; in a block that shows a `$ ` prompt, only the prompted lines are commands, the rest is
output). A line that runs `soft-ds SUBCOMMAND [SUB]`, `python soft_ds/train.py` (under any launcher:
deepspeed, mpirun, srun, sbatch's pass-through) or `python -m soft_ds.cli` has every `--flag`
checked against that command's own `--help`, obtained in this process from the module's `main()`
as `soft_ds/cli.py` dispatches it. Hyphens and underscores are the same letter here (`--ds-config`,
`--ds_config`), as the commands accept both. DeepSpeed launcher options are checked against
DeepSpeed's launcher. `bash tools/X.sh`, `sbatch slurm/X` and `ds_configs/*.json` arguments must
name files that exist, and relative Markdown links must point at existing files and headings.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import re
import shlex
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

SHELL_LANGUAGES = {"", "bash", "sh", "shell", "console"}
TRAIN_SCRIPT = "soft_ds/train.py"
NESTED = {"bench", "eval"}  # soft-ds commands whose first argument is a sub-command of their own
LAUNCHERS = {"deepspeed", "mpirun", "srun", "env", "python", "python3", "torchrun", "sbatch", "bash", "soft-ds"}
SEPARATORS = {";", "&&", "||", "|", "&"}
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
HEREDOC = re.compile(r"<<-?\s*['\"]?(\w+)['\"]?")


def normalise(flag: str) -> str:
    return flag.replace("_", "-")


# --------------------------------------------------------------------------------------------
# What each command accepts, from its own --help


def options_in_help(text: str) -> set[str]:
    """The long options argparse lists: lines indented two spaces that start with a dash; only the
    part before the help column (two or more spaces), so flags named in help prose do not count."""
    flags = set()
    for line in text.splitlines():
        if line.startswith("  -"):
            invocation = re.split(r"\s{2,}", line.strip(), maxsplit=1)[0]
            flags.update(normalise(f) for f in re.findall(r"--[A-Za-z][\w-]*", invocation))
    return flags


def run_help(main, argv: list[str]) -> str | None:
    """`main(argv + ["--help"])`'s standard output; None when it exits with an error (an unknown
    sub-command)."""
    out, err = io.StringIO(), io.StringIO()
    saved = list(sys.argv)
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main([*argv, "--help"])
    except SystemExit as stop:
        code = stop.code or 0
    finally:
        sys.argv[:] = saved
    return out.getvalue() if code == 0 else None


@functools.lru_cache(maxsize=None)
def soft_ds_options(command: tuple[str, ...]) -> set[str] | None:
    """Options of `soft-ds COMMAND [SUB]`, or None when there is no such (sub-)command."""
    from soft_ds.cli import COMMANDS

    commands, words = COMMANDS, list(command)
    while words and words[0] in commands and isinstance(commands[words[0]][0], dict):  # soft-ds bench X
        commands = commands[words.pop(0)][0]
    if not words or words[0] not in commands:
        return None
    module = importlib.import_module(commands[words[0]][0])
    text = run_help(module.main, words[1:])
    return None if text is None else options_in_help(text)


@functools.lru_cache(maxsize=None)
def deepspeed_launcher_options() -> set[str]:
    from deepspeed.launcher import runner

    return options_in_help(run_help(lambda argv: runner.parse_args(argv), []) or "")


# --------------------------------------------------------------------------------------------
# Reading the documents


def shell_blocks(text: str):
    """(line number of the block's first line, its lines) for every fenced shell block."""
    block, start, language = None, 0, ""
    for number, line in enumerate(text.splitlines(), 1):
        fence = re.match(r"^\s*```\s*([\w+-]*)", line)
        if fence and block is None:
            block, start, language = [], number + 1, fence.group(1).lower()
        elif fence:
            if language in SHELL_LANGUAGES:
                yield start, block
            block = None
        elif block is not None:
            block.append(line)


def command_lines(start: int, lines: list[str]):
    """(line number, command) for every command of a block, continuation lines joined."""
    prompted = any(line.startswith("$ ") for line in lines)
    heredoc_end = None
    pending, pending_start = "", 0
    for number, line in enumerate(lines, start):
        if heredoc_end is not None:
            if line.strip() == heredoc_end:
                heredoc_end = None
            continue
        if pending:
            text = pending + " " + line.strip()
        elif prompted and not line.startswith("$ "):
            continue  # output shown after a prompt
        else:
            text, pending_start = (line[2:] if prompted else line).strip(), number
        if text.endswith("\\"):
            pending = text[:-1].rstrip()
            continue
        pending = ""
        heredoc = HEREDOC.search(text)
        if heredoc:
            heredoc_end = heredoc.group(1)
        if text and not text.startswith("#"):
            yield pending_start, text


def segments(command: str) -> list[list[str]]:
    """The simple commands of a line (split at ;, &&, ||, |), comments removed."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    parts, current = [], []
    for token in lexer:
        if token in SEPARATORS:
            parts.append(current)
            current = []
        else:
            current.append(token)
    parts.append(current)
    return [part for part in parts if part]


def long_flags(words: list[str]) -> list[str]:
    return [word.split("=", 1)[0] for word in words if re.match(r"^--[A-Za-z]", word)]


# --------------------------------------------------------------------------------------------
# Checking


def check_words(words: list[str]) -> list[str]:
    """Problems of one simple command, as messages."""
    problems = []
    assignments = []
    while words and ENV_ASSIGNMENT.match(words[0]):
        assignments.append(words.pop(0).split("=", 1)[1])
    if not words:
        return problems

    # Files the command names.
    for index, word in enumerate(words):
        value = word.split("=", 1)[1] if word.startswith("--ds") and "=" in word else word
        previous = words[index - 1] if index else ""
        if normalise(previous) == "--ds-config" or normalise(word.split("=", 1)[0]) == "--ds-config":
            if value.startswith("ds_configs/") and not (REPO / value).is_file():
                problems.append(f"{value}: no such config")
    for value in assignments:
        if value.startswith("ds_configs/") and not (REPO / value).is_file():
            problems.append(f"{value}: no such config")

    program = words[0]
    if program == "bash" or program == "sbatch":
        scripts = [w for w in words[1:] if w.startswith(("tools/", "slurm/"))]
        problems += [f"{script}: no such file" for script in scripts if not (REPO / script).is_file()]
        if program == "sbatch" and scripts:  # options after the script pass through to train.py
            problems += check_flags(long_flags(words[words.index(scripts[0]) + 1:]), ("train",), "train.py")
        return problems

    if program == "soft-ds":
        return problems + check_soft_ds(words[1:])
    if program in ("python", "python3") and words[1:3] == ["-m", "soft_ds.cli"]:
        return problems + check_soft_ds(words[3:])

    script = next((i for i, w in enumerate(words) if w.endswith(TRAIN_SCRIPT)), None)
    if script is None:
        return problems
    if program == "deepspeed":
        known = deepspeed_launcher_options()
        problems += [f"{flag} is not an option of the deepspeed launcher"
                     for flag in long_flags(words[1:script]) if normalise(flag) not in known]
    return problems + check_flags(long_flags(words[script + 1:]), ("train",), "train.py")


def check_soft_ds(arguments: list[str]) -> list[str]:
    if not arguments or arguments[0].startswith("-"):
        return []
    command = tuple(arguments[:2]) if arguments[0] in NESTED and len(arguments) > 1 else (arguments[0],)
    name = "soft-ds " + " ".join(command)
    return check_flags(long_flags(arguments[len(command):]), command, name)


def check_flags(flags: list[str], command: tuple[str, ...], name: str) -> list[str]:
    known = soft_ds_options(command)
    if known is None:
        return [f"{name}: no such command"]
    return [f"{flag} is not an option of {name}" for flag in flags if normalise(flag) not in known]


def check_markdown(text: str, name: str = "snippet") -> list[str]:
    """Every problem of a Markdown document's commands, as `name:line: command: problem`."""
    problems = []
    for start, lines in shell_blocks(text):
        for number, command in command_lines(start, lines):
            shown = re.sub(r"\s+#.*$", "", command)[:100]
            first = command.split()
            while first and ENV_ASSIGNMENT.match(first[0]):
                first.pop(0)
            if not first or first[0] not in LAUNCHERS:
                continue
            try:
                parts = segments(command)
            except ValueError as error:  # unbalanced quotes
                problems.append(f"{name}:{number}: {shown}: {error}")
                continue
            for words in parts:
                for problem in check_words(words):
                    problems.append(f"{name}:{number}: {shown}: {problem}")
    return problems


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = path.read_text()
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return {slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, flags=re.M)}


def check_links(path: Path) -> list[str]:
    problems = []
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target):
            continue  # a web address
        file, _, anchor = target.partition("#")
        destination = (path.parent / file) if file else path
        if not destination.exists():
            problems.append(f"{path.relative_to(REPO)}: link to {target}: no such file")
        elif anchor and destination.suffix == ".md" and anchor not in anchors(destination):
            problems.append(f"{path.relative_to(REPO)}: link to {target}: no such heading")
    return problems


# --------------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(REPO)))
def test_commands_name_options_and_files_that_exist(document):
    problems = check_markdown(document.read_text(), str(document.relative_to(REPO)))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(REPO)))
def test_links_point_at_files_and_headings_that_exist(document):
    problems = check_links(document)
    assert not problems, "\n".join(problems)


def test_the_check_reports_what_does_not_exist():
    snippet = "\n".join([
        "Some prose with `soft-ds export --not-checked` inline.",
        "```bash",
        "soft-ds export --run runs/x --out y --no-such-flag       # a comment --ignored",
        "deepspeed --num_gpus 2 --no_such_launcher_flag soft_ds/train.py --ds-config ds_configs/missing.json \\",
        "    --output-dir runs/x --bogus-option 1",
        "soft-ds bench overhead --repeats 2 --nonsense",
        "soft-ds eval nonsense --out eval",
        "soft-ds frobnicate",
        "bash tools/no_such_script.sh",
        "MODEL=debug sbatch --nodes 2 slurm/soft.sbatch --train-step 20",
        "```",
    ])
    problems = "\n".join(check_markdown(snippet))
    for expected in ["--no-such-flag is not an option of soft-ds export",
                     "--no_such_launcher_flag is not an option of the deepspeed launcher",
                     "ds_configs/missing.json: no such config",
                     "--bogus-option is not an option of train.py",
                     "--nonsense is not an option of soft-ds bench overhead",
                     "soft-ds eval nonsense: no such command",
                     "soft-ds frobnicate: no such command",
                     "tools/no_such_script.sh: no such file",
                     "--train-step is not an option of train.py"]:
        assert expected in problems, problems
    assert "--ignored" not in problems and "--not-checked" not in problems
    assert problems.count("\n") + 1 == 9, problems


def test_both_spellings_pass_and_output_is_not_checked():
    snippet = "\n".join([
        "```",
        "soft-ds generate --model m --prompt p --max_new_tokens 3 --max-new-tokens 3",
        "deepspeed --num_gpus 2 soft_ds/train.py --ds_config ds_configs/tiny_pp2.json --output-dir runs/x \\",
        "    --train_steps 3 --no-packing",
        "python - <<'PY'",
        "print('--not-a-flag soft_ds/train.py')",
        "PY",
        "```",
        "```",
        "$ soft-ds export --run runs/x --out y",
        "env srun python3 soft_ds/train.py --not-checked-output",
        "```",
    ])
    assert check_markdown(snippet) == []


def test_every_setting_is_in_the_configuration_reference():
    """docs/configuration.md's tables name every setting soft_ds/settings.py declares (a new setting
    without its row fails here), and no key that is not one."""
    import dataclasses

    from soft_ds.settings import SETTINGS, SoftOptions

    text = (REPO / "docs" / "configuration.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    named = {key for row in rows for key in re.findall(r"`([a-z_.]+)`", row.split("|")[1])}
    soft = {f.name for f in dataclasses.fields(SoftOptions)}
    assert soft - named == set(), "settings missing from docs/configuration.md"
    deepspeed = {f.metadata["ds_key"] for name, f in SETTINGS.items() if name not in soft}
    homes = " ".join(line for line in text.splitlines() if line.startswith("|"))
    assert {key for key in deepspeed if key.split(".")[0] not in homes} == set()
