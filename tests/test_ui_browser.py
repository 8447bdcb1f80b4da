"""A real browser (Debian's Chromium, driven by Playwright) goes through the app like a newcomer:
pick an example domain, Train, see TI, CC and the heatmap, chat, roll back."""

import re

import numpy as np
import pytest
from conftest_ui import chromium, make_core, serving
from PIL import Image

from lorsu_demo.ui import tour


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui-browser")
    with serving(make_core(root)) as url:
        yield url, root


@pytest.fixture(scope="module")
def browser():
    with chromium() as browser:
        yield browser


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
    # five probes from a pool of three classes' test images (base, before, after: n of 5)
    assert seen["heatmap"] == 1 and seen["curves"] == 1 and seen["probes"] == 5
    assert all(re.fullmatch(r"\d of 5 right", t.strip()) for t in seen["probes_right"])
    assert len(seen["probes_right"]) == 3, seen["probes_right"]
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
    # a reload puts the cards back as they were used (their images as the app keeps them)
    page.reload()
    page.wait_for_timeout(2500)
    page.get_by_role("tab", name="Class cards").click()
    assert [page.get_by_label(f"Class {i}").input_value() for i in (1, 2)] == ["blue", "red"]
    for card in (0, 1):
        page.locator(f"#lorsu-card-{card} img").first.wait_for(timeout=10000)
        assert page.locator(f"#lorsu-card-{card} img").count() == 3
    assert "Training on: Your images" in page.inner_text("#lorsu-data")
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


def _stroke(page, canvas, points):
    """Drag the mouse through `points`, given as fractions of the canvas."""
    # Measured when drawing, once the page has settled: a status line appearing above moves
    # the pad, and a stroke at the old place would miss it.
    canvas.scroll_into_view_if_needed()
    page.wait_for_timeout(300)
    box = canvas.bounding_box()
    x, y = box["x"], box["y"]
    page.mouse.move(x + points[0][0] * box["width"], y + points[0][1] * box["height"], steps=4)
    page.wait_for_timeout(100)
    page.mouse.down()
    for fx, fy in points[1:]:
        page.mouse.move(x + fx * box["width"], y + fy * box["height"], steps=12)
    page.mouse.up()


def test_a_drawing_becomes_a_training_image_of_its_class(page, served):
    _, root = served
    train = root / "domains" / "colours" / "train"
    page.get_by_role("tab", name="Class cards").click()
    page.get_by_label("Class 1").fill("red")
    page.get_by_label("Class 2").fill("blue")
    page.get_by_text("Draw or take a photo for class 1").click()
    page.click("#lorsu-add-drawing-0")
    assert "Draw something first" in tour.wait_status(page, "Draw something first")

    card = page.locator("#lorsu-pad-0").locator(
        "xpath=ancestor::div[contains(@class,'gr-group')][1]"
    )
    thumbnails = card.locator(".thumbnail-item, .thumbnail-small, button.thumbnail-item")
    before = thumbnails.count()
    own = root / "work"
    canvas = page.locator("#lorsu-pad-0 canvas").first
    # Three drawings: a class needs two images at least, and one of three is kept for testing.
    for added in (1, 2, 3):
        _stroke(page, canvas, [(0.5, 0.3), (0.5, 0.7)])  # a "one"
        _stroke(page, canvas, [(0.42 + added / 50, 0.35), (0.5, 0.3)])
        page.click("#lorsu-add-drawing-0")
        # The pad exports its layers when the button is pressed: slow on a busy machine.
        said = tour.wait_status(page, f"): {added} image")
        assert said.startswith("Added your drawing to class 1 (‘red’)"), said
    page.wait_for_timeout(500)
    assert thumbnails.count() == before + 3
    drawings = sorted(own.glob("lorsu-app-*/*/own/drawing-*.png"))
    assert len(drawings) == 3
    for path in drawings:
        picture = Image.open(path)
        assert picture.size == (32, 32)  # the model's input size
        grey = np.asarray(picture.convert("L"))
        assert grey.max() > 200 and (grey < 100).sum() >= 6, grey  # paper and strokes

    # The drawings are class 1's images on the same path as uploads.
    blue = sorted(str(p) for p in (train / "blue").glob("*.png"))[:3]
    page.locator("input[type=file][multiple]").nth(1).set_input_files(blue)  # card 2
    page.wait_for_timeout(800)
    page.get_by_role("button", name="Use these images").first.click()
    # Red has the three drawings only (without them card 1 is refused as empty), blue three
    # files: six images of two classes, a third kept to test.
    ready = tour.wait_status(page, "Data ready")
    assert "Your images (4 to train, 2 to test)" in ready, ready
    assert "2 classes" in page.inner_text("#lorsu-data")
    assert not page.errors, page.errors


def test_a_webcam_photo_joins_its_class(served, browser):
    """Chromium's fake camera (a test pattern) stands in for a webcam."""
    url, root = served
    camera_browser = browser.browser_type.launch(
        executable_path=tour.CHROMIUM,
        args=[*tour.CHROMIUM_ARGS, "--use-fake-device-for-media-stream"]
        + ["--use-fake-ui-for-media-stream"],
    )
    try:
        context = camera_browser.new_context(
            viewport={"width": 1400, "height": 1000}, permissions=["camera"]
        )
        page = context.new_page()
        errors = []
        page.on("pageerror", lambda err: errors.append(str(err)))
        page.goto(url)
        page.get_by_role("tab", name="Class cards").click()
        page.get_by_label("Class 2").fill("blue")
        page.get_by_text("Draw or take a photo for class 2").click()
        page.get_by_role("tab", name="Webcam").first.click()
        page.click("#lorsu-add-photo-1")
        assert "Take a photo first" in tour.wait_status(page, "Take a photo first")
        page.locator("#lorsu-camera-1 [title='grant webcam access']").click()
        # Capture only once the camera's stream shows frames.
        page.wait_for_function(
            "() => { const v = document.querySelector('#lorsu-camera-1 video');"
            " return v && v.readyState >= 2 && v.videoWidth > 0; }",
            timeout=tour.TIMEOUT_MS,
        )
        page.locator("#lorsu-camera-1 button[aria-label='capture photo']").first.click()
        page.wait_for_selector("#lorsu-camera-1 img", timeout=tour.TIMEOUT_MS)  # the photo
        page.click("#lorsu-add-photo-1")
        said = tour.wait_status(page, "): 1 image")
        assert said.startswith("Added your photo to class 2 (‘blue’)"), said
        assert not errors, errors
        # Looked at while the page is open: closing it drops its folder.
        (photo,) = root.glob("work/lorsu-app-*/*/own/photo-*.png")
        picture = Image.open(photo)
        assert picture.size == (32, 32)
        assert len(picture.getcolors(32 * 32)) > 2  # the camera's picture, not a blank
    finally:
        camera_browser.close()
