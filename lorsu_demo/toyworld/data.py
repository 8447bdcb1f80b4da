"""Deterministic image generation for the toy world.

Every image is 32x32 RGB (uint8), the tiny encoder's input size, drawn at 4x and box-filtered
down. Each image has its own random stream derived from (seed, set, split, class, index), so the
first k images of a class are the same whatever n is asked for, and a different seed gives a
different world.

- The **base world** ("printed"): thick-stroke digits and filled shapes in a dark ink on a light,
  plain background, with small changes of position, size, rotation, slant, colour and noise.
  The tiny CLIP and LLaVA are trained on it; `control_dataset` is a held-out test set in its look.
- **Letters** (CLIP training only): 22 lower- and upper-case letters in Pillow's embedded font,
  in seven looks (printed, outline, inverted, textured, dotted, flat colour, low-resolution).
  They stand for the rest of the world a real CLIP has seen: the encoder learns features beyond
  the 18 classes, so that learning a new look need not overwrite the old one.
- **Domains**: the same kinds of classes in looks the encoder never saw.
  - `handwritten` (real): the UCI handwritten digits bundled with scikit-learn (`load_digits`,
    8x8 scans of 43 people's handwriting), their strokes thickened as a broad felt-tip draws
    them, dark grey on off-white, 32 px.
  - `seven-segment` (procedural): digits on a glowing seven-segment display.
  - `sketches` (procedural): the shapes as thin, wobbly outlines in a light pencil or a
    ballpoint on ruled paper.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

IMAGE_SIZE = 32
_SS = 4  # supersampling factor for drawing
_S = IMAGE_SIZE * _SS

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SHAPES = ["circle", "square", "triangle", "star", "heart", "cross", "diamond", "arrow"]
BASE_CLASSES = DIGITS + SHAPES
# Letters broaden what the base encoder sees (many looks, their own captions) so that its features
# are not only the 18 class directions; no example domain uses letters or their looks.
LETTER_CLASSES = list("abcdefghjkmnpqrtuvwxyz")  # no i, l, o, s: too close to one, zero and five
LETTER_TEMPLATES = [
    "a photo of the letter {label}.",
    "a picture of the letter {label}.",
    "an image of the letter {label}.",
    "the letter {label}.",
    "this is the letter {label}.",
    "a letter {label}.",
]

CAPTION_TEMPLATE = "a photo of a {label}."
# Caption templates used to train the tiny CLIP (the demo's default is the first).
TRAIN_CAPTION_TEMPLATES = [
    "a photo of a {label}.",
    "a picture of a {label}.",
    "an image of a {label}.",
    "a photo of the {label}.",
    "this is a {label}.",
    "a {label}.",
]


def _rng(seed: int, *keys: object) -> np.random.Generator:
    """A generator for one (seed, keys...) stream; keys are hashed with CRC32 (stable)."""
    entropy = [int(seed)] + [zlib.crc32(str(k).encode()) for k in keys]
    return np.random.default_rng(entropy)


# ---------------------------------------------------------------------------------------------
# Geometry (unit square, y down)


def _arc(cx, cy, rx, ry, t0, t1, n=24) -> np.ndarray:
    t = np.radians(np.linspace(t0, t1, n))
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


def _poly(*points) -> np.ndarray:
    return np.asarray(points, dtype=np.float64)


def _digit_strokes(digit: int) -> list[np.ndarray]:
    """Centre-line strokes of a plain printed digit, in the unit square."""
    if digit == 0:
        return [_arc(0.5, 0.5, 0.3, 0.44, 0, 360, 40)]
    if digit == 1:
        return [_poly((0.3, 0.22), (0.52, 0.06), (0.52, 0.94)), _poly((0.3, 0.94), (0.74, 0.94))]
    if digit == 2:
        return [
            np.concatenate([_arc(0.5, 0.3, 0.26, 0.24, 195, 400), _poly((0.2, 0.94), (0.82, 0.94))])
        ]
    if digit == 3:
        return [_arc(0.48, 0.28, 0.24, 0.22, 205, 450), _arc(0.48, 0.72, 0.27, 0.22, -90, 155)]
    if digit == 4:
        return [_poly((0.66, 0.94), (0.66, 0.06), (0.14, 0.66), (0.86, 0.66))]
    if digit == 5:
        return [
            np.concatenate(
                [
                    _poly((0.76, 0.06), (0.32, 0.06), (0.29, 0.46)),
                    _arc(0.5, 0.68, 0.27, 0.26, -125, 150),
                ]
            )
        ]
    if digit == 6:
        return [
            _poly((0.72, 0.07), (0.5, 0.17), (0.33, 0.38), (0.26, 0.66)),
            _arc(0.5, 0.7, 0.24, 0.24, 0, 360, 36),
        ]
    if digit == 7:
        return [_poly((0.18, 0.06), (0.82, 0.06), (0.42, 0.94))]
    if digit == 8:
        return [_arc(0.5, 0.27, 0.2, 0.2, 0, 360, 32), _arc(0.5, 0.72, 0.25, 0.23, -90, 270, 36)]
    if digit == 9:
        return [
            _arc(0.5, 0.3, 0.24, 0.24, 0, 360, 36),
            _poly((0.74, 0.3), (0.72, 0.56), (0.6, 0.8), (0.4, 0.94)),
        ]
    raise ValueError(digit)


def _shape_outline(shape: str) -> np.ndarray:
    """Closed outline (first point not repeated) of a shape, in the unit square."""
    if shape == "circle":
        return _arc(0.5, 0.5, 0.42, 0.42, 0, 360, 48)[:-1]
    if shape == "square":
        return _poly((0.14, 0.14), (0.86, 0.14), (0.86, 0.86), (0.14, 0.86))
    if shape == "triangle":
        return _poly((0.5, 0.08), (0.92, 0.86), (0.08, 0.86))
    if shape == "star":
        pts = []
        for i in range(10):
            r = 0.46 if i % 2 == 0 else 0.19
            a = math.radians(-90 + 36 * i)
            pts.append((0.5 + r * math.cos(a), 0.53 + r * math.sin(a)))
        return np.asarray(pts)
    if shape == "heart":
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
        return np.stack([0.5 + x / 38, 0.46 - y / 38], axis=1)
    if shape == "cross":
        a, b = 0.36, 0.64
        return _poly(
            (a, 0.1), (b, 0.1), (b, a), (0.9, a), (0.9, b), (b, b),
            (b, 0.9), (a, 0.9), (a, b), (0.1, b), (0.1, a), (a, a),
        )  # fmt: skip
    if shape == "diamond":
        return _poly((0.5, 0.05), (0.8, 0.5), (0.5, 0.95), (0.2, 0.5))
    if shape == "arrow":
        return _poly(
            (0.08, 0.4), (0.56, 0.4), (0.56, 0.18), (0.94, 0.5),
            (0.56, 0.82), (0.56, 0.6), (0.08, 0.6),
        )  # fmt: skip
    raise ValueError(shape)


def _jitter_transform(rng, scale=(0.72, 0.95), rot=12.0, shear=0.15, shift=0.08):
    """A random affine map from unit coordinates to canvas pixels."""
    s = rng.uniform(*scale) * _S
    a = math.radians(rng.uniform(-rot, rot))
    sh = rng.uniform(-shear, shear)
    dx, dy = rng.uniform(-shift, shift, 2) * _S
    rot_m = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    m = rot_m @ np.array([[1.0, sh], [0.0, 1.0]]) * s
    centre = np.array([_S / 2 + dx, _S / 2 + dy])

    def apply(points: np.ndarray) -> np.ndarray:
        return (points - 0.5) @ m.T + centre

    return apply


def _draw_polyline(draw: ImageDraw.ImageDraw, pts: np.ndarray, fill, width: float, closed=False):
    pts_list = [tuple(p) for p in pts]
    if closed:
        pts_list.append(pts_list[0])
    w = max(1, int(round(width)))
    draw.line(pts_list, fill=fill, width=w, joint="curve")
    r = w / 2
    for x, y in (pts_list[0], pts_list[-1]):
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)


def _finish(canvas: Image.Image, rng, noise: float) -> np.ndarray:
    small = canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    arr = np.asarray(small, dtype=np.float32)
    if noise > 0:
        arr = arr + rng.normal(0.0, noise, arr.shape)
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


def _gradient_background(rng, low: float, high: float) -> Image.Image:
    c0 = rng.uniform(low, high, 3)
    c1 = np.clip(c0 + rng.uniform(-18, 18, 3), 0, 255)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:_S, 0:_S] / (_S - 1) - 0.5
    t = (xx * math.cos(angle) + yy * math.sin(angle)) + 0.5
    img = c0[None, None] * (1 - t[..., None]) + c1[None, None] * t[..., None]
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _ink_colour(rng) -> tuple[int, int, int]:
    """A dark or saturated ink that contrasts with a light background."""
    if rng.random() < 0.5:
        c = rng.uniform(0, 70, 3)
    else:
        c = rng.uniform(0, 150, 3)
        c[rng.integers(3)] = rng.uniform(0, 40)
    return tuple(int(v) for v in c)


# ---------------------------------------------------------------------------------------------
# Renderers: (class index within the domain's classes, rng) -> uint8 [32, 32, 3]


def render_printed(label: str, rng: np.random.Generator) -> np.ndarray:
    """The base world: a thick-stroke digit or a filled shape, dark ink on a light background."""
    canvas = _gradient_background(rng, 185, 255)
    draw = ImageDraw.Draw(canvas)
    ink = _ink_colour(rng)
    if label in DIGITS:
        tf = _jitter_transform(rng, scale=(0.68, 0.9))
        width = rng.uniform(0.085, 0.13) * _S
        for stroke in _digit_strokes(DIGITS.index(label)):
            _draw_polyline(draw, tf(stroke), ink, width)
    else:
        tf = _jitter_transform(rng, scale=(0.7, 0.92), shear=0.08)
        draw.polygon([tuple(p) for p in tf(_shape_outline(label))], fill=ink)
    return _finish(canvas, rng, noise=rng.uniform(0, 5))


@functools.lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)  # Pillow's embedded font: same on every machine


LETTER_LOOKS = ["printed", "outline", "inverted", "textured", "dotted", "bold-colour", "low-res"]


def _letter_mask(letter: str, rng: np.random.Generator, stroke: int = 0) -> Image.Image:
    text = letter.upper() if rng.random() < 0.5 else letter
    size = int(rng.uniform(0.55, 0.85) * _S)
    mask = Image.new("L", (_S, _S), 0)
    centre = (_S / 2 + rng.uniform(-0.08, 0.08) * _S, _S / 2 + rng.uniform(-0.08, 0.08) * _S)
    ImageDraw.Draw(mask).text(
        centre, text, font=_font(size), fill=255, anchor="mm", stroke_width=stroke, stroke_fill=255
    )
    return mask.rotate(rng.uniform(-15, 15), resample=Image.Resampling.BILINEAR)


def render_letter(letter: str, rng: np.random.Generator) -> np.ndarray:
    """A letter in one of several looks (see LETTER_LOOKS), none of them an example domain's."""
    look = LETTER_LOOKS[rng.integers(len(LETTER_LOOKS))]
    return _render_in_look(lambda r, stroke: _letter_mask(letter, r, stroke), look, rng)


