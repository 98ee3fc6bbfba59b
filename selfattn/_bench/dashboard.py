"""``python -m selfattn dashboard``: the asv benchmark dashboard in one command, viewable offline.

Wraps asv; asv's commands and results format stay the source of truth:

1. ``asv machine --yes`` once, if this machine has no entry in ``~/.asv-machine.json``;
2. ``asv run --skip-existing-commits`` over the commits (default: those of the
   last ``--last`` commits of the first branch in ``asv.conf.json`` -- main --
   that have no results on this machine yet; ``--commits`` takes any asv range
   instead, e.g. ``main~3..main``, ``HEAD^!`` or ``NEW``);
3. ``asv publish`` into ``--out`` (default: the config's ``html_dir``);
4. makes the output self-contained: copies the JavaScript/CSS that asv's
   ``index.html`` loads from CDNs, vendored in
   ``benchmarks/dashboard/vendor/`` from the npm packages of the same names and
   versions, and rewrites ``index.html`` to load those copies (and checks
   that no ``http(s)://`` script or stylesheet is left);
5. ``--serve``: serves the folder on ``127.0.0.1`` and prints the URL.

Browsers refuse the dashboard's data requests from ``file://`` pages, so open
it through ``--serve`` (or ``asv preview``, or any static web server).

Needs a selfattn checkout (``asv.conf.json`` and ``benchmarks/``) and the
``bench`` extra (``pip install -e '.[bench]'``). Exit status: 0 on success, 1
if asv failed or some benchmarks failed, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import http.server
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence

__all__ = ["main", "make_offline", "remote_assets", "default_commits", "find_config", "DashboardError"]

#: Where the vendored assets live, relative to the checkout (the folder holding asv.conf.json).
VENDOR_DIR = os.path.join("benchmarks", "dashboard", "vendor")

_TAG = re.compile(r"<(script|link)\b[^>]*>", re.IGNORECASE | re.DOTALL)
_ATTR = re.compile(r"""\s([a-zA-Z-]+)(?:\s*=\s*("[^"]*"|'[^']*'|[^\s>]+))?""")
_DROP = {"integrity", "crossorigin", "referrerpolicy"}  # CDN-only: SRI needs CORS, which file/local pages lack


class DashboardError(RuntimeError):
    """The dashboard could not be built (message says why and what to do)."""


# ------------------------------------------------------------------------------------------------ asv plumbing


def find_config(path: str | None = None) -> str:
    """The ``asv.conf.json`` to use: ``path``, else the first found from the working directory upwards,
    else the one beside the imported selfattn package (an editable install of a checkout)."""
    if path:
        if not os.path.isfile(path):
            raise DashboardError(f"--config {path!r}: no such file")
        return os.path.abspath(path)
    here = os.getcwd()
    while True:
        cand = os.path.join(here, "asv.conf.json")
        if os.path.isfile(cand):
            return cand
        parent = os.path.dirname(here)
        if parent == here:
            break
        here = parent
    import selfattn

    cand = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(selfattn.__file__))), "asv.conf.json")
    if os.path.isfile(cand):
        return cand
    raise DashboardError(
        "no asv.conf.json found in this directory or above: run this from a selfattn checkout "
        "(git clone ...; pip install -e '.[bench]') or pass --config PATH"
    )


def _load_config(config: str):
    """asv's own reading of the config (JSON with // comments), with paths made absolute."""
    from asv.config import Config

    conf = Config.load(config)
    base = os.path.dirname(config)
    for attr in ("results_dir", "html_dir", "benchmark_dir"):
        setattr(conf, attr, os.path.normpath(os.path.join(base, getattr(conf, attr))))
    if "://" not in conf.repo and not conf.repo.startswith("git@"):
        conf.repo = os.path.normpath(os.path.join(base, conf.repo))
    return conf


def _asv(config: str, *argv: str) -> int:
    """Run ``python -m asv ARGV --config CONFIG`` (its output goes straight to ours); return its exit status."""
    cmd = [sys.executable, "-m", "asv", *argv, "--config", config]
    print("$ python " + shlex.join(cmd[1:]), flush=True)  # what to type to do the step by hand
    return subprocess.run(cmd, cwd=os.path.dirname(config), check=False).returncode


def _machine_known(name: str | None) -> bool:
    from asv.machine import Machine, MachineCollection

    try:
        with open(MachineCollection.get_machine_file_path()) as fh:
            known = json.load(fh)
    except (OSError, ValueError):
        return False
    return (name or Machine.get_unique_machine_name()) in known


