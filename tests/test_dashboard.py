"""``python -m selfattn dashboard``: offline rewriting, commit selection, and the built page in a real browser.

The browser test builds the dashboard from recorded asv results of a
throw-away two-commit history (``tests/dashboard_history.py``), serves it on
127.0.0.1 and opens it in headless Chromium through Selenium (Debian's
``chromium`` and ``chromium-driver``; ``.ci/run`` installs them). It asserts
from the rendered page that the benchmark list and a graph with points for
every backend render with no JavaScript error, and keeps a screenshot in
``$SELFATTN_ARTIFACTS`` (``.ci/run``: ``.ci/artifacts``).
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading

import dashboard_history as history
import pytest

from selfattn._bench import dashboard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENDOR = os.path.join(ROOT, "benchmarks", "dashboard", "vendor")

# The flags this kind of machine needs: no sandbox as root, no GPU, and no background traffic (refused here);
# the resolver rule makes the page offline for certain: any host but 127.0.0.1 fails to resolve, so a page that
# still loaded something from the network would log an error.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1400,900",
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
)

_ASV_INDEX = """<html><head>
<script src="https://code.jquery.com/jquery-3.3.1.min.js" integrity="sha256-x" crossorigin="anonymous"
  onerror="js_load_failure()"></script>
<script src='https://cdnjs.cloudflare.com/ajax/libs/flot/0.8.3/jquery.flot.min.js'
  referrerpolicy="no-referrer"></script>
<link rel="stylesheet" href="https://cdn.jsdelivr.net/npm/bootstrap@3.1.1/dist/css/bootstrap.min.css"
  integrity="sha256-y" crossorigin="anonymous">
<script src="asv.js"></script><link href="asv.css" rel="stylesheet" type="text/css"/>
<link rel="alternate" type="application/atom+xml" href="regressions.xml"/>
</head><body><a href="https://github.com/airspeed-velocity/asv/">airspeed velocity</a></body></html>
"""


# --- offline rewriting (no asv, no browser) ------------------------------------------------------------------


def test_remote_assets_finds_scripts_and_stylesheets_only():
    urls = dashboard.remote_assets(_ASV_INDEX)
    assert urls == [
        "https://code.jquery.com/jquery-3.3.1.min.js",
        "https://cdnjs.cloudflare.com/ajax/libs/flot/0.8.3/jquery.flot.min.js",
        "https://cdn.jsdelivr.net/npm/bootstrap@3.1.1/dist/css/bootstrap.min.css",
    ]
    assert dashboard.remote_assets('<script src="//cdn.example/x.js"></script>') == ["//cdn.example/x.js"]


def test_make_offline_rewrites_and_copies(tmp_path):
    (tmp_path / "index.html").write_text(_ASV_INDEX)
    replaced = dashboard.make_offline(str(tmp_path), VENDOR)
    html = (tmp_path / "index.html").read_text()
    assert dashboard.remote_assets(html) == []
    assert not re.search(r"<(script|link)\b[^>]*(src|href)=[\"']?https?://", html)
    assert "integrity" not in html and "crossorigin" not in html and "referrerpolicy" not in html
    assert 'onerror="js_load_failure()"' in html and 'src="asv.js"' in html  # asv's own parts untouched
    assert "https://github.com/airspeed-velocity/asv/" in html  # a plain link is not an asset
    for url, local in replaced.items():
        assert f'"{local}"' in html or f"'{local}'" in html, url
        assert (tmp_path / local).is_file()
    assert replaced["https://code.jquery.com/jquery-3.3.1.min.js"] == "vendor/jquery-3.3.1/jquery.min.js"
    # the stylesheet's fonts and every license travel with the page
    assert (tmp_path / "vendor/bootstrap-3.1.1/fonts/glyphicons-halflings-regular.woff").is_file()
    assert len(list((tmp_path / "vendor" / "LICENSES").iterdir())) == 6


def test_make_offline_refuses_an_unvendored_asset(tmp_path):
    (tmp_path / "index.html").write_text(_ASV_INDEX.replace("jquery-3.3.1.min.js", "jquery-9.9.9.min.js"))
    with pytest.raises(dashboard.DashboardError, match="jquery-9.9.9.*vendor_dashboard_assets.py --update"):
        dashboard.make_offline(str(tmp_path), VENDOR)


def test_make_offline_refuses_a_changed_vendored_file(tmp_path):
    vendor = tmp_path / "vendor-copy"
    shutil.copytree(VENDOR, vendor)
    (vendor / "jquery-3.3.1" / "jquery.min.js").write_text("tampered")
    html_dir = tmp_path / "html"
    html_dir.mkdir()
    (html_dir / "index.html").write_text(_ASV_INDEX)
    with pytest.raises(dashboard.DashboardError, match="differs from lock.json"):
        dashboard.make_offline(str(html_dir), str(vendor))


def test_vendored_assets_match_the_lock():
    res = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "vendor_dashboard_assets.py")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    with open(os.path.join(VENDOR, "manifest.json")) as fh:
        manifest = json.load(fh)
    names = {p["name"] for p in manifest["packages"]}
    assert {"jquery", "flot", "flot-orderbars", "stupid-table-plugin", "blueimp-md5", "bootstrap"} == names


def test_vendor_manifest_covers_the_installed_asv():
    """Every CDN script/stylesheet of the installed asv's index.html is vendored (a new asv fails here first)."""
    asv = pytest.importorskip("asv", reason="asv is not installed (pip install -e '.[bench]')")
    with open(os.path.join(os.path.dirname(asv.__file__), "www", "index.html")) as fh:
        urls = set(dashboard.remote_assets(fh.read()))
    with open(os.path.join(VENDOR, "manifest.json")) as fh:
        covered = {u for p in json.load(fh)["packages"] for u in p["replaces"]}
    assert urls and urls <= covered, sorted(urls - covered)


