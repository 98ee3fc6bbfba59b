"""tools/kernel_ab.py: a git revision's Numba kernels beside this checkout's, in one process."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from _tools import ROOT, tool

pytest.importorskip("numba")


def _has_history() -> bool:
    if shutil.which("git") is None:
        return False
    res = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, check=False)
    return res.returncode == 0


needs_git = pytest.mark.skipif(not _has_history(), reason="needs this checkout's git history")


def test_imports_from_above_the_kernels_become_absolute():
    ab = tool("kernel_ab")
    src = (
        "from ..._dropout import split_seed, threshold\n"
        "from ... import _dropout\n"
        "from ..numpy_ import x\n"
        "from .tiles import cast_like\n"
        "import numba as nb\n"
    )
    assert ab.absolute_parents(src).splitlines() == [
        "from selfattn._dropout import split_seed, threshold",
        "from selfattn import _dropout",
        "from selfattn.backends.numpy_ import x",
        "from .tiles import cast_like",
        "import numba as nb",
    ]


@needs_git
def test_calls_are_routed_to_the_revisions_kernels_or_this_checkouts(tmp_path, monkeypatch):
    from selfattn.backends import numba_

    ab = tool("kernel_ab")
    monkeypatch.setattr(numba_, "_kernel", numba_._kernel)  # restored after the test
    monkeypatch.setattr("sys.path", list(__import__("sys").path))
    name = ab.base_package("HEAD", tmp_path)
    files = {p.name for p in next(tmp_path.iterdir()).joinpath(name).iterdir()}
    assert {"__init__.py", "simd.py", "microkernel.py", "tiles.py", "args.py"} <= files
    use_base = ab.route(name)
    use_base(True)
    assert numba_._kernel("simd.forward").py_func.__module__ == f"{name}.simd"
    use_base(False)
    assert numba_._kernel("simd.forward").py_func.__module__ == "selfattn.backends._numba.simd"
    with pytest.raises(SystemExit, match="not a commit"):
        ab.base_package("no-such-revision-xyz", tmp_path)


@needs_git
def test_one_run_against_head(tmp_path, monkeypatch, capsys):
    from selfattn.backends import numba_

    ab = tool("kernel_ab")
    monkeypatch.setattr(numba_, "_kernel", numba_._kernel)
    monkeypatch.setattr("sys.path", list(__import__("sys").path))
    argv = ["--base", "HEAD", "--shape", "1,1,16,16", "--blocks", "1", "--min-time", "0", "--cache", str(tmp_path)]
    assert ab.main(argv) == 0
    out = capsys.readouterr().out
    diff = float(out.split("max |this - base| ")[1].split()[0])
    assert "this / base" in out
    clean = subprocess.run(["git", "-C", str(ROOT), "diff", "--quiet", "HEAD", "--", "selfattn/backends/_numba"])
    if clean.returncode == 0:  # the same kernels on both sides: the same bits
        assert diff == 0.0
    with pytest.raises(SystemExit):
        ab.main(["--base", "HEAD", "--shape", "1,2,3"])


def test_a_changed_kernel_signature_stops_with_a_clear_message(monkeypatch, capsys):
    # A base revision whose kernels take other arguments than this checkout's host code passes
    # (here: every base kernel a stand-in that refuses them, as Numba's dispatcher does).
    from selfattn.backends import numba_

    ab = tool("kernel_ab")
    monkeypatch.setattr(numba_, "_kernel", numba_._kernel)
    real = numba_._kernel

    def refuse(*args):
        raise TypeError("too many arguments: expected 7, got 8")

    def route(base):
        def use_base(flag):
            numba_._kernel = (lambda path: refuse) if flag else real

        return use_base

    monkeypatch.setattr(ab, "base_package", lambda rev, cache: "fake_base")
    monkeypatch.setattr(ab, "route", route)
    argv = ["--base", "OLD", "--shape", "1,1,16,16", "--blocks", "1", "--min-time", "0", "--threads", "1"]
    assert ab.main(argv) == 2
    err = capsys.readouterr().err
    assert "signature changed since OLD" in err and "expected 7, got 8" in err
