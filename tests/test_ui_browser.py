"""A real browser (Debian's Chromium, driven by Playwright) goes through the app like a newcomer:
pick an example domain, Train, see TI, CC and the heatmap, chat, roll back."""

import re

import pytest
from conftest_ui import make_core
from playwright.sync_api import sync_playwright

from lorsu_demo.ui import tour
from lorsu_demo.ui.app import build_app, launch


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui-browser")
    core = make_core(root)
    demo = build_app(core)
    launch(demo, host="127.0.0.1", prevent_thread_lock=True, quiet=True)
    try:
        yield demo.local_url, root
    finally:
        demo.close()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        browser = tour.open_browser(playwright)
        yield browser
        browser.close()


@pytest.fixture
def page(served, browser):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(served[0])
    page.errors = errors
    yield page
    page.close()


def test_teach_train_watch_chat_roll_back(page):
    assert "Ready: pick example data" in tour.status(page)
    # Train without data first: a message, not a traceback
    page.click("#lorsu-train")
    tour.wait_status(page, "upload your own images first", 20000)

    seen = tour.teach_and_train(page, "Coloured squares: colours")
    assert re.search(r"TI\s*[+-]\d+\.\d", seen["ti"]), seen["ti"]
    assert re.search(r"CC\s*[+-]\d+\.\d", seen["cc"]), seen["cc"]
    assert seen["heatmap"] == 1 and seen["curves"] == 1 and seen["probes"] == 3
    assert page.locator("#lorsu-train").is_enabled()
    assert not page.locator("#lorsu-stop").is_enabled()

    answers = tour.chat(page)
    assert answers["status"] == "Answered by session 1."
    assert answers["answer"] and answers["base"]
    # Confidence bars: the data's three classes and three option letters, two bars each.
    rows = page.locator("#lorsu-confidence .lorsu-conf-row")
    assert rows.count() == 6
    assert page.locator("#lorsu-confidence .lorsu-conf-bar[data-who=base]").count() == 6
    assert {rows.nth(i).get_attribute("data-class") for i in range(3)} == {"red", "green", "blue"}

    message = tour.roll_back(page)
    assert message == "Rolled back to the base model: session 1 removed exactly."
    page.get_by_role("tab", name="3 · Sessions").click()
    assert page.locator("#lorsu-table tbody tr").count() in (0, 1)  # an empty table row
    assert "1 · after" not in page.inner_text("#lorsu-table")
    assert not page.errors, page.errors


def test_class_cards_and_the_history_file(page, served):
    _, root = served
    train = root / "domains" / "colours" / "train"
    page.get_by_role("tab", name="Class cards").click()
    page.get_by_label("Class 1").fill("red")
    page.get_by_label("Class 2").fill("blue")
    inputs = page.locator("input[type=file]")
    inputs.nth(0).set_input_files(sorted(str(p) for p in (train / "red").glob("*.png"))[:3])
    page.wait_for_timeout(800)
    page.get_by_role("button", name="Use these images").first.click()
    assert "Class card 2 ('blue') has no images" in tour.wait_status(page, "has no images", 20000)
    inputs.nth(1).set_input_files(sorted(str(p) for p in (train / "blue").glob("*.png"))[:3])
    page.wait_for_timeout(800)
    page.get_by_role("button", name="Use these images").first.click()
    assert "Your images (4 to train, 2 to test)" in tour.wait_status(page, "Data ready")
    page.click("#lorsu-train")
    tour.wait_status(page, "Done: session 1 saved")

    page.get_by_role("tab", name="3 · Sessions").click()
    with page.expect_download() as download:
        page.click("#lorsu-download")
    assert download.value.suggested_filename.endswith("-1-sessions.lorsu")
    upload = page.get_by_test_id("Upload a history file-upload-button")
    upload.set_input_files(str(train / "red" / "000.png"))
    assert "not a lorsu-demo history file" in tour.wait_status(page, "history file", 20000)
    upload.set_input_files(download.value.path())
    assert "Loaded 1 session from" in tour.wait_status(page, "Loaded 1 session")
    assert not page.errors, page.errors