# How a base class's figure is drawn in the recipe's look sessions: the base world's strokes and
# filled shapes, the figure lit on a coarse grid of cells (unlit cells faint, as on a display), or
# a digit's strokes straightened into a few segments. "angular" leaves shapes as they are.
BASE_FIGURES = ["strokes", "mosaic", "angular"]


def _straightened(points: np.ndarray, step: float) -> np.ndarray:
    """The polyline `points` redrawn as straight segments about `step` long (at least five
    corners for a closed loop), its two ends kept."""
    cum = np.concatenate([[0], np.cumsum(np.linalg.norm(np.diff(points, axis=0), axis=1))])
    closed = np.linalg.norm(points[0] - points[-1]) < 1e-6
    n = max(6 if closed else 2, int(round(cum[-1] / step)) + 1)
    t = np.linspace(0, cum[-1], n)
    return np.stack([np.interp(t, cum, points[:, 0]), np.interp(t, cum, points[:, 1])], axis=1)


def _mosaic(mask: Image.Image, rng: np.random.Generator) -> Image.Image:
    """`mask` lit on a grid of 8-11 cells a side: a cell lights where the figure covers enough of
    it, and is drawn as a dot or a tile; unlit cells keep a faint glow."""
    cells = int(rng.integers(8, 12))
    cover = np.asarray(mask.resize((cells, cells), Image.Resampling.BOX), np.float32) / 255
    lit = cover > rng.uniform(0.25, 0.45)
    unlit = int(rng.uniform(0, 60))
    pitch, size = _S / cells, rng.uniform(0.6, 0.85) * _S / cells
    round_cells = rng.random() < 0.5
    out = Image.new("L", (_S, _S), 0)
    draw = ImageDraw.Draw(out)
    for row in range(cells):
        for col in range(cells):
            x, y = (col + 0.5) * pitch, (row + 0.5) * pitch
            box = [x - size / 2, y - size / 2, x + size / 2, y + size / 2]
            fill = 255 if lit[row, col] else unlit
            (draw.ellipse if round_cells else draw.rectangle)(box, fill=fill)
    return out


