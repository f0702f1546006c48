"""The command line as a user meets it."""

import subprocess
import sys

from minillm.cli import main


def test_info_gpt2_prints_124m(capsys):
    assert main(["info", "--preset", "gpt2"]) == 0
    out = capsys.readouterr().out
    assert "124,439,808" in out and "124.44M" in out
    assert "FLOPs/token" in out and "bf16" in out


def test_info_override_and_unknown_key(capsys):
    assert main(["info", "--preset", "tiny", "--n_layer=8"]) == 0
    assert "8 layers" in capsys.readouterr().out
    assert main(["info", "--preset", "tiny", "--n_layr=8"]) == 2
    assert "did you mean --n_layer" in capsys.readouterr().err
    assert main(["info", "--preset", "tiny", "--n_layer=eight"]) == 2
    assert "expects an integer" in capsys.readouterr().err


def test_console_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "minillm.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "info" in out.stdout


def test_missing_optional_extra_is_a_message_not_a_traceback(capsys, monkeypatch):
    import minillm.cli.info as info

    def needs_extra(args, overrides):
        """A command whose optional dependency is not installed."""
        raise ImportError("minillm serve needs uvicorn: pip install 'minillm[serve]'")

    monkeypatch.setattr(info, "cmd_info", needs_extra)  # stands in for a command whose extra is missing
    assert main(["info"]) == 2
    assert "pip install 'minillm[serve]'" in capsys.readouterr().err
