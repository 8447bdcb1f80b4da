"""Your own examples: a pad drawing or a webcam photo becomes a square picture at the model's
size that a class card takes like an upload; blank pads and missing photos get a message."""

from __future__ import annotations

from pathlib import Path

import conftest_ui  # noqa: F401  (Gradio's temp dir and analytics, before gradio loads)
import numpy as np
import pytest
from PIL import Image

from lorsu_demo.data import DataError
from lorsu_demo.ui import drawing
from lorsu_demo.ui.uploads import Card, from_cards


def pad_value(strokes: bool, size: int = 256, ink: int = 0) -> dict:
    """What a Sketchpad without a background sends: a transparent canvas and the strokes."""
    layer = np.zeros((size, size, 4), dtype=np.uint8)
    if strokes:
        layer[40:220, 120:140] = (ink, ink, ink, 255)  # a "one"
    return {"background": None, "layers": [layer], "composite": layer.copy()}


def test_a_drawing_is_flattened_on_its_paper():
    picture = drawing.drawing_image(pad_value(True))
    array = np.asarray(picture)
    assert picture.mode == "RGB" and array[0, 0].tolist() == [255, 255, 255]
    assert array[100, 130].tolist() == [0, 0, 0]
    night = np.asarray(drawing.drawing_image(pad_value(True, ink=255), drawing.LIGHT_ON_DARK))
    assert night[0, 0].tolist() == [0, 0, 0] and night[100, 130].tolist() == [255, 255, 255]
    with pytest.raises(DataError, match="Draw something first"):  # black ink on black paper
        drawing.drawing_image(pad_value(True), drawing.LIGHT_ON_DARK)


def test_only_layers_are_stacked_over_the_background():
    value = pad_value(True)
    value["composite"] = None
    value["background"] = np.full((256, 256, 4), 255, dtype=np.uint8)
    array = np.asarray(drawing.drawing_image(value))
    assert array[100, 130].tolist() == [0, 0, 0] and array[5, 5].tolist() == [255, 255, 255]


@pytest.mark.parametrize(
    "value",
    [None, pad_value(False), {"background": None, "layers": [], "composite": None}]
    + [np.full((64, 64, 3), 255, dtype=np.uint8)],
)
def test_a_blank_pad_is_refused(value):
    with pytest.raises(DataError, match="Draw something first"):
        drawing.drawing_image(value)


def test_photos_need_a_picture_that_shows_something():
    with pytest.raises(DataError, match="Take a photo first"):
        drawing.photo_image(None)
    with pytest.raises(DataError, match="single colour"):
        drawing.photo_image(np.zeros((48, 64, 3), dtype=np.uint8))
    rng = np.random.default_rng(0)
    photo = drawing.photo_image(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    assert photo.size == (64, 48)


def test_fit_square_keeps_the_aspect_and_pads_with_the_border_colour():
    wide = Image.new("RGB", (200, 100), (10, 20, 30))
    wide.paste((250, 250, 250), (90, 40, 110, 60))  # a light mark in the middle
    square = drawing.fit_square(wide, 32)
    array = np.asarray(square).astype(int)
    assert square.size == (32, 32)
    # The pad above and below is the border's colour; the mark is still in the centre.
    assert np.abs(array[2, 16] - [10, 20, 30]).max() <= 2
    assert np.abs(array[29, 16] - [10, 20, 30]).max() <= 2
    assert array[16, 16].min() > 150
    # A square picture is only scaled (no padding).
    assert np.asarray(drawing.fit_square(Image.new("RGB", (64, 64), "red"), 32))[0, 0].tolist() == [
        255,
        0,
        0,
    ]


def test_a_saved_drawing_is_a_card_image_at_the_models_size(tmp_path):
    picture = drawing.drawing_image(pad_value(True))
    path = drawing.save_example(picture, tmp_path, 32, "drawing")
    saved = Image.open(path)
    assert saved.size == (32, 32) and saved.format == "PNG"
    grey = np.asarray(saved.convert("L"))
    assert grey.min() < 100 and grey.max() > 200  # the stroke survived the scaling
    other = drawing.save_example(picture, tmp_path, 32, "drawing")
    assert other != path  # every added picture is its own file
    images = from_cards([Card("one", [str(path), str(other)]), Card("two", [str(path)])])
    assert images.counts() == {"one": 2, "two": 1}
    assert all(i.image.size == (32, 32) for i in images.items)


def test_canvas_and_brush_follow_the_model_size():
    assert drawing.canvas_side(32) == 256 and drawing.canvas_side(336) == 336
    assert 2 <= drawing.brush_size(32) * 32 / drawing.canvas_side(32) <= 4  # pixels at 32


def test_polarity_reads_the_examples():
    ink = Image.new("RGB", (32, 32), "white")
    ink.paste((0, 0, 0), (12, 4, 20, 28))
    glow = Image.new("RGB", (32, 32), "black")
    glow.paste((0, 255, 255), (12, 4, 20, 28))
    assert drawing.polarity_of([ink, ink]) == drawing.DARK_ON_LIGHT
    assert drawing.polarity_of([glow, glow, ink]) == drawing.LIGHT_ON_DARK


@pytest.fixture(scope="module")
def toy_core(tmp_path_factory):
    import torch

    from lorsu_demo.model import ASSETS_DIR, load_bundle
    from lorsu_demo.ui.core import AppCore

    torch.set_num_threads(1)
    work = tmp_path_factory.mktemp("own")
    return AppCore(load_bundle("toy"), None, ASSETS_DIR / "domains", work_dir=work)


def test_the_app_keeps_an_added_drawing_at_the_models_size(toy_core):
    from lorsu_demo.ui.core import UserError

    path = Path(toy_core.add_own_example("browser", pad_value(True), "drawing"))
    assert path.suffix == ".png" and path.parent.name == "own"
    assert Image.open(path).size == (toy_core.bundle.image_size,) * 2 == (32, 32)
    photo = np.random.default_rng(1).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    assert Image.open(toy_core.add_own_example("browser", photo, "photo")).size == (32, 32)
    with pytest.raises(UserError, match="Draw something first"):
        toy_core.add_own_example("browser", pad_value(False), "drawing")
    with pytest.raises(UserError, match="Take a photo first"):
        toy_core.add_own_example("browser", None, "photo")
    with pytest.raises(UserError, match="a drawing or a photo"):
        toy_core.add_own_example("browser", pad_value(True), "video")


def test_the_pad_follows_the_picked_examples_polarity(toy_core):
    from lorsu_demo.ui.own_examples import core_polarity

    assert core_polarity(toy_core) == drawing.DARK_ON_LIGHT  # the control set: printed ink
    assert core_polarity(toy_core, "handwritten") == drawing.DARK_ON_LIGHT
    assert core_polarity(toy_core, "seven-segment") == drawing.LIGHT_ON_DARK


def test_pad_updates_switch_every_pad_to_the_examples_paper(toy_core):
    """What a pick and a reload's restore send to the cards' pads."""
    from lorsu_demo.ui.own_examples import pad_updates

    side = drawing.canvas_side(toy_core.bundle.image_size)
    for example, polarity in (
        ("seven-segment", drawing.LIGHT_ON_DARK),
        (None, drawing.DARK_ON_LIGHT),
    ):
        updates = pad_updates(toy_core, [object()] * 3, example)
        assert len(updates) == 3
        paper = updates[0]["value"]["background"]
        assert paper.size == (side, side)
        assert paper.getpixel((0, 0)) == drawing.PAPER[polarity]
