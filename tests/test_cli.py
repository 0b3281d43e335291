import argparse
import shlex

import pytest

from lowcon.cli import build_parser


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_command_lists_examples_and_every_option_says_what_it_does():
    commands = _commands()
    assert set(commands) == {"train", "eval", "dehaze", "translate", "synth-haze", "demo", "export", "presets"}
    for name, command in commands.items():
        text = command.format_help()
        assert "examples:\n  lowcon " in text or "examples:\n  torchrun " in text, name
        undocumented = [a.dest for a in command._actions if not a.help]
        assert not undocumented, f"{name}: {undocumented}"


def test_help_shows_defaults_only_where_there_is_one():
    translate = _commands()["translate"].format_help()
    assert "(default: AtoB)" in translate and "(default: 1)" in translate
    assert "(default: None)" not in translate and "(default: False)" not in translate
    assert "(default: shipped)" in _commands()["eval"].format_help()  # a list default, as typed


def _examples(command: argparse.ArgumentParser) -> list[list[str]]:
    """Each example of `command`'s help as the arguments after ``lowcon``."""
    epilog = command.epilog.split("examples:\n", 1)[1].replace("\\\n", " ")
    lines = [shlex.split(line, comments=True) for line in epilog.splitlines() if line.strip()]
    return [words[words.index("lowcon") + 1:] for words in lines]


@pytest.mark.parametrize("name", sorted(_commands()))
def test_every_example_in_the_help_parses(name):
    parser = build_parser()
    for argv in _examples(_commands()[name]):
        args = parser.parse_args(argv)
        assert args.command == name and callable(args.func)
