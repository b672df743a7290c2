"""Every `elasticserve ...` command's --help, run in-process the way a user types it: the usage
names the command as typed (not `python -m ...`), and every option says what it does."""

from __future__ import annotations

import argparse
import os
from importlib.metadata import PackageNotFoundError, version

import pytest

import elasticserve
from elasticserve.cli import BENCHES, DEFAULT_MODEL_HELP, main

SUBCOMMANDS = ["make-model", "generate", "demo", "serve", "top", "bench"]
SIMULATE = ["ramp3", "zipf16", "longctx", "trace", "pd", "calibrate", "fit-lengths"]
# (argv before --help, the prog its usage must show)
COMMANDS = ([([], "elasticserve")] + [([c], f"elasticserve {c}") for c in SUBCOMMANDS]
            + [(["simulate"], "elasticserve simulate")]
            + [(["simulate", c], f"elasticserve simulate {c}") for c in ("calibrate", "pd", "fit-lengths")]
            + [(["bench", b], f"elasticserve bench {b}") for b in BENCHES])


def _help_of(argv: list[str], capsys: pytest.CaptureFixture[str],
             monkeypatch: pytest.MonkeyPatch) -> tuple[argparse.ArgumentParser, str]:
    """Run `elasticserve ARGV --help`; the parser that printed the help, and the text."""
    monkeypatch.setenv("COLUMNS", "200")  # no wrapped names, usage on one line
    printed: list[argparse.ArgumentParser] = []
    original = argparse.ArgumentParser.print_help

    def spy(self: argparse.ArgumentParser, file: object = None) -> None:
        printed.append(self)
        original(self, file)  # type: ignore[arg-type]

    monkeypatch.setattr(argparse.ArgumentParser, "print_help", spy)
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and len(printed) == 1
    return printed[0], out


def _undocumented(parser: argparse.ArgumentParser) -> list[str]:
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            # add_parser() without help= leaves no entry here at all
            documented = {a.dest for a in action._choices_actions if (a.help or "").strip()}
            missing += [name for name in action.choices if name not in documented]
        elif not (action.help or "").strip() or action.help == argparse.SUPPRESS:
            missing.append("/".join(action.option_strings) or action.dest)
    return missing


@pytest.mark.parametrize(("argv", "prog"), COMMANDS, ids=lambda v: " ".join(v) or "-")
def test_help_names_the_command_and_documents_every_option(
        argv: list[str], prog: str, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    parser, out = _help_of(argv, capsys, monkeypatch)
    assert parser.prog == prog
    assert out.startswith(f"usage: {prog} ")
    assert _undocumented(parser) == []


def test_top_level_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    _, out = _help_of([], capsys, monkeypatch)
    for name in [*SUBCOMMANDS, "simulate", *BENCHES]:
        assert name in out


def test_simulate_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    _, out = _help_of(["simulate"], capsys, monkeypatch)
    listed = out.split("subcommands:", 1)[1].split()
    for name in SIMULATE:
        assert name in listed


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    try:
        expected = version("elasticserve")
    except PackageNotFoundError:
        expected = elasticserve.__version__
    assert exc.value.code == 0 and capsys.readouterr().out == f"elasticserve {expected}\n"


def test_default_model_in_help_is_the_real_default() -> None:
    from elasticserve.models.make_model import DEFAULT_MODEL_DIR

    assert os.path.normpath(DEFAULT_MODEL_HELP) == os.path.normpath(DEFAULT_MODEL_DIR)
