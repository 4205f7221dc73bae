"""README's screenshot of `eclipse-prior app` (`make screenshot`): start the app on the shipped shapes world, type a
held-out composition, draw two images per column in headless Chromium and save the page.

Usage: `python scripts/app_screenshot.py [OUT.png] [--prompt TEXT] [--images N]` (needs the app extra, playwright
and a system Chromium: `apt-get install chromium`).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from eclipse_prior.app.browser import drive, start_app


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="docs/app.png")
    parser.add_argument("--prompt", default="a purple star and a yellow circle")
    parser.add_argument("--images", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        app = start_app(Path(work), threads=None)
        try:
            run = drive(app.url, args.prompt, args.images, screenshot=Path(args.out), viewport=(1280, 800))
        finally:
            app.stop()
    print(f"app answered after {app.start_seconds:.1f}s; drew in {run.seconds:.1f}s: {run.status}")
    if run.console_errors or run.external_requests:
        print(f"console errors: {run.console_errors}; external requests: {run.external_requests}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
