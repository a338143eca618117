"""The CLI shell: help, version, and one-line errors with exit code 2."""

from shitu_cli.cli import COMMANDS


def test_help_lists_only_registered_commands(cli):
    result = cli("--help")
    assert result.exit_code == 0
    for name in COMMANDS:
        assert name in result.stdout


def test_version_names_the_libraries(cli):
    result = cli("--version")
    assert result.exit_code == 0
    for name in ("shitu 0.1.0", "paddlepaddle 3.3.1", "paddleclas 2.6.0", "paddledet 2.6.0", "faiss-cpu"):
        assert name in result.stdout


def test_reproduce_missing_recipe_is_one_line_exit_2(cli, tmp_path):
    result = cli("reproduce", tmp_path / "nope.yaml")
    assert result.exit_code == 2
    assert "nope.yaml" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_python_dash_m_runs(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "shitu_cli", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    assert "reproduce" in done.stdout
