"""README cannot rot: every command in its ```bash blocks names a script that exists, options
that script's `--help` lists, config files that load and `--set` keys that exist, and `make`
targets the Makefile defines. Nothing is trained: each script is asked for `--help` once."""

from __future__ import annotations

import contextlib
import importlib
import io
import re
import shlex
from functools import cache

import pytest
from conftest import ROOT

from miscc.config import ConfigError, load_config

SHELL_TOOLS = {"mkdir", "unzip", "tar", "source", "echo", "rm", "tensorboard",
               "hf"}  # hf: the Hugging Face CLI that huggingface_hub installs
# README placeholders for the reader's own paths
PLACEHOLDERS = {"FOLDER": "/data/pictures", "FOLDERNAME": "pictures"}


def readme_commands(text: str) -> list[tuple[int, list[str]]]:
    """(line number, words) of every command in the ```bash blocks of `text`: continuation
    lines joined, comments dropped, pipelines split into their commands."""
    found, block, start = [], False, 0
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            block = line.strip() == "```bash" and not block
            i += 1
            continue
        if block and line.strip() and not line.lstrip().startswith("#"):
            start, command = i + 1, line
            while command.rstrip().endswith("\\"):
                i += 1
                command = command.rstrip()[:-1] + " " + lines[i]
            part: list[str] = []
            for word in [*shlex.split(command, comments=True), "|"]:
                if word != "|":
                    part.append(word)
                elif part:
                    found.append((start, part))
                    part = []
        i += 1
    return found


@cache
def script_help(script: str, subcommand: str = "") -> str:
    """What `python <script> [subcommand] --help` prints, from its main() in this process."""
    module = importlib.import_module(script.removesuffix(".py"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        module.main([subcommand, "--help"] if subcommand else ["--help"])
    return out.getvalue()


def make_targets() -> set[str]:
    return set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))


def check_command(words: list[str]) -> list[str]:
    """What is wrong with one README command (empty when nothing is)."""
    if words[0] in SHELL_TOOLS:
        return []
    if words[0] == "make":
        return [f"no make target {t}" for t in words[1:] if "=" not in t
                and t not in make_targets()]
    if words[0] == "torchrun":
        words = ["python", *[w for w in words if w.endswith(".py")][:1],
                 *words[next(i for i, w in enumerate(words) if w.endswith(".py")) + 1:]]
    if words[0] != "python":
        return [f"unknown program {words[0]}"]
    script, args = words[1], [PLACEHOLDERS.get(a, a) for a in words[2:]]
    if not (ROOT / script).is_file():
        return [f"no script {script}"]
    sub = args[0] if script == "prepare_data.py" and args else ""
    options = set(re.findall(r"(--[\w-]+)", script_help(script, sub)))
    problems = [f"{script}: no option {a.split('=')[0]}" for a in args
                if a.startswith("--") and a.split("=")[0] not in options]
    cfg, sets = None, []
    for flag, value in zip(args, [*args[1:], ""], strict=True):
        if flag == "--cfg":
            cfg = value
        elif flag == "--set":
            sets.append(value)
    if cfg is not None and not (ROOT / cfg).is_file():
        problems.append(f"{script}: no config file {cfg}")
    elif cfg is not None or sets:
        try:
            load_config(ROOT / cfg if cfg else None, sets, quiet=True)
        except ConfigError as err:
            problems.append(f"{script}: {err}")
    return problems


def test_every_readme_command_names_existing_scripts_options_configs_and_keys() -> None:
    commands = readme_commands((ROOT / "README.md").read_text())
    assert len(commands) > 30  # the blocks were found
    scripts = {w[1] for _, w in commands if w[0] == "python"}
    assert {"generate.py", "main.py", "train_vqgan.py", "train_clipgen.py"} <= scripts
    problems = [f"README line {line}: {p}" for line, words in commands
                for p in check_command(words)]
    assert not problems, "\n".join(problems)


def test_the_checker_finds_a_wrong_script_option_config_and_key() -> None:
    text = "\n".join([
        "```bash",
        "python nope.py --cfg cfg/DAMSM/shapes.yml",
        "python main.py --cfg cfg/DAMSM/shapes.yml --no-such-flag",
        "python main.py --cfg cfg/missing.yml",
        "python main.py --cfg cfg/DAMSM/shapes.yml --set TRAIN.BATCHSIZE=4",
        "make demo no-such-target",
        "```"])
    problems = [p for _, w in readme_commands(text) for p in check_command(w)]
    assert problems[0] == "no script nope.py"
    assert problems[1] == "main.py: no option --no-such-flag"
    assert problems[2] == "main.py: no config file cfg/missing.yml"
    assert "unknown key TRAIN.BATCHSIZE" in problems[3]
    assert problems[4] == "no make target no-such-target"
    assert len(problems) == 5
