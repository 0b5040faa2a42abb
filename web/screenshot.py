"""`python -m web.screenshot [PATH]` (`make screenshot`): a PNG of the overview for the README.

Serves the dashboard on a free port against whatever the env vars point to (after `make demo`:
the embedded stack), opens it in headless chromium at 1440 px, and saves the top of the page,
reduced to a 256-colour palette so the committed file stays small.
"""

from __future__ import annotations

import argparse
import io
import logging
from pathlib import Path

from loader import errors

DEFAULT = Path("docs/dashboard.png")


def capture(url: str, path: Path, width: int = 1440, height: int = 1500) -> int:
    from PIL import Image
    from playwright.sync_api import sync_playwright

    from web.browser import launch

    with sync_playwright() as p:
        browser = launch(p)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.goto(url)
            page.wait_for_selector("#chart-funnel .main-svg")
            page.wait_for_selector("#live-status[data-state=live]")
            png = page.screenshot(full_page=False)
        finally:
            browser.close()
    image = Image.open(io.BytesIO(png)).convert("RGB")
    small = image.quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    path.parent.mkdir(parents=True, exist_ok=True)
    small.save(path, optimize=True)
    return path.stat().st_size


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m web.screenshot", description=__doc__)
    parser.add_argument("path", nargs="?", type=Path, default=DEFAULT)
    parser.add_argument("--verbose", "-v", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    def run() -> None:
        from devstack.process import free_ports
        from web.server import BackgroundServer
        from web.settings import WebSettings

        settings = WebSettings(web_host="127.0.0.1", web_port=free_ports(1)[0], web_token="")
        server = BackgroundServer(settings).start()
        try:
            size = capture(server.url + "/", args.path)
        finally:
            server.stop()
        print(f"wrote {args.path} ({size / 1024:.0f} KiB)")

    errors.run_cli(run, verbose=args.verbose)


if __name__ == "__main__":
    main()