# --- commit selection ----------------------------------------------------------------------------------------


def test_default_commits_are_those_without_results(tmp_path):
    pytest.importorskip("asv", reason="asv is not installed (pip install -e '.[bench]')")
    repo = tmp_path / "repo"
    hashes = history.make_history(str(repo))
    config = history.write_config(str(repo), str(tmp_path / "results"), str(tmp_path / "html"))
    conf = dashboard._load_config(config)
    commits, missing = dashboard.default_commits(conf, "box", last=5)
    assert commits == hashes[::-1] and missing == hashes[::-1]  # newest first, nothing recorded yet
    (tmp_path / "results" / "box").mkdir(parents=True)
    (tmp_path / "results" / "box" / f"{hashes[1][:8]}-existing-py.json").write_text("{}")
    (tmp_path / "results" / "box" / "machine.json").write_text("{}")
    assert dashboard.default_commits(conf, "box", last=5) == (hashes[::-1], [hashes[0]])
    assert dashboard.default_commits(conf, "box", last=1) == ([hashes[1]], [])
    assert dashboard.default_commits(conf, "other-box", last=1) == ([hashes[1]], [hashes[1]])


def test_history_is_deterministic(tmp_path):
    assert history.make_history(str(tmp_path / "a")) == history.make_history(str(tmp_path / "b"))
    assert history.make_history(str(tmp_path / "c")) == history.expected_hashes()