def _base_mask(
    label: str, rng: np.random.Generator, stroke: int = 0, figure: str = "strokes"
) -> Image.Image:
    """A base class's figure as a mask: the digit's strokes, or the filled shape, drawn as
    `figure` (one of BASE_FIGURES); `stroke` thickens it by that many pixels, as a font's
    stroke does."""
    mask = Image.new("L", (_S, _S), 0)
    draw = ImageDraw.Draw(mask)
    if label in DIGITS:
        tf = _jitter_transform(rng, scale=(0.62, 0.88))
        width = rng.uniform(0.05, 0.09) * _S + 2 * stroke
        for digit_stroke in _digit_strokes(DIGITS.index(label)):
            if figure == "angular":
                digit_stroke = _straightened(digit_stroke, rng.uniform(0.22, 0.35))
            _draw_polyline(draw, tf(digit_stroke), 255, width)
    else:
        tf = _jitter_transform(rng, scale=(0.62, 0.88), shear=0.08)
        points = [tuple(p) for p in tf(_shape_outline(label))]
        draw.polygon(points, fill=255)
        if stroke:
            draw.line(points + points[:1], fill=255, width=2 * stroke, joint="curve")
    return _mosaic(mask, rng) if figure == "mosaic" else mask


def render_base_in_look(
    label: str, rng: np.random.Generator, look: str, figure: str = "strokes"
) -> np.ndarray:
    """A base class (digit or shape) drawn as `figure` (BASE_FIGURES) in one of the letters'
    looks: a new look of a known class, as a session's domain is (used by the recipe's third
    stage only, never an example domain)."""
    seed = int(rng.integers(2**32))  # the thick and thin figures of "outline" must coincide
    return _render_in_look(
        lambda _, stroke: _base_mask(label, np.random.default_rng(seed), stroke, figure), look, rng
    )


