"""The `ddm` command line: help for every command, and bad input that names the field and the fix."""

import json
import subprocess
import sys

import pytest

from ddm.coordinator.cli import COMMANDS, main
from ddm.coordinator.run_cmd import parse_overrides


def ddm(*args):
    return subprocess.run([sys.executable, "-m", "ddm", *args], capture_output=True, text=True, timeout=120)


def test_top_level_help_lists_every_command():
    r = ddm("--help")
    assert r.returncode == 0
    for name in COMMANDS:
        assert name in r.stdout


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_documents_every_option(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    # every option line carries help text: argparse prints "--opt VALUE   text"; a bare option would end the line
    for line in out.splitlines():
        stripped = line.strip()
        option_line = line.startswith("  --") and not line.startswith("   ")  # not a wrapped help line
        if option_line and "  " not in stripped and not stripped.startswith("--help"):
            nxt = out.splitlines()[out.splitlines().index(line) + 1].strip()
            assert nxt and not nxt.startswith("-"), f"{command}: option without help: {stripped}"


def test_embedded_default_config_resolves():
    r = ddm("run", "--print-config")
    assert r.returncode == 0, r.stderr
    cfg = json.loads(r.stdout)
    assert cfg["partition"]["k"] == 4 and cfg["data"]["source"] == "fashion-mnist" and cfg["islands"] is None


def test_bad_config_field_is_named(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[partition]\nk = 0\n[experts.train]\nbatchsize = 3\n")
    r = ddm("run", str(p), "--print-config")
    assert r.returncode == 2
    assert "partition.k" in r.stderr and "experts.train.batchsize" in r.stderr and "unknown field" in r.stderr
    assert "bad.toml" in r.stderr


def test_a_misspelt_field_gets_the_closest_names(tmp_path):
    p = tmp_path / "typo.toml"
    p.write_text("[partiton]\nk = 2\n[experts.train]\nbatchsize = 3\n")
    r = ddm("run", str(p), "--print-config")
    assert r.returncode == 2
    assert "experts.train.batchsize: unknown field; did you mean 'experts.train.batch_size'?" in r.stderr
    assert "partiton: unknown field; did you mean 'partition'?" in r.stderr


def test_a_misspelt_set_is_blamed_on_set_not_on_the_config_file(tmp_path):
    p = tmp_path / "ok.toml"
    p.write_text("[partition]\nk = 2\n")
    r = ddm("run", str(p), "--set", "experts.train.stpes=3", "--print-config")
    assert r.returncode == 2
    assert r.stderr.startswith(f"ddm run: --set: invalid configuration (on top of {p})")
    assert (
        "experts.train.stpes (from --set experts.train.stpes): unknown field; did you mean 'experts.train.steps'?"
        in r.stderr
    )


def test_override_that_breaks_validation_is_named():
    r = ddm("run", "--set", "partition.fine_k=2", "--print-config")
    assert r.returncode == 2 and "fine_k" in r.stderr


def test_missing_config_file():
    r = ddm("run", "/nonexistent/run.toml")
    assert r.returncode == 2 and "/nonexistent/run.toml" in r.stderr and "not found" in r.stderr


def test_unknown_stage_is_refused(tmp_path):
    r = ddm("run", "--root", str(tmp_path / "r"), "--stages", "curate,bogus")
    assert r.returncode == 2 and "bogus" in r.stderr


def test_parse_overrides_uses_toml_values():
    assert parse_overrides(["a.b=3", "c=true", "d=hello", 'e="x y"', "f=[1, 2]"]) == {
        "a.b": 3, "c": True, "d": "hello", "e": "x y", "f": [1, 2],
    }  # fmt: skip
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_overrides(["novalue"])


def test_help_imports_no_torch_grpc_or_faiss() -> None:
    """``ddm --help`` and every ``ddm CMD --help`` build the whole parser: that must not load the heavy
    libraries (the architecture registries live in torch-free modules, expert/sizes.py, router/sizes.py;
    the sampler, time-grid and strategy registries, whose names are option choices, in expert/samplers.py
    and router/strategies.py, which use tensor methods only)."""
    import subprocess
    import sys

    code = (
        "import sys\nfrom ddm.coordinator.cli import build_parser\nbuild_parser()\n"
        "assert 'ddm.expert.samplers' in sys.modules and 'ddm.router.strategies' in sys.modules\n"
        "print(sorted(m for m in ('torch', 'grpc', 'faiss', 'torchx') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]", done.stdout + done.stderr
