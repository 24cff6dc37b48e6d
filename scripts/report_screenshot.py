"""Open a report in headless Chromium, check it, and save a full-page screenshot.

    python scripts/report_screenshot.py RUN_DIR_OR_HTML [--out report.png]

Uses Debian's `chromium` (apt-get install chromium) through Playwright's Python API; it never
downloads a browser. Every http(s) request the page makes is aborted and recorded. Prints one JSON
object: the screenshot's path, the page's title and section ids, the images and how many failed
to load (naturalWidth 0), console errors and page errors, and the requests that tried to leave the
page. Exit 0 when the page passes (no broken image, no console error, no network request), 1 when
it does not, 2 when there is no chromium or no such file.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path


def check_page(html_path: Path, screenshot: Path, width: int = 1100) -> dict:
    """Load html_path from disk with the network blocked; what it found, and the screenshot written."""
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    if chromium is None:
        raise FileNotFoundError("no `chromium` on PATH (Debian: apt-get install chromium)")
    found = {"network_requests": [], "console_errors": [], "page_errors": []}

    def block_remote(route):  # the page's own file and data: URIs load; nothing else does
        if route.request.url.split(":", 1)[0].lower() in ("http", "https", "ws", "wss", "ftp"):
            route.abort()
        else:
            route.continue_()

    def record(request):  # every request the page or a frame in it makes, aborted or not
        if not request.url.startswith(("file:", "data:")):
            found["network_requests"].append(request.url)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])  # root in CI: no sandbox
        try:
            context = browser.new_context(viewport={"width": width, "height": 900})
            context.route("**/*", block_remote)
            page = context.new_page()
            page.on("console", lambda m: m.type == "error" and found["console_errors"].append(m.text))
            page.on("pageerror", lambda e: found["page_errors"].append(str(e)))
            page.on("request", record)
            page.goto(html_path.resolve().as_uri(), wait_until="load")
            images = page.eval_on_selector_all(
                "img", "els => els.map(e => ({src: e.src.slice(0, 40), complete: e.complete, width: e.naturalWidth}))")
            found |= {"title": page.title(), "sections": page.eval_on_selector_all("section", "els => els.map(e => e.id)"),
                      "images": len(images), "broken_images": [i for i in images if not (i["complete"] and i["width"] > 0)],
                      "height": page.evaluate("document.documentElement.scrollHeight")}
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    found["screenshot"] = str(screenshot)
    return found


def passed(found: dict) -> bool:
    return not (found["broken_images"] or found["console_errors"] or found["page_errors"] or found["network_requests"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="report_screenshot.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("report", type=Path, help="a run folder (its report.html) or an HTML file")
    ap.add_argument("--out", type=Path, help="the screenshot (default: report.png beside the HTML file)")
    a = ap.parse_args(argv)
    html = a.report / "report.html" if a.report.is_dir() else a.report
    if not html.is_file():
        ap.exit(2, f"report_screenshot.py: error: {html}: no such file\n")
    try:
        found = check_page(html, a.out or html.with_suffix(".png"))
    except FileNotFoundError as e:
        ap.exit(2, f"report_screenshot.py: error: {e}\n")
    print(json.dumps(found, indent=1))
    return 0 if passed(found) else 1


if __name__ == "__main__":
    sys.exit(main())
