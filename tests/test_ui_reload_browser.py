"""Chromium (Debian's, driven by Playwright): a browser's sessions survive a reload and
another browser does not see them; a reload mid-session is reported on return; a phone-sized
viewport and dark mode keep every tab visible."""

import pytest
from conftest_ui import chromium, make_core, serving

from lorsu_demo.ui import tour

TABS = ["1 · Teach & watch", "2 · Chat", "3 · Sessions", "4 · Compare", "How it works"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    # One lane, whatever the cores: a second session has to wait, and the wait is watched here.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("LORSU_CPU_LANES", "1")
        with serving(make_core(tmp_path_factory.mktemp("ui-reload"))) as url:
            yield url


@pytest.fixture(scope="module")
def browser():
    with chromium() as browser:
        yield browser


def open_page(browser, url, **context):
    """A page in a browser context of its own (its own localStorage: another browser)."""
    ctx = browser.new_context(viewport=context.pop("viewport", {"width": 1400, "height": 1000}),
                              **context)  # fmt: skip
    page = ctx.new_page()
    page.errors = []
    page.on("pageerror", lambda err: page.errors.append(str(err)))
    page.goto(url)
    return ctx, page


def sessions_text(page) -> str:
    page.get_by_role("tab", name="3 · Sessions").click()
    return page.inner_text("#lorsu-table")


def test_a_reload_keeps_the_sessions_and_another_browser_does_not_see_them(served, browser):
    ctx, page = open_page(browser, served)
    try:
        tour.teach_and_train(page, "Coloured squares: colours")
        before = tour.chat(page)
        assert before["status"] == "Answered by session 1."
        page.reload()
        assert "Welcome back: your 1 session" in tour.wait_status(page, "Welcome back")
        assert "lorsu" in sessions_text(page) and "colours" in sessions_text(page)
        assert page.input_value("#lorsu-rollback-to input") == "0 · base model (no sessions)"
        page.get_by_role("tab", name="2 · Chat").click()
        assert page.input_value("#lorsu-version input") == "1 · after lorsu on colours"
        page.get_by_role("tab", name="1 · Teach & watch").click()
        # the data picked before the reload is picked again
        assert "Training on: Coloured squares: colours" in page.inner_text("#lorsu-data")
        after = tour.chat(page)
        assert after == before  # the same version, the same (greedy) answers
        assert not page.errors, page.errors
    finally:
        ctx.close()

    ctx, other = open_page(browser, served)
    try:
        other.wait_for_timeout(1500)  # its load event has run
        assert "Ready: pick example data" in tour.status(other)
        assert "lorsu" not in sessions_text(other)
        other.get_by_role("tab", name="2 · Chat").click()
        assert other.input_value("#lorsu-version input") == "0 · base model (no sessions)"
    finally:
        ctx.close()


def test_a_reload_mid_session_is_reported_and_keeps_its_inputs(served, browser):
    ctx, page = open_page(browser, served)
    try:
        page.get_by_label("Coloured squares: mixes", exact=True).check()
        tour.wait_status(page, "Data ready")
        page.fill("#lorsu-seed input", "11")
        page.get_by_label("number input for Epochs").fill("30")
        page.get_by_label("number input for Epochs").press("Enter")
        page.click("#lorsu-train")
        tour.wait_status(page, "Step ")
        page.reload()
        said = tour.wait_status(page, "interrupted by a reload")
        assert said.startswith("Session 1 was interrupted by a reload; nothing was saved.")
        assert page.input_value("#lorsu-seed input") == "11"
        assert page.get_by_label("number input for Epochs").input_value() == "30"
        assert "Training on: Coloured squares: mixes" in page.inner_text("#lorsu-data")
        assert "lorsu" not in sessions_text(page)
        assert not page.errors, page.errors
    finally:
        ctx.close()


@pytest.mark.parametrize(
    "look",
    [
        {"viewport": {"width": 390, "height": 844}, "is_mobile": True, "has_touch": True},
        {"color_scheme": "dark"},
        {"viewport": {"width": 390, "height": 844}, "color_scheme": "dark"},
    ],
    ids=["phone", "dark", "dark-phone"],
)
def test_every_tab_is_visible_on_a_phone_and_in_dark_mode(served, browser, look):
    ctx, page = open_page(browser, served, **look)
    try:
        tour.wait_status(page, "Ready")
        width = page.viewport_size["width"]
        for name in TABS:
            tab = page.get_by_role("tab", name=name, exact=True)
            assert tab.is_visible(), f"tab {name!r} is hidden"
            box = tab.bounding_box()
            assert box and 0 <= box["x"] and box["x"] + box["width"] <= width + 1, (name, box)
        page.get_by_role("tab", name="3 · Sessions", exact=True).click()
        assert page.locator("#lorsu-table").is_visible()
        if look.get("color_scheme") == "dark":
            assert page.evaluate("document.body.classList.contains('dark')") or page.evaluate(
                "document.querySelector('.gradio-container').closest('.dark') !== null"
            )
            # the charts (white PNGs) are turned dark with the page
            page.get_by_role("tab", name="1 · Teach & watch", exact=True).click()
            page.wait_for_selector("#lorsu-curves img")
            chart = page.evaluate(
                "getComputedStyle(document.querySelector('#lorsu-curves img')).filter"
            )
            assert "invert" in chart, chart
        assert not page.errors, page.errors
    finally:
        ctx.close()


def test_stale_results_are_cleared_after_a_stop_a_roll_back_and_new_data(served, browser):
    ctx, page = open_page(browser, served)
    try:
        tour.teach_and_train(page, "Coloured squares: colours")
        assert "%" in page.inner_text("#lorsu-metrics")  # e.g. "33% → 33%" under TI
        tour.roll_back(page)
        page.get_by_role("tab", name="1 · Teach & watch").click()
        page.wait_for_selector("#lorsu-metrics:has-text('Rolled back')", timeout=20000)
        assert "%" not in page.inner_text("#lorsu-metrics")

        page.get_by_label("number input for Epochs").fill("30")
        page.get_by_label("number input for Epochs").press("Enter")
        page.click("#lorsu-train")
        tour.wait_status(page, "Step ")
        page.click("#lorsu-stop")
        tour.wait_status(page, "Stopped")
        page.wait_for_selector("#lorsu-metrics:has-text('Stopped')", timeout=20000)
        assert "%" not in page.inner_text("#lorsu-metrics")

        page.get_by_label("number input for Epochs").fill("1")
        page.get_by_label("number input for Epochs").press("Enter")
        page.click("#lorsu-train")
        tour.wait_status(page, "Done: session 1 saved")
        assert "%" in page.inner_text("#lorsu-metrics")
        page.get_by_label("Coloured squares: mixes", exact=True).check()
        tour.wait_status(page, "Data ready")
        page.wait_for_selector("#lorsu-metrics:has-text('New data picked')", timeout=20000)
        assert "%" not in page.inner_text("#lorsu-metrics")
        assert not page.errors, page.errors
    finally:
        ctx.close()


def test_a_waiting_session_shows_its_place_and_an_eta(served, browser):
    first_ctx, first = open_page(browser, served)
    second_ctx, second = open_page(browser, served)
    try:
        tour.teach_and_train(first, "Coloured squares: colours")  # the estimate's basis
        second.get_by_label("Coloured squares: mixes", exact=True).check()
        tour.wait_status(second, "Data ready")
        # A first session long enough that the second is seen waiting for it, however fast
        # the machine and the page's drawing are.
        first.get_by_label("number input for Epochs").fill("60")
        first.get_by_label("number input for Epochs").press("Enter")
        first.click("#lorsu-train")
        first.wait_for_timeout(300)
        second.click("#lorsu-train")
        waiting = tour.wait_status(second, "in the line", 20000)
        assert waiting.startswith("Waiting for the model: position 1 in the line")
        assert "s to wait" in waiting and "median of the last" in waiting
        assert "Done: session 1 saved" in tour.wait_status(second, "Done: session 1 saved")
        assert not first.errors and not second.errors
    finally:
        first_ctx.close()
        second_ctx.close()
