"""Debian's chromium driven by Playwright for Python (the browser tests and `make screenshot`).

Playwright's own browser download cannot work here (no internet); `executable_path` points it
at the system's chromium (`apt-get install chromium`; `.ci/run` installs it when missing), or
at `PIPELINE_CHROMIUM`. The flags keep a headless run off the network: without the
background-networking ones chromium keeps trying to reach Google's hosts.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

CHROMIUM_ARGS = (
    "--headless=new",
    "--no-sandbox",  # root in CI
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--font-render-hinting=none",  # the same glyph metrics from run to run
)


def chromium_path() -> Path | None:
    configured = os.environ.get("PIPELINE_CHROMIUM")
    if configured:
        return Path(configured)
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return Path(found)
    return None


def launch(playwright: Any) -> Any:
    """A headless chromium `Browser`; raises FileNotFoundError naming the fix without one."""
    path = chromium_path()
    if path is None or not path.exists():
        raise FileNotFoundError(
            "no chromium found: `apt-get install chromium` (Debian), or set PIPELINE_CHROMIUM "
            "to the browser's executable"
        )
    return playwright.chromium.launch(executable_path=str(path), args=list(CHROMIUM_ARGS))
