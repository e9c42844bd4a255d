"""The CLI as a user meets it: listings, and one-line errors with a non-zero exit."""
import subprocess
import sys
from pathlib import Path

import cli
from bench import plugins

ROOT = Path(__file__).resolve().parents[1]


def test_models_lists_every_registered_model_with_counts(cli_runner):
    result = cli_runner.invoke(cli.app, ["models"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for name in ("DiT-XL/2", "DiT-S/8", "EDT-S/2", "U-DiT-L"):
        assert name in result.output
    xl2 = next(line for line in result.output.splitlines() if "DiT-XL/2 " in line)
    assert "675,129,632" in xl2 and "118.62" in xl2 and "119" in xl2 and "256" in xl2
    edt_s = next(line for line in result.output.splitlines() if "EDT-S/2 " in line)
    assert "2.67" in edt_s and "2.66" in edt_s  # exact count beside the paper's printed value


def test_published_gmacs_come_from_reference_results():
    from bench import reference

    refs = reference.load_all()
    assert cli.published_gmacs(refs, "U-DiT-B", 256) == "22.22"
    assert cli.published_gmacs(refs, "DiT-XL/2", 512) == "525"
    assert cli.published_gmacs(refs, "DiT-XL/8", 256) == "-"


def test_methods_lists_the_builtin_plugins(cli_runner):
    result = cli_runner.invoke(cli.app, ["methods"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for name in ("dit", "fasterdiffusion", "speedit", "edt", "udit"):
        assert name in plugins.methods()
        assert name in result.output


def test_builtins_are_registered_through_entry_points():
    from importlib.metadata import entry_points

    names = {ep.name for ep in entry_points(group=plugins.ENTRY_POINT_GROUP)}
    assert {"dit", "fasterdiffusion", "speedit", "edt", "udit"} <= names


def test_unknown_hook_is_refused_with_the_reason():
    import pytest

    with pytest.raises(plugins.PluginError, match="unknown sample hook"):
        plugins.get_hook("sample_hooks", "no-such-hook")
    with pytest.raises(plugins.PluginError, match="cannot run on a U-DiT model"):
        plugins.get_hook("sample_hooks", "fasterdiffusion", "U-DiT")


def test_user_errors_are_one_line_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "cli", "sample", "--model", "No-Such/2", "--random-weights",
                             "--vae", "identity", "--out", str(tmp_path / "x")],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "unknown model" in result.stderr


def test_hook_options_parse():
    assert cli.parse_hook_options(["fasterdiffusion.key_steps=fid", "fasterdiffusion.encoder_depth=12"],
                                  ["fasterdiffusion"]) == {"fasterdiffusion": {"key_steps": "fid", "encoder_depth": 12}}
    import pytest

    from bench.errors import UserError

    with pytest.raises(UserError):
        cli.parse_hook_options(["key_steps=fid"], ["fasterdiffusion"])
    with pytest.raises(UserError):
        cli.parse_hook_options(["amm.blocks=1"], ["fasterdiffusion"])


def test_hooks_declare_their_own_model_families():
    import pytest

    assert plugins.get_hook("train_hooks", "edt-mask", "EDT")
    assert plugins.get_hook("sample_hooks", "amm", "DiT")
    with pytest.raises(plugins.PluginError, match="'edt-mask' cannot run on a DiT model"):
        plugins.get_hook("train_hooks", "edt-mask", "DiT")
    with pytest.raises(plugins.PluginError, match="'amm' cannot run on a EDT model"):
        plugins.get_hook("sample_hooks", "amm", "EDT")


def test_running_out_of_memory_is_one_line_and_exit_3_while_bugs_keep_their_traceback(monkeypatch, capsys):
    import pytest
    import torch

    import cli

    def out_of_memory():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.1 GiB total)\n"
                                     "If reserved but unallocated memory is large try setting ...")

    monkeypatch.setattr(cli, "app", out_of_memory)
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 3
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Tried to allocate 20.00 GiB" in err and "run the same command" in err

    def bug():
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(cli, "app", bug)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        cli.main()