def _render_in_look(mask_of, look: str, rng: np.random.Generator) -> np.ndarray:
    """The figure `mask_of(rng, stroke)` draws, in `look` (one of LETTER_LOOKS)."""
    state = rng.bit_generator.state
    weight = int(rng.uniform(0.02, 0.06) * _S)
    mask = mask_of(rng, weight)
    if look == "outline":
        rng.bit_generator.state = state  # the same figure, drawn thinner, cut out of the thick one
        inner = mask_of(rng, 0)
        mask = Image.fromarray(
            np.clip(np.asarray(mask, np.int16) - np.asarray(inner, np.int16), 0, 255).astype(
                np.uint8
            )
        )
    if look == "dotted":
        yy, xx = np.mgrid[0:_S, 0:_S]
        pitch = rng.uniform(0.06, 0.1) * _S
        dots = ((xx % pitch) - pitch / 2) ** 2 + ((yy % pitch) - pitch / 2) ** 2 < (
            pitch / 2.6
        ) ** 2
        mask = Image.fromarray((np.asarray(mask) * dots).astype(np.uint8))
    if look == "inverted":
        background = Image.new("RGB", (_S, _S), tuple(int(v) for v in rng.uniform(0, 70, 3)))
        ink = tuple(int(v) for v in rng.uniform(180, 255, 3))
    elif look == "textured":
        noise = rng.uniform(0, 1, (8, 8, 3))
        low, high = rng.uniform(60, 140), rng.uniform(180, 255)
        tex = Image.fromarray((low + (high - low) * noise).astype(np.uint8)).resize((_S, _S))
        background = tex
        ink = _ink_colour(rng)
    elif look == "bold-colour":
        background = Image.new("RGB", (_S, _S), tuple(int(v) for v in rng.uniform(0, 255, 3)))
        ink = tuple(int(v) for v in rng.uniform(0, 255, 3))
    else:
        background = _gradient_background(rng, 185, 255)
        ink = _ink_colour(rng)
    canvas = Image.composite(Image.new("RGB", (_S, _S), ink), background, mask)
    if look == "low-res":  # a coarse scan, blown up again
        coarse = int(rng.integers(7, 13))
        canvas = canvas.resize((coarse, coarse), Image.Resampling.BOX)
        canvas = canvas.resize((_S, _S), Image.Resampling.BICUBIC)
    return _finish(canvas, rng, noise=rng.uniform(0, 6))


_SEGMENTS = {  # endpoints of the seven segments in a unit display cell
    "a": ((0, 0), (1, 0)),
    "b": ((1, 0), (1, 1)),
    "c": ((1, 1), (1, 2)),
    "d": ((0, 2), (1, 2)),
    "e": ((0, 1), (0, 2)),
    "f": ((0, 0), (0, 1)),
    "g": ((0, 1), (1, 1)),
}
_SEVEN_SEGMENT_DIGITS = [
    "abcdef", "bc", "abdeg", "abcdg", "bcfg", "acdfg", "acdefg", "abc", "abcdefg", "abcdfg",
]  # fmt: skip
_DISPLAY_COLOURS = [(255, 45, 35), (70, 255, 100), (255, 175, 25), (70, 215, 255)]


