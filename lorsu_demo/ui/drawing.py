"""Your own examples for a class card: a drawing or a webcam photo, as a training image.

Without Gradio: the values come in as the Sketchpad / Image components hand them over (numpy
arrays, or a dict of `background`, `layers`, `composite` for the pad). Each picture is padded
to a square (so the model's centre crop keeps all of it) and scaled to the model's input
size, then written as a PNG that the card takes like any upload: "Use these images" opens and
checks it on the same path (`uploads.from_cards`, `data.open_image`).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ..data import DataError, open_image

# The pad's paper and ink for each polarity of the examples ("dark on light": handwriting
# scans and sketches; "light on dark": glowing segments).
DARK_ON_LIGHT = "dark on light"
LIGHT_ON_DARK = "light on dark"
INK = {DARK_ON_LIGHT: "#000000", LIGHT_ON_DARK: "#ffffff"}
PAPER = {DARK_ON_LIGHT: (255, 255, 255), LIGHT_ON_DARK: (0, 0, 0)}
MIN_CANVAS = 256  # a finger-sized canvas on a phone; larger models get their own size
BRUSH_FRACTION = 12  # brush width: the canvas side over this (about 3 pixels at 32)


def canvas_side(model_side: int) -> int:
    return max(MIN_CANVAS, int(model_side))


def brush_size(model_side: int) -> int:
    return max(2, canvas_side(model_side) // BRUSH_FRACTION)


def _as_image(value) -> Image.Image | None:
    if value is None:
        return None
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, np.ndarray):
        if value.size == 0:
            return None
        array = value
        if array.dtype != np.uint8:
            array = np.clip(array, 0, 255).astype(np.uint8)
        return Image.fromarray(array)
    if isinstance(value, (str, Path)):
        return open_image(value, "the picture")
    raise DataError("That picture could not be read: draw or take it again.")


def _flatten(image: Image.Image, paper: tuple[int, int, int]) -> Image.Image:
    """RGB, with transparent parts (the pad's untouched canvas) the colour of the paper."""
    if image.mode in ("RGBA", "LA", "P"):
        image = image.convert("RGBA")
        sheet = Image.new("RGBA", image.size, (*paper, 255))
        return Image.alpha_composite(sheet, image).convert("RGB")
    return image.convert("RGB")


def drawing_image(value, polarity: str = DARK_ON_LIGHT) -> Image.Image:
    """The pad's picture as RGB on its paper. A blank pad (nothing drawn, or one colour all
    over) is refused: it would teach the class a blank square."""
    if isinstance(value, dict):
        picture = _as_image(value.get("composite"))
        if picture is None:
            # Some versions send only the layers: stack them over the background.
            parts = [value.get("background"), *(value.get("layers") or [])]
            images = [i.convert("RGBA") for i in map(_as_image, parts) if i is not None]
            if images:
                picture = images[0]
                for layer in images[1:]:
                    if layer.size == picture.size:
                        picture = Image.alpha_composite(picture, layer)
    else:
        picture = _as_image(value)
    if picture is None:
        raise DataError("Draw something first: the pad is empty.")
    picture = _flatten(picture, PAPER.get(polarity, PAPER[DARK_ON_LIGHT]))
    if _one_colour(picture):
        raise DataError("Draw something first: the pad is blank.")
    return picture


def photo_image(value) -> Image.Image:
    """The webcam's picture as RGB; refused when there is none yet or it is one colour (a
    covered or dark camera)."""
    picture = _as_image(value)
    if picture is None:
        raise DataError("Take a photo first: press the camera button, then add it.")
    picture = _flatten(picture, (0, 0, 0))
    if _one_colour(picture):
        raise DataError("That photo is a single colour: is the camera covered? Take another.")
    return picture


def _one_colour(image: Image.Image) -> bool:
    low, high = zip(*image.getextrema())
    return low == high


def border_colour(image: Image.Image) -> tuple[int, int, int]:
    """The median colour of the outermost pixels: the paper of a drawing, the backdrop of a
    photo, so the padding looks like more of the same."""
    array = np.asarray(image.convert("RGB"))
    edge = np.concatenate([array[0], array[-1], array[:, 0], array[:, -1]])
    return tuple(int(v) for v in np.median(edge, axis=0))


def fit_square(image: Image.Image, side: int) -> Image.Image:
    """`image` padded to a square with its border colour, centred, then scaled to `side`."""
    image = image.convert("RGB")
    width, height = image.size
    square = max(width, height)
    if width != height:
        sheet = Image.new("RGB", (square, square), border_colour(image))
        sheet.paste(image, ((square - width) // 2, (square - height) // 2))
        image = sheet
    if square != side:
        image = image.resize((side, side), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return image


def save_example(image: Image.Image, folder: str | Path, side: int, kind: str) -> Path:
    """Write `image`, fitted to `side`, as a PNG under `folder`; returns its path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{kind}-{uuid.uuid4().hex[:12]}.png"
    fit_square(image, side).save(path, format="PNG")
    return path


def polarity_of(images: Sequence[Image.Image]) -> str:
    """Whether a set's pictures are dark on light or light on dark: brighter borders than
    centres on most images reads as dark ink on light paper."""
    votes = 0
    for image in images:
        grey = np.asarray(image.convert("L"), dtype=np.float32)
        h, w = grey.shape
        edge = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]]).mean()
        votes += 1 if edge >= grey[h // 4 : h - h // 4, w // 4 : w - w // 4].mean() else -1
    return DARK_ON_LIGHT if votes >= 0 else LIGHT_ON_DARK
