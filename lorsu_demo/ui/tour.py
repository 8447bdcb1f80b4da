"""A real browser walks the app: pick example data, Train, read TI/CC and the heatmap, chat,
roll back. The browser test runs it; `python -m lorsu_demo.ui.tour --out docs/screenshot.png`
saves the screenshot of the main screen for the README.

It drives Debian's Chromium through Playwright (`pip install playwright`; never `playwright
install`, which downloads a browser).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

CHROMIUM = os.environ.get("LORSU_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
TIMEOUT_MS = 120_000


def open_browser(playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def status(page) -> str:
    """The status line's text (without the queue/timer overlay Gradio may put over it)."""
    return page.inner_text("#lorsu-status .lorsu-status").strip()


def wait_status(page, text: str, timeout: int = TIMEOUT_MS) -> str:
    """Wait until the status line holds `text`, case and all (`:has-text` ignores case, and
    "Step " would match "Data ready: ... (step 2)" before a session has started)."""
    line = page.locator("#lorsu-status .lorsu-status")
    line.filter(has_text=re.compile(re.escape(text))).wait_for(timeout=timeout)
    return status(page)


def teach_and_train(page, example_title: str, session: int = 1) -> dict:
    """Pick an example domain, press Train, wait for the session; return what is on screen."""
    page.get_by_role("tab", name="1 · Teach & watch").click()
    page.get_by_label(example_title, exact=True).check()
    wait_status(page, "Data ready")
    page.click("#lorsu-train")
    done = wait_status(page, f"Done: session {session} saved")
    page.wait_for_selector("#lorsu-heatmap img", timeout=TIMEOUT_MS)
    return {
        "status": done,
        "ti": page.inner_text("#lorsu-ti"),
        "cc": page.inner_text("#lorsu-cc"),
        "heatmap": page.locator("#lorsu-heatmap img").count(),
        "curves": page.locator("#lorsu-curves img").count(),
        "probes": page.locator("#lorsu-probes tbody tr").count(),
        # right answers of the base model, the model before and after the session
        "probes_right": page.inner_text("#lorsu-probes tfoot").split("\t")[-3:],
    }


def chat(page) -> dict:
    """Open Chat, click the first example image, Ask; return both answers."""
    page.get_by_role("tab", name="2 · Chat").click()
    page.locator("#lorsu-chat-examples tbody tr, #lorsu-chat-examples .gallery-item").first.click()
    page.wait_for_selector("#lorsu-chat-image img", timeout=TIMEOUT_MS)
    page.click("#lorsu-ask")
    answered = wait_status(page, "Answered by")
    return {
        "status": answered,
        "answer": page.input_value("#lorsu-answer textarea"),
        "base": page.input_value("#lorsu-base-answer textarea"),
    }


def roll_back(page) -> str:
    """Sessions tab: Roll back… to the preselected earlier version, confirm."""
    page.get_by_role("tab", name="3 · Sessions").click()
    page.click("#lorsu-rollback")
    page.wait_for_selector("#lorsu-confirm-yes", state="visible", timeout=TIMEOUT_MS)
    page.click("#lorsu-confirm-yes")
    return wait_status(page, "Rolled back to")


def screenshot(url: str, out: Path, example_title: str | None = None) -> Path:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = open_browser(playwright)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            title = example_title or page.locator("#lorsu-examples label").first.inner_text()
            teach_and_train(page, title.strip())
            page.get_by_role("tab", name="1 · Teach & watch").click()
            time.sleep(1.0)  # let the last plots settle
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out), full_page=True)
        finally:
            browser.close()
    return out


def walk(url: str, example_title: str | None = None) -> dict:
    """The README's walk-through, timed: teach -> watch -> chat -> roll back (seconds since the
    page opened, with what the screen said at each step)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = open_browser(playwright)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            start = time.perf_counter()
            page.goto(url)
            title = example_title or page.locator("#lorsu-examples label").first.inner_text()
            steps = {"opened": round(time.perf_counter() - start, 1)}
            trained = teach_and_train(page, title.strip())
            steps["trained"] = round(time.perf_counter() - start, 1)
            answers = chat(page)
            steps["chatted"] = round(time.perf_counter() - start, 1)
            rolled = roll_back(page)
            steps["rolled_back"] = round(time.perf_counter() - start, 1)
        finally:
            browser.close()
    return {
        "example": title.strip(),
        "seconds": steps,
        **trained,
        "chat": answers,
        "rollback": rolled,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="docs/screenshot.png")
    parser.add_argument("--model", default=None, help="default: $LORSU_MODEL or toy")
    parser.add_argument("--example", default=None, help="title of the example to train on")
    parser.add_argument("--domains", default=None, help="folder of example domains")
    parser.add_argument("--control", action="append", help="control set folder (repeatable)")
    parser.add_argument(
        "--walk", action="store_true", help="time the whole walk-through instead (prints JSON)"
    )
    args = parser.parse_args(argv)
    from .app import create, launch

    demo = create(args.model, args.domains, args.control)
    launch(demo, host="127.0.0.1", prevent_thread_lock=True, quiet=True)
    try:
        if args.walk:
            print(json.dumps(walk(demo.local_url, args.example), indent=2))
            return 0
        path = screenshot(demo.local_url, Path(args.out), args.example)
    finally:
        demo.close()
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
