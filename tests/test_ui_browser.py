"""A real browser (Debian's Chromium, driven by Playwright) goes through the app like a newcomer:
pick an example domain, Train, see TI, CC and the heatmap, chat, roll back."""

import re

import pytest
from conftest_ui import make_core
from playwright.sync_api import sync_playwright

from lorsu_demo.ui import tour
from lorsu_demo.ui.app import build_app, launch


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    core = make_core(tmp_path_factory.mktemp("ui-browser"))
    demo = build_app(core)
    launch(demo, host="127.0.0.1", prevent_thread_lock=True, quiet=True)
    try:
        yield demo.local_url
    finally:
        demo.close()


@pytest.fixture(scope="module")
def page(url):
    with sync_playwright() as playwright:
        browser = tour.open_browser(playwright)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors = []
        page.on("pageerror", lambda err: errors.append(str(err)))
        page.goto(url)
        page.errors = errors
        yield page
        browser.close()


def test_teach_train_watch_chat_roll_back(page):
    assert "Ready: pick example data" in tour.status(page)
    # Train without data first: a message, not a traceback
    page.click("#lorsu-train")
    assert "Pick example data" in tour.wait_status(page, "Pick example data")

    seen = tour.teach_and_train(page, "Coloured squares: colours")
    assert re.search(r"TI\s*[+-]\d+\.\d", seen["ti"]), seen["ti"]
    assert re.search(r"CC\s*[+-]\d+\.\d", seen["cc"]), seen["cc"]
    assert seen["heatmap"] == 1 and seen["curves"] == 1 and seen["probes"] == 3
    assert page.locator("#lorsu-train").is_enabled()
    assert not page.locator("#lorsu-stop").is_enabled()

    answers = tour.chat(page)
    assert answers["status"] == "Answered by session 1."
    assert answers["answer"] and answers["base"]

    message = tour.roll_back(page)
    assert message == "Rolled back to the base model: session 1 removed exactly."
    page.get_by_role("tab", name="3 · Sessions").click()
    assert page.locator("#lorsu-table tbody tr").count() in (0, 1)  # an empty table row
    assert "1 · after" not in page.inner_text("#lorsu-table")
    assert not page.errors, page.errors