def _segment_polygon(p, q, thickness, gap) -> np.ndarray:
    p, q = np.asarray(p, float), np.asarray(q, float)
    u = (q - p) / np.linalg.norm(q - p)
    n = np.array([-u[1], u[0]])
    h = thickness / 2
    return np.array(
        [p + gap * u, p + (gap + h) * u + h * n, q - (gap + h) * u + h * n, q - gap * u,
         q - (gap + h) * u - h * n, p + (gap + h) * u - h * n]
    )  # fmt: skip


def render_seven_segment(label: str, rng: np.random.Generator) -> np.ndarray:
    """A digit on a seven-segment display: lit segments glow on a dark panel, unlit ones faint."""
    digit = DIGITS.index(label)
    bg = rng.uniform(0, 35, 3)
    canvas = Image.new("RGB", (_S, _S), tuple(int(v) for v in bg))
    glow = Image.new("RGB", (_S, _S), (0, 0, 0))
    base = np.array(_DISPLAY_COLOURS[rng.integers(len(_DISPLAY_COLOURS))], float)
    lit = np.clip(base * rng.uniform(0.8, 1.0) + rng.uniform(-20, 20, 3), 0, 255)
    unlit = bg + (lit - bg) * rng.uniform(0.06, 0.16)
    tf = _jitter_transform(rng, scale=(0.75, 0.92), rot=4.0, shear=0.0, shift=0.06)
    slant = rng.uniform(0.08, 0.2)
    cell_w = rng.uniform(0.42, 0.55)
    thickness = rng.uniform(0.09, 0.13)
    on = set(_SEVEN_SEGMENT_DIGITS[digit])
    draw_c, draw_g = ImageDraw.Draw(canvas), ImageDraw.Draw(glow)
    for name, (p, q) in _SEGMENTS.items():
        poly = _segment_polygon(p, q, thickness * 2.2, 0.07)
        x = 0.5 + (poly[:, 0] - 0.5) * cell_w + slant * (1 - poly[:, 1]) * 0.5
        y = 0.06 + poly[:, 1] * 0.44
        pts = [tuple(v) for v in tf(np.stack([x, y], axis=1))]
        if name in on:
            draw_c.polygon(pts, fill=tuple(int(v) for v in lit))
            draw_g.polygon(pts, fill=tuple(int(v) for v in lit))
        else:
            draw_c.polygon(pts, fill=tuple(int(v) for v in unlit))
    glow = glow.filter(ImageFilter.GaussianBlur(radius=2.5 * _SS))
    arr = np.asarray(canvas, np.float32) + 0.6 * np.asarray(glow, np.float32)
    canvas = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return _finish(canvas, rng, noise=rng.uniform(2, 7))


def _resample_closed(pts: np.ndarray, n: int) -> np.ndarray:
    closed = np.concatenate([pts, pts[:1]])
    seg = np.linalg.norm(np.diff(closed, axis=0), axis=1)
    cum = np.concatenate([[0], np.cumsum(seg)])
    t = np.linspace(0, cum[-1], n, endpoint=False)
    return np.stack([np.interp(t, cum, closed[:, 0]), np.interp(t, cum, closed[:, 1])], axis=1)


def render_sketch(label: str, rng: np.random.Generator) -> np.ndarray:
    """A shape doodled as a wobbly outline in a light pencil or a ballpoint on ruled paper."""
    paper = rng.uniform(232, 252)
    canvas = Image.new("RGB", (_S, _S), (int(paper), int(paper), int(paper - rng.uniform(0, 12))))
    draw = ImageDraw.Draw(canvas)
    spacing = rng.uniform(0.18, 0.26) * _S
    y = rng.uniform(0, spacing)
    while y < _S:
        draw.line([(0, y), (_S, y)], fill=(170, 200, 235), width=_SS)
        y += spacing
    if rng.random() < 0.5:
        x = rng.uniform(0.05, 0.2) * _S
        draw.line([(x, 0), (x, _S)], fill=(235, 140, 150), width=_SS)
    if rng.random() < 0.5:
        pen = tuple(int(v) for v in rng.uniform(120, 165) * np.ones(3))  # a light pencil
    else:
        pen = (int(rng.uniform(20, 50)), int(rng.uniform(40, 70)), int(rng.uniform(130, 180)))
    tf = _jitter_transform(rng, scale=(0.72, 0.95), rot=15.0, shear=0.1)
    outline = _resample_closed(_shape_outline(label), 64)
    passes = 1 + int(rng.random() < 0.6)
    for _ in range(passes):
        k = np.arange(len(outline)) / len(outline) * 2 * math.pi
        wobble = np.zeros_like(outline)
        for f in (2, 3, 5):
            wobble += rng.normal(0, 0.012, 2) * np.stack(
                [np.sin(f * k + rng.uniform(0, 6.3)), np.cos(f * k + rng.uniform(0, 6.3))], axis=1
            )
        pts = outline + wobble + rng.normal(0, 0.004, outline.shape)
        start = rng.integers(len(pts))
        pts = np.roll(pts, -start, axis=0)
        over = int(rng.integers(0, 6))  # the stroke overshoots its start a little
        pts = np.concatenate([pts, pts[:over] + rng.normal(0, 0.01, (over, 2))])
        _draw_polyline(draw, tf(pts), pen, rng.uniform(0.016, 0.026) * _S)
    return _finish(canvas, rng, noise=rng.uniform(1, 4))


