"""Development looks: handwriting that is neither the base world's nor a held-out look's.

    python -m lorsu_demo.toyworld.devlooks --out /tmp/devlooks [--seed 0]

writes OUT/<name>/{train,test}/<class>/*.png (10 and 20 per class) for:

- `hand-light`: the digits in handwriting typefaces, light on a dark ground;
- `hand-dark`: the same, dark on a light ground.

The typefaces are Debian's handwriting fonts (`apt-get install fonts-dkg-handwriting
fonts-breip fonts-bwht fonts-femkeklaver fonts-humor-sans fonts-kristi fonts-dancingscript
fonts-kaushanscript`: 13 hands, under the OFL or GPL). They are not a dependency of the project:
without any of them the command says which to install.

Unlike the held-out looks (`toyworld.heldout`), these are for choosing things. They were made
after real MNIST digits showed that the chat follows only part of what a session teaches the
encoder on handwriting unlike the base world's (docs/toyworld.md), so that the next design can be
developed on looks of that kind while MNIST stays a held-out check. Nothing in `assets/` comes
from them.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from lorsu_demo.toyworld.data import (
    _S,
    DIGITS,
    _finish,
    _gradient_background,
    write_rendered_looks,
)

FONT_FILES = [
    "truetype/fifthhorseman/dkg.ttf",
    "truetype/breip/Breip.ttf",
    "opentype/bwht/BecauseWeBuild-Regular.otf",
    "opentype/bwht/BecauseWeConnect-Regular.otf",
    "opentype/bwht/BecauseWeCreate-Regular.otf",
    "opentype/bwht/BecauseWeLearn-Regular.otf",
    "opentype/bwht/BecauseWeMentor-Regular.otf",
    "opentype/bwht/BecauseWeOrganize-Regular.otf",
    "truetype/femkeklaver/femkeklaver.ttf",
    "truetype/humor-sans/Humor-Sans.ttf",
    "truetype/kristi/Kristi.ttf",
    "opentype/dancingscript/DancingScript-Regular.otf",
    "opentype/kaushanscript/KaushanScript-Regular.otf",
]
FONT_ROOT = Path("/usr/share/fonts")
APT_PACKAGES = (
    "fonts-dkg-handwriting fonts-breip fonts-bwht fonts-femkeklaver fonts-humor-sans "
    "fonts-kristi fonts-dancingscript fonts-kaushanscript"
)


class NoHandwritingFonts(RuntimeError):
    pass


def handwriting_fonts(root: Path | None = None) -> list[Path]:
    """The installed handwriting typefaces (under `root`, default FONT_ROOT), in a fixed order."""
    root = FONT_ROOT if root is None else root
    found = [root / name for name in FONT_FILES if (root / name).is_file()]
    if not found:
        raise NoHandwritingFonts(
            f"No handwriting fonts under {root}: install them with `apt-get install "
            f"{APT_PACKAGES}`."
        )
    return found


@functools.lru_cache(maxsize=256)
def _typeface(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


def render_hand(label: str, rng: np.random.Generator, fonts: tuple[str, ...], light: bool):
    """One digit in one of `fonts`, at a random size, position, slant and rotation."""
    if light:
        canvas = _gradient_background(rng, 0, 45)
        ink = int(rng.uniform(200, 255))
    else:
        canvas = _gradient_background(rng, 200, 255)
        ink = int(rng.uniform(0, 60))
    font = fonts[int(rng.integers(len(fonts)))]
    glyph = Image.new("L", (_S, _S), 0)
    ImageDraw.Draw(glyph).text(
        (_S / 2 + rng.uniform(-0.06, 0.06) * _S, _S / 2 + rng.uniform(-0.06, 0.06) * _S),
        str(DIGITS.index(label)),
        fill=255,
        font=_typeface(font, int(rng.uniform(0.65, 0.9) * _S)),
        anchor="mm",
    )
    shear = rng.uniform(-0.2, 0.2)
    glyph = glyph.transform(
        glyph.size,
        Image.Transform.AFFINE,
        (1, shear, -shear * _S / 2, 0, 1, 0),
        resample=Image.Resampling.BILINEAR,
    )
    glyph = glyph.rotate(rng.uniform(-12, 12), resample=Image.Resampling.BILINEAR)
    canvas.paste((ink, ink, ink), mask=glyph)
    return _finish(canvas, rng, noise=rng.uniform(0, 4))


def write_devlooks(
    out: Path, seed: int = 0, n_train: int = 10, n_test: int = 20, root: Path | None = None
) -> list[Path]:
    fonts = tuple(str(p) for p in handwriting_fonts(root))
    looks = {
        name: (functools.partial(render_hand, fonts=fonts, light=light), DIGITS)
        for name, light in (("hand-light", True), ("hand-dark", False))
    }
    return write_rendered_looks(out, looks, "dev", seed, n_train, n_test)


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--seed", default=0, type=int)
    args = ap.parse_args(argv)
    try:
        folders = write_devlooks(args.out, args.seed)
    except NoHandwritingFonts as err:
        raise SystemExit(str(err)) from None
    for folder in folders:
        print(folder)


if __name__ == "__main__":
    main()
