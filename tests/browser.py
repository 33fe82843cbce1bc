"""Headless Chromium for the page tests (catalog report, train preview): start it, read what a probe script
saw in the laid-out page, and collect the page's console errors."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

CHROMIUM = next(
    (
        shutil.which(b)
        for b in (os.environ.get("CHROMIUM", ""), "chromium", "chromium-browser", "google-chrome")
        if b and shutil.which(b)
    ),
    None,
)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium not installed (Debian: apt-get install chromium)"
)
# Headless, no network or background services (they hang on refused connections here), no sandbox
# (tests may run as root), and logging to stderr so the page's console messages can be checked.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--enable-logging=stderr",
    "--v=0",
]


def chromium(page: Path, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    """Open PAGE (a file) with a fresh profile folder and EXTRA flags (--dump-dom, --screenshot=...)."""
    return subprocess.run(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra, page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )


def page_errors(stderr: str) -> list[str]:
    """Console messages (script errors, CSP violations) and failed loads; not the browser's own noise."""
    return [ln for ln in stderr.splitlines() if ":CONSOLE" in ln or "net::ERR_" in ln]


def probe(html_text: str, script: str, work: Path) -> dict:
    """What SCRIPT (a `<script nonce="probe">` that appends `<pre id="probe">JSON</pre>` on load) measured in
    a copy of the page written under WORK: the page's CSP is widened for that one nonce only, so the page
    itself is checked as shipped."""
    copy = work / "probe.html"
    copy.write_text(
        html_text.replace("default-src 'none';", "default-src 'none'; script-src 'nonce-probe';").replace(
            "</body>", script + "</body>"
        ),
        encoding="utf-8",
    )
    run = chromium(copy, work / "profile-probe", "--window-size=1280,800", "--virtual-time-budget=10000", "--dump-dom")
    assert run.returncode == 0, run.stderr[-2000:]
    found = re.search(r'<pre id="probe">(.*?)</pre>', run.stdout)
    assert found, "the page did not finish loading:\n" + run.stdout[-2000:]
    return json.loads(found.group(1))
