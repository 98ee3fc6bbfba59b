"""Vendor (``--update``) or verify (default) the JavaScript/CSS that asv's dashboard loads from CDNs.

``python tools/vendor_dashboard_assets.py [--update]``

``benchmarks/dashboard/vendor/manifest.json`` names, for each asset asv 0.6's
``index.html`` loads from a CDN, the npm registry package of the same name and
version and the files to take from it. ``--update`` fetches each package with
``npm pack NAME@VERSION`` (npm checks the tarball against the registry's
integrity hash), copies the named files and the package's license into
``benchmarks/dashboard/vendor/NAME-VERSION/`` and ``LICENSES/``, and writes
``lock.json`` (tarball, its sha512 integrity and sha256, every file's sha256)
and ``README.md``. Without ``--update`` it checks, offline, that every vendored
file is present and matches ``lock.json``; exit status 1 if not.

``python -m selfattn dashboard`` copies these files next to asv's output and
rewrites ``index.html`` to use them (:mod:`selfattn._bench.dashboard`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENDOR = os.path.join(ROOT, "benchmarks", "dashboard", "vendor")


def _sha256(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def _pack(spec: str, workdir: str) -> dict:
    """``npm pack --json SPEC`` in ``workdir``: the tarball's metadata (filename, integrity, shasum)."""
    res = subprocess.run(["npm", "pack", "--json", spec], cwd=workdir, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"npm pack {spec} failed:\n{res.stderr.strip()}")
    (info,) = json.loads(res.stdout)
    return info


def update(manifest: dict) -> dict:
    """Fetch every package of ``manifest`` and (re)write the vendored files; return the lock data."""
    if shutil.which("npm") is None:
        raise SystemExit("--update needs npm (Debian: apt-get install npm)")
    lock = {"packages": []}
    os.makedirs(os.path.join(VENDOR, "LICENSES"), exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for pkg in manifest["packages"]:
            spec = f"{pkg['name']}@{pkg['version']}"
            info = _pack(spec, tmp)
            tgz = os.path.join(tmp, info["filename"])
            dest_dir = os.path.join(VENDOR, f"{pkg['name']}-{pkg['version']}")
            shutil.rmtree(dest_dir, ignore_errors=True)
            files = {}
            with tarfile.open(tgz, "r:gz") as tar:
                wanted = dict(pkg["files"])
                if pkg.get("license_file"):
                    wanted[pkg["license_file"]] = None
                for src, dest in wanted.items():
                    member = tar.getmember(f"package/{src}")  # KeyError names a file the package lacks
                    data = tar.extractfile(member).read()
                    if dest is None:  # the license
                        out = os.path.join(VENDOR, "LICENSES", f"{pkg['name']}-{pkg['version']}.txt")
                    else:
                        out = os.path.join(dest_dir, *dest.split("/"))
                    os.makedirs(os.path.dirname(out), exist_ok=True)
                    with open(out, "wb") as fh:
                        fh.write(data)
                    files[os.path.relpath(out, VENDOR).replace(os.sep, "/")] = hashlib.sha256(data).hexdigest()
            if not pkg.get("license_file"):
                out = os.path.join(VENDOR, "LICENSES", f"{pkg['name']}-{pkg['version']}.txt")
                with open(out, "w") as fh:
                    fh.write(f"{spec}: license {pkg['license']}.\n{pkg.get('note', '')}\n")
                files[os.path.relpath(out, VENDOR).replace(os.sep, "/")] = _sha256(out)
            lock["packages"].append(
                {
                    "name": pkg["name"],
                    "version": pkg["version"],
                    "license": pkg["license"],
                    "tarball": f"{pkg['name']}/-/{info['filename']}",
                    "integrity": info["integrity"],
                    "tarball_sha256": _sha256(tgz),
                    "files": files,
                }
            )
    with open(os.path.join(VENDOR, "lock.json"), "w") as fh:
        json.dump(lock, fh, indent=2)
        fh.write("\n")
    with open(os.path.join(VENDOR, "README.md"), "w") as fh:
        fh.write(readme(manifest, lock))
    return lock


def readme(manifest: dict, lock: dict) -> str:
    """The vendor folder's README: one row per package, with where it came from and how to check it."""
    notes = {p["name"]: p.get("note") for p in manifest["packages"]}
    lines = [
        "# Vendored dashboard assets",
        "",
        "asv 0.6's `index.html` loads these libraries from public CDNs, so on a machine without internet the",
        "dashboard shows no graph. `python -m selfattn dashboard` copies the files below next to asv's output and",
        "rewrites `index.html` to load them instead. They come unmodified from the npm registry packages of the",
        "same names and versions (`npm pack NAME@VERSION`); `tarball` is the package's path in the registry and",
        "`integrity` npm's sha512 of it. Regenerate with `python tools/vendor_dashboard_assets.py --update`;",
        "check the files against `lock.json` with `python tools/vendor_dashboard_assets.py`.",
        "",
        "| package | version | license | tarball | integrity (sha512) | tarball sha256 | files |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in lock["packages"]:
        files = "<br>".join(f"`{f}`" for f in p["files"])
        lines.append(
            f"| {p['name']} | {p['version']} | {p['license']} (`LICENSES/{p['name']}-{p['version']}.txt`)"
            f" | `{p['tarball']}` | `{p['integrity']}` | `{p['tarball_sha256']}` | {files} |"
        )
    lines += ["", "Notes:", ""]
    lines += [f"- {name}: {note}" for name, note in notes.items() if note]
    return "\n".join(lines) + "\n"


def check(manifest: dict) -> list[str]:
    """Problems with the vendored files (missing, changed, or not covering the manifest); empty when all is well."""
    try:
        with open(os.path.join(VENDOR, "lock.json")) as fh:
            lock = json.load(fh)
    except FileNotFoundError:
        return ["lock.json is missing: run with --update"]
    problems = []
    locked = {(p["name"], p["version"]): p for p in lock["packages"]}
    for pkg in manifest["packages"]:
        entry = locked.get((pkg["name"], pkg["version"]))
        if entry is None:
            problems.append(f"{pkg['name']}@{pkg['version']} is in manifest.json but not in lock.json")
            continue
        for dest in pkg["files"].values():
            rel = f"{pkg['name']}-{pkg['version']}/{dest}"
            if rel not in entry["files"]:
                problems.append(f"{rel} is not in lock.json")
        for rel, digest in entry["files"].items():
            path = os.path.join(VENDOR, *rel.split("/"))
            if not os.path.exists(path):
                problems.append(f"{rel} is missing")
            elif _sha256(path) != digest:
                problems.append(f"{rel} differs from the npm package (sha256 mismatch)")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python tools/vendor_dashboard_assets.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--update", action="store_true", help="fetch the packages with npm and rewrite the vendor folder")
    args = ap.parse_args(argv)
    with open(os.path.join(VENDOR, "manifest.json")) as fh:
        manifest = json.load(fh)
    if args.update:
        lock = update(manifest)
        print(
            f"vendored {sum(len(p['files']) for p in lock['packages'])} files from "
            f"{len(lock['packages'])} npm packages into {os.path.relpath(VENDOR, ROOT)}"
        )
    problems = check(manifest)
    for p in problems:
        print(f"problem: {p}", file=sys.stderr)
    if not problems:
        print("vendored dashboard assets match lock.json")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