def _git(repo: str, *argv: str) -> str:
    res = subprocess.run(["git", "-C", repo, *argv], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise DashboardError(f"git {' '.join(argv)} failed in {repo}: {res.stderr.strip()}")
    return res.stdout.strip()


def default_commits(conf, machine: str, last: int) -> tuple[list[str], list[str]]:
    """``(candidates, missing)``: the last ``last`` first-parent commits of the config's first branch, and
    those of them that have no result file for ``machine`` in the results folder (asv names result files
    ``<first 8 hex digits of the commit>-<environment>.json``)."""
    branch = (getattr(conf, "branches", None) or ["main"])[0]
    commits = _git(conf.repo, "rev-list", "--first-parent", "-n", str(last), branch).split()
    folder = os.path.join(conf.results_dir, machine)
    have = (
        {f[:8] for f in os.listdir(folder) if f.endswith(".json") and f != "machine.json"}
        if os.path.isdir(folder)
        else set()
    )
    return commits, [c for c in commits if c[:8] not in have]


# ------------------------------------------------------------------------------------------- offline rewriting


def _attrs(tag: str) -> dict[str, str | None]:
    return {m.group(1).lower(): (m.group(2).strip("\"'") if m.group(2) else None) for m in _ATTR.finditer(tag)}


def remote_assets(html: str) -> list[str]:
    """The ``http(s)://`` URLs that ``html`` loads as scripts or stylesheets (plain links do not count)."""
    urls = []
    for m in _TAG.finditer(html):
        tag, kind = m.group(0), m.group(1).lower()
        attrs = _attrs(tag)
        if kind == "script":
            url = attrs.get("src")
        else:
            rel = (attrs.get("rel") or "").lower().split()
            url = attrs.get("href") if ("stylesheet" in rel or "preload" in rel or "modulepreload" in rel) else None
        if url and re.match(r"(?i)^(https?:)?//", url):
            urls.append(url)
    return urls


def _sha256(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def make_offline(html_dir: str, vendor_dir: str) -> dict[str, str]:
    """Copy the vendored assets into ``html_dir/vendor`` and point ``html_dir/index.html`` at them.

    Every vendored file is checked against ``lock.json`` first. Raises
    :class:`DashboardError` when ``index.html`` loads a script or stylesheet
    from a URL the manifest does not cover (a newer asv): the dashboard would
    not work offline. Returns ``{url: local path}`` for the references replaced.
    """
    with open(os.path.join(vendor_dir, "manifest.json")) as fh:
        manifest = json.load(fh)
    with open(os.path.join(vendor_dir, "lock.json")) as fh:
        lock = json.load(fh)
    mapping = {}
    for pkg in manifest["packages"]:
        for url, dest in pkg["replaces"].items():
            mapping[url] = f"vendor/{pkg['name']}-{pkg['version']}/{dest}"
    index = os.path.join(html_dir, "index.html")
    with open(index, encoding="utf-8") as fh:
        html = fh.read()
    unknown = [u for u in remote_assets(html) if u not in mapping]
    if unknown:
        raise DashboardError(
            f"{index} loads {unknown}, which {os.path.join(vendor_dir, 'manifest.json')} does not "
            "vendor: add the npm package to the manifest and run "
            "python tools/vendor_dashboard_assets.py --update"
        )
    target = os.path.join(html_dir, "vendor")
    shutil.rmtree(target, ignore_errors=True)
    for entry in lock["packages"]:
        for rel, digest in entry["files"].items():
            src = os.path.join(vendor_dir, *rel.split("/"))
            if not os.path.isfile(src) or _sha256(src) != digest:
                raise DashboardError(
                    f"vendored file {src} is missing or differs from lock.json; restore it from git "
                    "or run python tools/vendor_dashboard_assets.py --update"
                )
            dst = os.path.join(target, *rel.split("/"))
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copyfile(src, dst)
    shutil.copyfile(os.path.join(vendor_dir, "README.md"), os.path.join(target, "README.md"))
    replaced = {}

    def rewrite(m: re.Match) -> str:
        tag = m.group(0)
        attrs = _attrs(tag)
        key = "src" if m.group(1).lower() == "script" else "href"
        url = attrs.get(key)
        if url is None or url not in mapping:
            return tag
        replaced[url] = mapping[url]
        out = tag.replace(url, mapping[url], 1)
        for name in _DROP:  # drop the attribute with its value, in any quoting
            out = re.sub(rf"""\s{name}(\s*=\s*("[^"]*"|'[^']*'|[^\s>]+))?""", "", out, flags=re.IGNORECASE)
        return out

    html = _TAG.sub(rewrite, html)
    left = remote_assets(html)
    if left:  # pragma: no cover - the rewrite covers every mapped URL
        raise DashboardError(f"{index} still loads {left} after the rewrite")
    with open(index, "w", encoding="utf-8") as fh:
        fh.write(html)
    return replaced


# ------------------------------------------------------------------------------------------------------ serving


def serve(html_dir: str, port: int) -> None:
    """Serve ``html_dir`` on 127.0.0.1 (``port`` 0: any free port) until interrupted; print the URL first."""
    handler = functools.partial(_QuietHandler, directory=html_dir)
    try:
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    except OSError as exc:
        if port == 0:
            raise
        print(f"port {port} is busy ({exc.strerror}); using a free one")
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    with httpd:
        print(f"serving {html_dir} at http://127.0.0.1:{httpd.server_address[1]}/ (Ctrl-C stops)", flush=True)
        try:
            httpd.serve_forever()
        except KeyboardInterrupt:
            print("stopped")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's signature
        pass  # one line per file request would bury the URL


# ------------------------------------------------------------------------------------------------------ command


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m selfattn dashboard",
        description=__doc__.split("\n\n")[0],
        epilog="Results accumulate in the config's results_dir (.asv/results); plain asv "
        "commands (asv compare, asv show, asv preview) work on them as usual.",
    )
    p.add_argument(
        "--commits",
        metavar="RANGE",
        help="asv commit range to benchmark (e.g. 'main~3..main', 'HEAD^!', 'NEW', 'HASHFILE:f'); "
        "commits that already have results are skipped. Default: the last --last commits of main "
        "that have no results yet",
    )
    p.add_argument("--last", type=int, default=5, metavar="N", help="how many recent commits the default covers (5)")
    p.add_argument("--out", metavar="DIR", help="where the HTML goes (default: the config's html_dir, .asv/html)")
    p.add_argument("--serve", action="store_true", help="serve the dashboard on 127.0.0.1 and print its URL")
    p.add_argument("--port", type=int, default=8080, help="port for --serve (8080; a busy port falls back to any)")
    p.add_argument("--quick", action="store_true", help="asv run --quick: one sample per benchmark (smoke test)")
    p.add_argument("-b", "--bench", metavar="REGEX", action="append", help="only benchmarks matching (repeatable)")
    p.add_argument(
        "--python",
        metavar="same",
        help="'same': time the selfattn installed in this Python instead of building one per commit; "
        "records HEAD (needs a clean checkout whose code is what is installed; the dashboard shows "
        "commits of main only)",
    )
    p.add_argument("--machine", help="asv machine name (default: this host's name)")
    p.add_argument("--no-run", action="store_true", help="publish the results that exist; run nothing")
    p.add_argument("--config", help="asv.conf.json to use (default: found from here upwards)")
    return p


def _run_benchmarks(args, config: str, conf) -> int:
    from asv.machine import Machine

    machine = args.machine or Machine.get_unique_machine_name()
    if not _machine_known(args.machine):
        rc = _asv(config, "machine", "--yes", *(["--machine", args.machine] if args.machine else []))
        if rc:
            return rc
    common = ["--show-stderr"]
    if args.quick:
        common.append("--quick")
    if args.machine:
        common += ["--machine", args.machine]
    for regex in args.bench or ():
        common += ["-b", regex]
    if args.python is not None:
        if args.python != "same":
            raise DashboardError(f"--python accepts only 'same', got {args.python!r}")
        if args.commits:
            raise DashboardError("--python same times the installed selfattn as HEAD; it takes no --commits")
        if _git(conf.repo, "status", "--porcelain", "--untracked-files=no"):
            raise DashboardError(
                "--python same records the installed code as HEAD, but the checkout has "
                "uncommitted changes: commit or stash them first"
            )
        head = _git(conf.repo, "rev-parse", "HEAD")
        # always runs: asv's --skip-existing-commits would look at the branch head, not at the hash recorded
        return _asv(config, "run", "--python=same", "--set-commit-hash", head, *common)
    common.insert(0, "--skip-existing-commits")
    if args.commits:
        return _asv(config, "run", *common, args.commits)
    commits, missing = default_commits(conf, machine, args.last)
    if not missing:
        print(
            f"the last {len(commits)} commits of {conf.branches[0]} all have results on {machine}; "
            "nothing to run (use --commits RANGE for others)"
        )
        return 0
    print(
        f"benchmarking {len(missing)} of the last {len(commits)} commits of {conf.branches[0]} "
        f"(no results yet on {machine}): {' '.join(c[:8] for c in missing)}"
    )
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as fh:
        fh.write("\n".join(missing) + "\n")
    try:
        return _asv(config, "run", *common, f"HASHFILE:{fh.name}")
    finally:
        os.unlink(fh.name)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import asv  # noqa: F401
    except ImportError:
        print("error: the dashboard wraps asv; install it with: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    if args.last < 1:
        print(f"error: --last must be at least 1, got {args.last}", file=sys.stderr)
        return 2
    try:
        config = find_config(args.config)
        conf = _load_config(config)
        vendor = os.path.join(os.path.dirname(config), VENDOR_DIR)
        if not os.path.isfile(os.path.join(vendor, "manifest.json")):
            # a config outside the checkout (a throw-away history): the assets come from this selfattn's checkout
            vendor = os.path.join(os.path.dirname(find_config(None)), VENDOR_DIR)
        status = 0 if args.no_run else _run_benchmarks(args, config, conf)
        if status:
            print(
                f"warning: asv run exited with status {status} (failed benchmarks are listed above); "
                "publishing what there is",
                file=sys.stderr,
            )
        out = os.path.abspath(args.out or conf.html_dir)
        rc = _asv(config, "publish", "--html-dir", out)
        if rc:
            print(f"error: asv publish exited with status {rc}", file=sys.stderr)
            return 1
        replaced = make_offline(out, vendor)
    except DashboardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"dashboard: {os.path.join(out, 'index.html')} (self-contained: {len(replaced)} CDN scripts/stylesheets "
        f"replaced by vendored copies; browsers need it served, not opened as a file: use --serve)"
    )
    if args.serve:
        serve(out, args.port)
    return 1 if status else 0


if __name__ == "__main__":
    sys.exit(main())
