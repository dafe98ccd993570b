"""The command line routes: every command is listed, overrides may follow options, errors exit 2."""

import pytest

from dgg import __version__
from dgg.cli import COMMANDS, build_parser, main


def test_help_lists_every_command(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)
    _, modules = build_parser()
    assert set(modules) == set(COMMANDS)  # every command module imports and registers


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and __version__ in capsys.readouterr().out


def test_overrides_may_follow_options_and_unknown_flags_are_refused(tmp_path, capsys):
    # `dgg bench main --seeds 1 optim.lr=...` puts key=value after an option; it reaches the command as an override
    assert main(["bench", "nope", "--seeds", "1", "optim.lr=1e-3"]) == 2
    assert "unknown experiment" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--no-such-flag"])
    assert exit_info.value.code == 2
