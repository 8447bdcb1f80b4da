"""Your own examples on a class card: a drawing pad and a webcam, each with "Add to class".

The picture is checked and fitted to the model's input size by `AppCore.add_own_example`
(`drawing.py`) and joins the card's images as a file, so "Use these images" treats it exactly
like an upload. The pad's paper and ink follow the picked example data (dark ink on light
paper for handwriting and sketches, light on dark for glowing segments).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import gradio as gr
from PIL import Image

from . import drawing
from .common import LIGHT, PRIVATE, key_of, status_line
from .core import AppCore, UserError


@dataclass
class OwnExample:
    pad: gr.Sketchpad
    add_drawing: gr.Button
    camera: gr.Image
    add_photo: gr.Button


@lru_cache(maxsize=4)
def _paper(polarity: str, side: int) -> Image.Image:
    return Image.new("RGB", (side, side), drawing.PAPER[polarity])


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#" + "".join(f"{v:02x}" for v in rgb)


def pad_settings(side: int, polarity: str) -> dict:
    """The pad's blank paper and brush for one polarity (also the update that switches it)."""
    ink = drawing.INK[polarity]
    return {
        "value": {"background": _paper(polarity, side), "layers": [], "composite": None},
        "brush": gr.Brush(
            default_size=drawing.brush_size(side),
            colors=[ink, _hex(drawing.PAPER[polarity])],
            default_color=ink,
            color_mode="defaults",
        ),
    }


def build(core: AppCore, index: int) -> OwnExample:
    """Inside a class card: the pad and the webcam, in a closed accordion."""
    side = drawing.canvas_side(core.info.image_size)
    polarity = core_polarity(core)
    number = index + 1
    with gr.Accordion(f"Draw or take a photo for class {number}", open=False):
        with gr.Tabs():
            with gr.Tab("Draw", id=f"draw-{index}"):
                pad = gr.Sketchpad(
                    **pad_settings(side, polarity),
                    type="numpy",
                    image_mode="RGBA",
                    canvas_size=(side, side),
                    fixed_canvas=True,
                    sources=(),
                    transforms=(),
                    layers=False,
                    height=320,
                    label=f"Drawing for class {number}",
                    show_label=False,
                    elem_id=f"lorsu-pad-{index}",
                )
                add_drawing = gr.Button(
                    f"Add to class {number}", size="sm", elem_id=f"lorsu-add-drawing-{index}"
                )
            with gr.Tab("Webcam", id=f"camera-{index}"):
                camera = gr.Image(
                    sources=["webcam"],
                    type="numpy",
                    height=260,
                    label=f"Photo for class {number}",
                    show_label=False,
                    elem_id=f"lorsu-camera-{index}",
                )
                add_photo = gr.Button(
                    f"Add to class {number}", size="sm", elem_id=f"lorsu-add-photo-{index}"
                )
    return OwnExample(pad, add_drawing, camera, add_photo)


def core_polarity(core: AppCore, example: str | None = None) -> str:
    """The polarity of an example's training images, else of the model's control set."""
    try:
        if example:
            images = [i.image for i in core.examples.get(example).domain.train.items[:40]]
        else:
            images = [i.image for i in core.controls[0].images.items[:40]] if core.controls else []
    except Exception:  # a damaged example folder: keep the default pad
        images = []
    return drawing.polarity_of(images) if images else drawing.DARK_ON_LIGHT


def wire(
    own: list[OwnExample], names: list, galleries: list, example, core: AppCore, status
) -> None:
    side = drawing.canvas_side(core.info.image_size)

    def adder(index: int, kind: str):
        def on_add(value, name, gallery, request: gr.Request):
            try:
                path = core.add_own_example(key_of(request), value, kind)
            except UserError as err:
                return status_line(str(err), "error"), gr.skip(), gr.skip()
            images = [g[0] if isinstance(g, (list, tuple)) else g for g in gallery or []]
            images.append(path)
            called = f" (‘{name.strip()}’)" if (name or "").strip() else " (give it a name too)"
            what = "drawing" if kind == "drawing" else "photo"
            message = (
                f"Added your {what} to class {index + 1}{called}: {len(images)} image"
                f"{'s' if len(images) != 1 else ''}. Press “Use these images” when the cards "
                "are ready."
            )
            # A blank pad (the same paper) or camera for the next example.
            if kind == "drawing":
                polarity = drawing.polarity_of([Image.open(path)])
                cleared = gr.update(value=pad_settings(side, polarity)["value"])
            else:
                cleared = gr.update(value=None)
            return status_line(message, "info"), images, cleared

        return on_add

    for index, card in enumerate(own):
        for kind, source, button in (
            ("drawing", card.pad, card.add_drawing),
            ("photo", card.camera, card.add_photo),
        ):
            button.click(
                adder(index, kind),
                [source, names[index], galleries[index]],
                [status, galleries[index], source],
                # Never a "processing" cover over the pad: it would swallow the next strokes.
                show_progress_on=[status],
                **PRIVATE,
                **LIGHT,
            )

    def on_example(name):
        return pad_updates(core, own, name)

    example.input(on_example, [example], [card.pad for card in own], **PRIVATE, **LIGHT)


def pad_updates(core: AppCore, own: list[OwnExample], example: str | None) -> list:
    """Every card's pad switched to the paper and ink of `example` (a reload's restore too)."""
    side = drawing.canvas_side(core.info.image_size)
    settings = pad_settings(side, core_polarity(core, example))
    return [gr.update(**settings) for _ in own]
