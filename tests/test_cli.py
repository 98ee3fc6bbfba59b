"""The command line (info, check) and the README's generated support table."""

import json
import pathlib
import subprocess
import sys

from selfattn.__main__ import main, support_table

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run(*args):
    return subprocess.run([sys.executable, "-m", "selfattn", *args], capture_output=True, text=True, timeout=600)


def test_info_lists_every_backend_with_reason():
    res = run("info")
    assert res.returncode == 0, res.stderr
    for name in ("numpy", "numba", "cupy"):
        assert name in res.stdout
    assert "available" in res.stdout


def test_info_json_is_machine_readable():
    res = run("info", "--json")
    data = json.loads(res.stdout)
    names = {b["name"]: b for b in data["backends"]}
    assert names["numpy"]["available"] is True
    assert names["numpy"]["capabilities"]["array_type"] == "numpy"
    assert data["environment"]["numpy"]


def test_check_passes_for_numpy_and_reports_table(capsys):
    assert main(["check", "--backend", "numpy"]) == 0
    out = capsys.readouterr().out
    assert "numpy" in out and "PASS" in out and "mask" in out


def test_check_exit_status_reflects_failures(monkeypatch, capsys):
    import selfattn.testing.check as check

    def broken(backend, case):
        raise AssertionError("planted failure")

    monkeypatch.setattr(check, "check_case", broken)
    assert main(["check", "--backend", "numpy"]) == 1
    assert "planted failure" in capsys.readouterr().out


def test_readme_support_table_is_generated_from_capabilities():
    """The README embeds `python -m selfattn info --table`; regenerate it when capabilities change."""
    readme = (ROOT / "README.md").read_text()
    # Plugins registered only for the tests (loopback) are not part of the documented table.
    table = "\n".join(line for line in support_table(builtin_only=True).splitlines())
    assert table in readme, "README support table is stale: paste `python -m selfattn info --table` into it"
