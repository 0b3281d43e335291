import argparse
import shlex
import subprocess
import sys
import textwrap

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


def test_the_command_starts_without_torch_so_a_ctrl_c_while_torch_loads_is_one_line(tmp_path):
    # The `lowcon` script imports lowcon.cli, which loads no torch (lowcon's names are imported on
    # first use): torch's import, the slow second of a start, runs inside the command, and a
    # Ctrl-C there is "lowcon: interrupted", exit 130, not a traceback. The Ctrl-C is simulated
    # by an import hook that raises KeyboardInterrupt when torch is imported.
    script = textwrap.dedent("""
        import sys
        import lowcon.cli
        import lowcon
        assert "torch" not in sys.modules, "lowcon.cli or lowcon imported torch"
        assert "ResnetGenerator" in dir(lowcon) and "PatchNCELoss" in lowcon.__all__

        class CtrlC:
            def find_spec(self, name, path=None, target=None):
                if name == "torch":
                    raise KeyboardInterrupt

        sys.meta_path.insert(0, CtrlC())
        sys.exit(lowcon.cli.main(["train", "cut", "--steps", "1", "--run-dir", sys.argv[1]]))
    """)
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "run")], capture_output=True, text=True)
    assert (done.returncode, done.stderr) == (130, "lowcon: interrupted\n")
    assert not (tmp_path / "run").exists()


def test_lowcon_names_load_on_first_use():
    import lowcon

    assert lowcon.ResnetGenerator.__module__ == "lowcon.models.resnet_generator"
    assert lowcon.psnr.__module__ == "lowcon.metrics.psnr"
    assert lowcon.training.__name__ == "lowcon.training"  # subpackages too
    with pytest.raises(AttributeError, match="module 'lowcon' has no attribute 'Resnet'"):
        lowcon.Resnet
    missing = [name for name in lowcon.__all__ if not hasattr(lowcon, name)]  # every export resolves
    assert missing == [] and len(lowcon.__all__) == 29