_HANDWRITTEN_TRAIN_POOL = 100  # per class: train images come from the first 100, test after


def _load_handwritten() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # bundled with scikit-learn; no download

    d = load_digits()
    return d.images, d.target


def handwritten_image(raw8x8: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One 8x8 scan (values 0-16) as a 32-px image, as if written with a broad felt-tip pen: the
    scan's strokes thickened, in a dark grey ink on off-white paper."""
    ink = Image.fromarray(np.clip(raw8x8 * 16, 0, 255).astype(np.uint8))
    ink = ink.resize((_S, _S), Image.Resampling.BICUBIC).filter(ImageFilter.MaxFilter(11))
    alpha = np.asarray(ink, np.float32)[..., None] / 255.0
    tone = rng.uniform(228, 250)
    paper = np.array([tone, tone, tone - rng.uniform(0, 14)], np.float32)
    colour = rng.uniform(10, 60) * np.ones(3, np.float32)
    canvas = Image.fromarray(np.rint(paper * (1 - alpha) + colour * alpha).astype(np.uint8))
    return _finish(canvas, rng, noise=rng.uniform(1, 4))


# ---------------------------------------------------------------------------------------------
# Sets


@dataclass(frozen=True)
class Domain:
    name: str
    title: str
    classes: list[str]
    kind: str  # "real" or "procedural"
    description: str
    source: str
    licence: str
    caption_template: str = CAPTION_TEMPLATE


DOMAINS: dict[str, Domain] = {
    d.name: d
    for d in [
        Domain(
            name="handwritten",
            title="Handwritten digits (real scans)",
            classes=DIGITS,
            kind="real",
            description=(
                "Real handwriting: the 8x8 digit scans of the UCI 'Optical Recognition of "
                "Handwritten Digits' data set (43 writers), as bundled with scikit-learn "
                "(`sklearn.datasets.load_digits`), scaled up with bicubic resampling, their "
                "strokes thickened as a broad felt-tip pen draws them, in dark grey ink on "
                "off-white paper; like the scans, the digits fill the frame. The base world only "
                "saw clean printed strokes."
            ),
            source=(
                "UCI Machine Learning Repository, Optical Recognition of Handwritten Digits "
                "(Alpaydin & Kaynak, 1998), https://doi.org/10.24432/C50P49 ; shipped inside "
                "the scikit-learn wheel (`pip install scikit-learn`, `load_digits()`)."
            ),
            licence="CC BY 4.0 (UCI Machine Learning Repository).",
        ),
        Domain(
            name="seven-segment",
            title="Seven-segment display digits (procedural)",
            classes=DIGITS,
            kind="procedural",
            description=(
                "Digits as a glowing seven-segment display shows them: red, green, amber or "
                "cyan segments with glow on a dark panel, unlit segments faintly visible, "
                "slanted. Drawn by `lorsu_demo/toyworld/data.py` (`render_seven_segment`)."
            ),
            source="Generated by this project (`python -m lorsu_demo.toyworld.train`).",
            licence="Same licence as this repository (generated data).",
        ),
        Domain(
            name="sketches",
            title="Pencil sketches of shapes (procedural)",
            classes=SHAPES,
            kind="procedural",
            description=(
                "The eight shapes doodled as thin, wobbly outlines in a light pencil or a "
                "ballpoint (often traced twice) on ruled notebook paper. The base world only saw "
                "them filled. "
                "Drawn by `lorsu_demo/toyworld/data.py` (`render_sketch`)."
            ),
            source="Generated by this project (`python -m lorsu_demo.toyworld.train`).",
            licence="Same licence as this repository (generated data).",
        ),
    ]
}

_RENDERERS: dict[str, Callable[[str, np.random.Generator], np.ndarray]] = {
    "seven-segment": render_seven_segment,
    "sketches": render_sketch,
}


def _rendered_set(
    render, set_name: str, classes: list[str], split: str, n_per_class: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    images = np.empty((len(classes) * n_per_class, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    labels = np.repeat(np.arange(len(classes)), n_per_class)
    i = 0
    for c, label in enumerate(classes):
        for k in range(n_per_class):
            images[i] = render(label, _rng(seed, set_name, split, c, k))
            i += 1
    return images, labels


def base_dataset(
    n_per_class: int, seed: int = 0, split: str = "train", classes: list[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Base-world images, class-major: (uint8 [N, 32, 32, 3], int64 [N] indices into classes).

    `split` names an independent stream ("clip", "llm", "control", ...); `classes` defaults to
    BASE_CLASSES (label indices refer to the list given).
    """
    return _rendered_set(
        render_printed, "base", list(classes or BASE_CLASSES), split, n_per_class, seed
    )


def letters_dataset(
    n_per_class: int, seed: int = 0, split: str = "train"
) -> tuple[np.ndarray, np.ndarray]:
    """Letters in many looks, class-major, labels index LETTER_CLASSES (base training only)."""
    return _rendered_set(render_letter, "letters", LETTER_CLASSES, split, n_per_class, seed)


# Not "printed" (the base world's own) nor "outline" (shapes as outlines are the sketches domain).
BASE_LOOKS = [look for look in LETTER_LOOKS if look not in ("printed", "outline")]


def base_looks_dataset(
    n_per_class: int,
    seed: int = 0,
    split: str = "sessions",
    figures: tuple[str, ...] = ("strokes",),
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The base classes drawn as each of `figures` (BASE_FIGURES) in each of BASE_LOOKS,
    figure-major, then look-major, then class-major: (uint8 images, int64 labels into
    BASE_CLASSES, int64 look indices into BASE_LOOKS, int64 figure indices into BASE_FIGURES)."""
    images, labels, looks, drawn_as = [], [], [], []
    for figure in figures:
        for j, look in enumerate(BASE_LOOKS):
            name = f"base-{look}" if figure == "strokes" else f"base-{look}-{figure}"
            x, y = _rendered_set(
                functools.partial(render_base_in_look, look=look, figure=figure), name,
                BASE_CLASSES, split, n_per_class, seed,
            )  # fmt: skip
            images.append(x)
            labels.append(y)
            looks.append(np.full(len(y), j))
            drawn_as.append(np.full(len(y), BASE_FIGURES.index(figure)))
    return tuple(np.concatenate(a) for a in (images, labels, looks, drawn_as))


def control_dataset(n_per_class: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The default control set: held-out base-world images of every base class."""
    return base_dataset(n_per_class, seed, split="control")


def domain_dataset(
    name: str, split: str, n_per_class: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A domain's images, class-major: (uint8 [N, 32, 32, 3], int64 [N] indices into its classes).

    split is "train" or "test" (disjoint); for the real domain, n_per_class is at most 100 for
    train and 70 for test.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be train or test, not {split!r}")
    domain = DOMAINS[name]
    if name == "handwritten":
        raw, target = _load_handwritten()
        limit = _HANDWRITTEN_TRAIN_POOL if split == "train" else 70
        if n_per_class > limit:
            raise ValueError(f"handwritten {split} has at most {limit} images per class")
        images, labels = [], []
        for c in range(len(domain.classes)):
            idx = np.flatnonzero(target == c)
            idx = idx[_rng(seed, "handwritten", c).permutation(len(idx))]
            pick = (
                idx[:n_per_class]
                if split == "train"
                else idx[_HANDWRITTEN_TRAIN_POOL:][:n_per_class]
            )
            images += [
                handwritten_image(raw[j], _rng(seed, "handwritten", split, c, k))
                for k, j in enumerate(pick)
            ]
            labels += [c] * len(pick)
        return np.stack(images), np.asarray(labels, np.int64)
    return _rendered_set(_RENDERERS[name], name, domain.classes, split, n_per_class, seed)


# ---------------------------------------------------------------------------------------------
# Writing packs


def _write_class_folders(root: Path, images: np.ndarray, labels: np.ndarray, classes: list[str]):
    counters: dict[int, int] = {}
    for img, lab in zip(images, labels):
        k = counters.get(int(lab), 0)
        counters[int(lab)] = k + 1
        folder = root / classes[int(lab)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{k:03d}.png", optimize=True)


def write_rendered_looks(
    out: Path, looks: dict, prefix: str, seed: int, n_train: int, n_test: int
) -> list[Path]:
    """Write OUT/<name>/{train,test}/<class>/*.png for each look (name -> (render, classes)),
    every image from its own stream of (seed, f"{prefix}-{name}", split, class, index)."""
    folders = []
    for name, (render, classes) in looks.items():
        for split, n in (("train", n_train), ("test", n_test)):
            images, labels = _rendered_set(render, f"{prefix}-{name}", classes, split, n, seed)
            _write_class_folders(Path(out) / name / split, images, labels, classes)
        folders.append(Path(out) / name)
    return folders


def domain_readme(domain: Domain, n_train: int, n_test: int) -> str:
    return (
        f"# {domain.title}\n\n"
        f"{domain.description}\n\n"
        f"- Name: `{domain.name}` ({domain.kind})\n"
        f"- Classes ({len(domain.classes)}): {', '.join(domain.classes)}\n"
        f"- Images: {n_train} train and {n_test} test per class, 32x32 RGB PNG, in "
        "`train/<class>/` and `test/<class>/`\n"
        f"- Caption template: `{domain.caption_template}`\n"
        f"- Source: {domain.source}\n"
        f"- Licence: {domain.licence}\n\n"
        "Regenerate with `python -m lorsu_demo.toyworld.train --out assets` "
        "(or `--data-only`); the images are deterministic for a seed.\n"
    )


def write_control(out: Path, seed: int = 0, n_per_class: int = 20) -> None:
    images, labels = control_dataset(n_per_class, seed)
    root = Path(out) / "control"
    _write_class_folders(root, images, labels, BASE_CLASSES)


def write_domains(out: Path, seed: int = 0, n_train: int = 10, n_test: int = 20) -> None:
    for name, domain in DOMAINS.items():
        root = Path(out) / "domains" / name
        for split, n in (("train", n_train), ("test", n_test)):
            images, labels = domain_dataset(name, split, n, seed)
            _write_class_folders(root / split, images, labels, domain.classes)
        (root / "README.md").write_text(domain_readme(domain, n_train, n_test))


LICENSES_MD = """# Licences of everything in assets/

| What | Source | Licence | How to obtain / rebuild |
|---|---|---|---|
| `toy/vlm`, `toy/clip` (weights, tokenizers, processors) | trained from scratch by this project on generated images only | same as this repository | `python -m lorsu_demo.toyworld.train --out assets --seed 0` |
| `control/` | generated (base-world renderer) | same as this repository | same command |
| letter images used to train `toy/clip` (not shipped) | drawn with Pillow's embedded default font (Aileron Regular, by Sora Sagano) | Aileron: CC0 1.0; the images: same as this repository | same command (`pip install pillow`) |
| `domains/seven-segment/`, `domains/sketches/` | generated (procedural renderers) | same as this repository | same command |
| `domains/handwritten/` | UCI Optical Recognition of Handwritten Digits (E. Alpaydin, C. Kaynak, 1998), https://doi.org/10.24432/C50P49, as bundled with scikit-learn (`sklearn.datasets.load_digits`) | CC BY 4.0 | `pip install scikit-learn`; the same command selects, scales and writes the images |

No image, weight or text in `assets/` was downloaded from a model or data hub. The only external
data is the scikit-learn copy of the UCI digits (attribution: Alpaydin, E. & Kaynak, C. (1998).
Optical Recognition of Handwritten Digits [Dataset]. UCI Machine Learning Repository; scaled up
from 8x8, strokes thickened, drawn in dark grey on off-white and reduced to 32x32).
"""


def write_licenses(out: Path) -> None:
    (Path(out) / "LICENSES.md").write_text(LICENSES_MD)


def write_data(out: Path, seed: int = 0, n_train: int = 10, n_test: int = 20, n_control: int = 20):
    write_control(out, seed, n_control)
    write_domains(out, seed, n_train, n_test)
    write_licenses(out)


def contact_sheet(path: Path, seed: int = 0, per_row: int = 10, zoom: int = 3) -> None:
    """One picture of the world: a row of base images, letters, and each domain's test images."""
    rows = [base_dataset(1, seed, split="control")[0][::2][:per_row]]
    rows.append(letters_dataset(1, seed, split="sheet")[0][:per_row])
    for name in DOMAINS:
        rows.append(domain_dataset(name, "test", 1, seed)[0][:per_row])
    width = per_row * IMAGE_SIZE
    sheet = np.full((len(rows) * (IMAGE_SIZE + 4), width, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        strip = np.concatenate(list(row), axis=1)
        sheet[r * (IMAGE_SIZE + 4) : r * (IMAGE_SIZE + 4) + IMAGE_SIZE, : strip.shape[1]] = strip
    image = Image.fromarray(sheet)
    image.resize((image.width * zoom, image.height * zoom), Image.Resampling.NEAREST).save(path)