def test_dashboard_usage_errors(tmp_path, capsys):
    pytest.importorskip("asv", reason="asv is not installed (pip install -e '.[bench]')")
    assert dashboard.main(["--config", str(tmp_path / "nope.json"), "--no-run"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert dashboard.main(["--last", "0"]) == 2
    assert "--last" in capsys.readouterr().err


def test_recorded_results_are_readable(tmp_path):
    """The fixture is asv's own format: asv reads it, with units and rounded tracked values."""
    pytest.importorskip("asv", reason="asv is not installed (pip install -e '.[bench]')")
    from asv.results import iter_results_for_machine

    results_dir = os.path.join(history.FIXTURE, "results")
    found = list(iter_results_for_machine(results_dir, history.MACHINE))
    assert sorted(r.commit_hash for r in found) == sorted(history.expected_hashes())
    with open(os.path.join(results_dir, "benchmarks.json")) as fh:
        benchmarks = json.load(fh)
    gflops = benchmarks["bench_attention.AttentionForward.track_gflops"]
    assert gflops["unit"] == "GFLOP/s" and gflops["param_names"][0] == "backend"
    assert benchmarks["bench_overhead.Dispatch.time_dispatch_tiny"]["unit"] == "seconds"
    for res in found:
        values = [
            v
            for v in res.get_result_value("bench_attention.AttentionForward.track_gflops", gflops["params"])
            if v is not None
        ]
        assert values and all(len(repr(v)) <= 8 for v in values), values  # 3 significant digits, not 17


# --- the page in a real browser --------------------------------------------------------------------------------


def _chromium() -> tuple[str, str]:
    """Paths of chromium and chromedriver, or skip saying what is missing and how .ci/run installs it."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip(
            "headless Chromium is not installed (.ci/run installs Debian's chromium and chromium-driver "
            "with apt-get; it could not here)"
        )
    return browser, driver


def _fixture_config(tmp_path) -> str:
    """The throw-away history with the recorded results beside it; returns its asv.conf.json."""
    pytest.importorskip("asv", reason="asv is not installed (pip install -e '.[bench]')")
    repo = tmp_path / "history"
    assert history.make_history(str(repo)) == history.expected_hashes()
    results = tmp_path / "results"
    shutil.copytree(os.path.join(history.FIXTURE, "results"), results)
    return history.write_config(str(repo), str(results), str(tmp_path / "unused-html"))


@pytest.fixture
def built_dashboard(tmp_path):
    """Build the dashboard with the real command from the recorded two-commit results; return its folder."""
    config = _fixture_config(tmp_path)
    html = tmp_path / "html"
    res = subprocess.run(
        [sys.executable, "-m", "selfattn", "dashboard", "--config", config, "--no-run", "--out", str(html)],
        capture_output=True,
        text=True,
        cwd=str(tmp_path),
        check=False,
        env=dict(os.environ, HOME=str(tmp_path)),
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "self-contained" in res.stdout
    return html


def test_built_index_loads_nothing_remote(built_dashboard):
    html = (built_dashboard / "index.html").read_text()
    # the check the issue asks for, as grep would do it
    assert not re.search(r"<(script|link)\b[^>]*\b(src|href)\s*=\s*[\"']?https?://", html, re.IGNORECASE)
    assert 'src="vendor/jquery-3.3.1/jquery.min.js"' in html
    assert (built_dashboard / "graphs").is_dir() and (built_dashboard / "index.json").is_file()


def test_serve_prints_the_url_and_serves(tmp_path):
    """``--serve`` prints a 127.0.0.1 URL and serves the self-contained page and its vendored assets there."""
    import urllib.request

    config = _fixture_config(tmp_path)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "selfattn",
            "dashboard",
            "--config",
            config,
            "--no-run",
            "--out",
            str(tmp_path / "html"),
            "--serve",
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=str(tmp_path),
        env=dict(os.environ, HOME=str(tmp_path), PYTHONUNBUFFERED="1"),
    )
    try:
        url, seen = None, []
        for line in proc.stdout:  # the URL comes after asv publish's output
            seen.append(line)
            m = re.search(r"serving .* at (http://127\.0\.0\.1:\d+/)", line)
            if m:
                url = m.group(1)
                break
        assert url, "".join(seen)
        with urllib.request.urlopen(url + "index.html", timeout=30) as resp:
            page = resp.read().decode()
        assert dashboard.remote_assets(page) == [] and "vendor/jquery-3.3.1/jquery.min.js" in page
        with urllib.request.urlopen(url + "vendor/jquery-3.3.1/jquery.min.js", timeout=30) as resp:
            assert resp.status == 200 and b"jQuery" in resp.read(200)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proc.stdout.close()


@pytest.fixture
def served(built_dashboard):
    handler = functools.partial(dashboard._QuietHandler, directory=str(built_dashboard))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/", built_dashboard
    httpd.shutdown()
    httpd.server_close()


def test_dashboard_renders_in_headless_chromium(served, tmp_path):
    browser, driver_path = _chromium()
    webdriver = pytest.importorskip(
        "selenium.webdriver", reason="selenium is not installed (pip install -e '.[browser]')"
    )
    from selenium.webdriver.support.ui import WebDriverWait

    url, html_dir = served
    with open(html_dir / "index.json") as fh:
        index = json.load(fh)
    # asv stores parameter values as their repr ("'numpy'") and labels series "backend-numpy"
    backends = [p.strip("'") for p in index["benchmarks"]["bench_overhead.Dispatch.time_dispatch_tiny"]["params"][0]]
    assert {"numpy", "numba"} <= set(backends)

    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for flag in CHROMIUM_FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    artifacts = os.environ.get("SELFATTN_ARTIFACTS") or str(tmp_path)
    os.makedirs(artifacts, exist_ok=True)
    drv = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=driver_path))
    try:
        drv.set_page_load_timeout(60)
        wait = WebDriverWait(drv, 60)
        # 1. the benchmark list: one row per benchmark (parameterized ones expand per parameter value)
        drv.get(url + "index.html#/summarylist")
        wait.until(lambda d: d.execute_script("return $('#summarylist-body table tbody tr').length") > 0)
        names = drv.execute_script(
            "return $('#summarylist-body table tbody tr td:first-child').map(function(){return $(this).text()}).get()"
        )
        text = " ".join(names)
        for bench in ("time_dispatch_tiny", "track_gflops", "timeraw_import_selfattn"):
            assert bench in text, (bench, names[:10])
        drv.save_screenshot(os.path.join(artifacts, "dashboard-list.png"))
        # 2. a graph: Dispatch.time_dispatch_tiny, one series per backend, a point for each of the two commits
        drv.get(url + "index.html#bench_overhead.Dispatch.time_dispatch_tiny")
        series = (
            "var p = $('#main-graph').data('plot'); if (!p) return null;"
            "return p.getData().map(function(s){"
            "  return [s.label, s.data.filter(function(pt){return pt[1] !== null}).length]});"
        )
        wait.until(lambda d: (d.execute_script(series) or []) and len(d.execute_script(series)) >= len(backends))
        got = dict(drv.execute_script(series))
        for backend in backends:
            label = f"backend-{backend}"
            assert got.get(label) == 2, (backend, got)  # a series with a point for each of the two commits
        assert drv.execute_script("return $('#main-graph canvas.flot-base').length") == 1
        legend = drv.execute_script("return $('#main-graph .legendLabel').map(function(){return $(this).text()}).get()")
        assert sorted(legend) == sorted(f"backend-{b}" for b in backends), legend
        drv.save_screenshot(os.path.join(artifacts, "dashboard.png"))
        # 3. no JavaScript error on either page (console errors, uncaught exceptions, failed loads)
        errors = [e for e in drv.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == [], errors
    finally:
        drv.quit()
    assert os.path.getsize(os.path.join(artifacts, "dashboard.png")) > 10_000
