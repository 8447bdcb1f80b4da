"""Labelled image sets: loading and validating them, the sessions protocol, augmentation.

Every problem with user input raises `DataError` with a message that names the file and says
what to do; nothing here should ever surface as a traceback in the app.
"""

from __future__ import annotations

import io
import random
import re
import unicodedata
import warnings
import zlib
from collections import Counter
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".tif", ".tiff", ".bmp")
# What Pillow must find inside the file, whatever its name (its JPEG reader also opens MPO,
# the JPEG of some cameras).
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "TIFF", "BMP")
FORMAT_NAMES = "PNG, JPEG, WebP, GIF, TIFF or BMP"
MAX_IMAGE_PIXELS = 40_000_000  # about 6300 x 6300; anything larger is refused before decoding
MAX_FILE_BYTES = 20 * 1024 * 1024
MAX_LABEL_CHARS = 40
MAX_IMAGES = 5000


class DataError(ValueError):
    """Bad input, with a message that says what to fix."""


# ---- memory bounds for what the app decodes and keeps ------------------------------------
MAX_UPLOAD_PIXELS = 250_000_000  # decoded in one upload (one image at a time): decoding time
MAX_WORKSPACE_PIXELS = 40_000_000  # kept by one browser session: about 120 MB of RGB
MIN_STORE_SIDE = 224  # kept images stay large enough to look at, even for a 32-pixel model


@dataclass
class PixelBudget:
    """What one upload may decode and what its workspace may still keep, in pixels.

    Active while `pixel_budget(...)` is: `open_image` then decodes JPEGs reduced (Pillow's
    draft mode), shrinks every image so its shorter side is `store_side` (the model's input
    size; the processor would resize it there anyway), and counts both totals, refusing with
    the cap in the message before the next image is decoded or kept.
    """

    store_side: int
    decode_limit: int = MAX_UPLOAD_PIXELS
    keep_limit: int = MAX_WORKSPACE_PIXELS
    decoded: int = 0
    kept: int = 0

    def decode(self, pixels: int, name: str) -> None:
        if self.decoded + pixels > self.decode_limit:
            raise DataError(
                f"{name}: this upload decodes to more than {self.decode_limit / 1e6:g} "
                "megapixels in all, the most one upload may use. Upload fewer or smaller images."
            )
        self.decoded += pixels

    def keep(self, pixels: int, name: str) -> None:
        if self.kept + pixels > self.keep_limit:
            raise DataError(
                f"{name}: your images in this browser session would take more than "
                f"{self.keep_limit / 1e6:g} megapixels, the most one session may keep. "
                "Upload fewer images, or reload the page to start again."
            )
        self.kept += pixels


_BUDGET: ContextVar[PixelBudget | None] = ContextVar("pixel_budget", default=None)


@contextmanager
def pixel_budget(budget: PixelBudget):
    """Apply `budget` to every `open_image` in this block (this thread or task only)."""
    token = _BUDGET.set(budget)
    try:
        yield budget
    finally:
        _BUDGET.reset(token)


def _store_size(size: tuple[int, int], side: int) -> tuple[int, int]:
    """`size` scaled down so its shorter side is `side` (never up)."""
    width, height = size
    scale = side / min(width, height)
    if scale >= 1:
        return width, height
    return max(1, round(width * scale)), max(1, round(height * scale))


@dataclass(frozen=True)
class Item:
    image: Image.Image
    label: str
    source: str = ""


@dataclass
class LabelledImages:
    name: str
    items: list[Item] = field(default_factory=list)

    @property
    def classes(self) -> list[str]:
        return sorted({item.label for item in self.items})

    @property
    def labels(self) -> list[str]:
        return [item.label for item in self.items]

    def counts(self) -> dict[str, int]:
        return dict(sorted(Counter(self.labels).items()))

    def subset(self, classes, name: str | None = None) -> LabelledImages:
        keep = set(classes)
        return LabelledImages(name or self.name, [i for i in self.items if i.label in keep])

    def __len__(self) -> int:
        return len(self.items)


@dataclass
class Domain:
    """A target domain: training images (the pool for shots) and a held-out test set."""

    name: str
    train: LabelledImages
    test: LabelledImages
    templates: list[str] | None = None

    @property
    def classes(self) -> list[str]:
        return sorted(set(self.train.classes) | set(self.test.classes))


def clean_label(raw: str, source: str = "") -> str:
    """A label as captions will use it: underscores to spaces, one space, no control characters."""
    text = unicodedata.normalize("NFKC", str(raw)).replace("_", " ").replace("-", " ")
    text = re.sub(r"\s+", " ", text).strip()
    where = f" (from {source})" if source else ""
    if not text:
        raise DataError(f"Empty label{where}: give every image a class name.")
    # Zero-width joiners and variation selectors (category Cf) build emoji such as 👩‍🔬: they
    # are letters of a name, not control characters. Real controls (Cc), unassigned (Cn),
    # private-use (Co) and surrogates (Cs) are refused.
    bad = [ch for ch in text if unicodedata.category(ch) in ("Cc", "Cn", "Co", "Cs")]
    if bad:
        raise DataError(
            f"Label {raw[:40]!r}{where} has control characters or unassigned code points "
            f"({', '.join(f'U+{ord(ch):04X}' for ch in bad[:3])}): use plain words."
        )
    if len(text) > MAX_LABEL_CHARS:
        raise DataError(
            f"Label {text[:20]!r}...{where} is {len(text)} characters long: "
            f"keep class names under {MAX_LABEL_CHARS} characters."
        )
    if "{" in text or "}" in text:
        raise DataError(f"Label {text!r}{where} contains braces: remove them.")
    return text


def open_image(source, name: str | None = None) -> Image.Image:
    """Open and fully decode an image as RGB, refusing non-images, corrupt files and bombs."""
    name = name or str(source)
    if isinstance(source, Image.Image):
        image = source
    else:
        if isinstance(source, (str, Path)):
            path = Path(source)
            try:
                size = path.stat().st_size
            except OSError as err:
                raise DataError(f"Cannot read {name}: {err.strerror}.") from err
            if size > MAX_FILE_BYTES:
                raise DataError(
                    f"{name} is {size / 2**20:.0f} MB: use images under {MAX_FILE_BYTES // 2**20} MB."
                )
            data = path.read_bytes()
        else:
            data = bytes(source)
        if not data:
            raise DataError(f"{name} is empty (0 bytes): use {FORMAT_NAMES} files.")
        budget = _BUDGET.get()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
                width, height = image.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise DataError(
                        f"{name} is {width}x{height} pixels: that is too large to be safe to "
                        f"decode; resize it below {MAX_IMAGE_PIXELS // 1_000_000} megapixels."
                    )
                if budget is not None:
                    if image.format in ("JPEG", "MPO") and min(width, height) > budget.store_side:
                        # Decode at 1/2, 1/4 or 1/8 scale, no smaller than what is kept.
                        image.draft("RGB", _store_size((width, height), budget.store_side))
                    budget.decode(image.size[0] * image.size[1], name)
                image.load()
        except DataError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise DataError(
                f"{name} claims an enormous size (a decompression bomb?): remove it."
            ) from err
        except UnidentifiedImageError as err:
            raise DataError(f"{name} is not an image file: use {FORMAT_NAMES} files.") from err
        except (OSError, SyntaxError, ValueError, EOFError, zlib.error) as err:
            detail = str(err)[:80]
            raise DataError(
                f"{name} is damaged or truncated ({detail}): replace or remove it."
            ) from err
    if min(image.size) < 1:
        raise DataError(f"{name} has no pixels: remove it.")
    budget = _BUDGET.get()
    if budget is None:
        return image.convert("RGB")
    size = _store_size(image.size, budget.store_side)
    budget.keep(size[0] * size[1], name)
    if size != image.size and image.mode in ("RGB", "RGBA", "L"):
        # Shrink before converting, so a large image is never held twice at full size.
        image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    image = image.convert("RGB")
    if size != image.size:  # palette and other modes resize only once converted
        image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    return image


def validate(dataset: LabelledImages, *, for_training: bool = True) -> None:
    if not dataset.items:
        raise DataError(f"No images in {dataset.name}: add images of at least two classes.")
    if len(dataset.items) > MAX_IMAGES:
        raise DataError(
            f"{dataset.name} has {len(dataset.items)} images: use at most {MAX_IMAGES}."
        )
    by_case: dict[str, str] = {}
    for label in dataset.classes:
        other = by_case.setdefault(label.casefold(), label)
        if other != label:
            raise DataError(
                f"{dataset.name} has classes {other!r} and {label!r}, which differ only in case: "
                "captions treat them as one word. Rename or merge them."
            )
    if for_training and len(dataset.classes) < 2:
        only = dataset.classes[0]
        raise DataError(
            f"Only one class ({only!r}) in {dataset.name}: the contrastive loss needs at least "
            "two classes to tell apart. Add images of another class."
        )


def from_pairs(pairs, name: str = "uploaded images") -> LabelledImages:
    """(image or path or bytes, label) pairs -> a validated set."""
    items = []
    for index, (image, label) in enumerate(pairs):
        source = str(image) if isinstance(image, (str, Path)) else f"image {index + 1}"
        items.append(Item(open_image(image, source), clean_label(label, source), source))
    dataset = LabelledImages(name, items)
    validate(dataset, for_training=False)
    return dataset


def _images_in(directory: Path) -> list[Path]:
    files = []
    for path in sorted(directory.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_dir():
            raise DataError(
                f"{path} is a folder inside a class folder: use DIR/<class>/<image> only."
            )
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            if path.suffix.lower() in (".md", ".txt", ".json"):
                continue
            raise DataError(f"{path} is not a {FORMAT_NAMES} image: remove it or convert it.")
        files.append(path)
    return files


def load_folder(directory: str | Path, name: str | None = None) -> LabelledImages:
    """DIR/<class>/*.{png,jpg,jpeg,webp} -> a labelled set (the folder name is the label)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory} is not a folder of class folders.")
    class_dirs = [
        p for p in sorted(directory.iterdir()) if p.is_dir() and not p.name.startswith(".")
    ]
    if not class_dirs:
        raise DataError(
            f"{directory} has no class folders: lay images out as {directory}/<class>/<image>."
        )
    items = []
    for class_dir in class_dirs:
        label = clean_label(class_dir.name, str(class_dir))
        for path in _images_in(class_dir):
            items.append(Item(open_image(path), label, str(path)))
    dataset = LabelledImages(name or directory.name, items)
    validate(dataset, for_training=False)
    return dataset


def read_templates(directory: Path) -> list[str] | None:
    path = directory / "templates.txt"
    if not path.exists():
        return None
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return [check_template(t) for t in lines] or None


def check_template(template: str) -> str:
    if "{label}" not in template:
        raise DataError(f"Caption template {template!r} must contain {{label}}.")
    try:
        template.format(label="x")
    except (KeyError, IndexError, ValueError) as err:
        raise DataError(f"Caption template {template!r} is not valid: {err}.") from err
    return template


def load_domain(directory: str | Path, *, test_fraction: float = 0.3, seed: int = 0) -> Domain:
    """A domain folder: DIR/train + DIR/test when present, else a seeded per-class split."""
    directory = Path(directory)
    name = directory.name
    if (directory / "train").is_dir():
        train = load_folder(directory / "train", f"{name}/train")
        test_dir = directory / "test"
        test = load_folder(test_dir, f"{name}/test") if test_dir.is_dir() else None
    else:
        train, test = load_folder(directory, name), None
    if test is None:
        train, test = split_holdout(train, test_fraction, seed)
    validate(train)
    return Domain(name, train, test, read_templates(directory))


def split_holdout(dataset: LabelledImages, fraction: float, seed: int):
    rng = random.Random(seed)
    train, test = [], []
    for label in dataset.classes:
        items = [i for i in dataset.items if i.label == label]
        rng.shuffle(items)
        n_test = max(1, round(len(items) * fraction)) if len(items) > 1 else 0
        test += items[:n_test]
        train += items[n_test:]
    return LabelledImages(f"{dataset.name}/train", train), LabelledImages(
        f"{dataset.name}/test", test
    )


@dataclass
class SessionPlan:
    index: int  # 1-based
    classes: list[str]
    train: LabelledImages


def plan_sessions(domain: Domain, sessions: int, shots: int, seed: int = 0) -> list[SessionPlan]:
    """The paper's protocol: the domain's classes split into `sessions` groups, `shots` per class."""
    classes = domain.train.classes
    if sessions < 1 or shots < 1:
        raise DataError("Use at least one session and one shot per class.")
    if len(classes) < 2 * sessions:
        raise DataError(
            f"{domain.name} has {len(classes)} classes: too few for {sessions} sessions of at "
            "least two classes each. Use fewer sessions."
        )
    rng = random.Random(seed)
    order = classes[:]
    rng.shuffle(order)
    plans = []
    for index, group in enumerate(np.array_split(np.array(order, dtype=object), sessions), 1):
        group = sorted(group.tolist())
        items = []
        for label in group:
            pool = [i for i in domain.train.items if i.label == label]
            rng.shuffle(pool)
            items += pool[:shots]
        plans.append(
            SessionPlan(index, group, LabelledImages(f"{domain.name} session {index}", items))
        )
    return plans


# ---- pixels -------------------------------------------------------------------------------


def to_unit_pixels(images: list[Image.Image], image_processor) -> torch.Tensor:
    """Resize and centre-crop as the CLIP processor does, but stop before normalising."""
    as_is = _unit_pixels_as_is(images, image_processor)
    if as_is is not None:
        return as_is
    out = image_processor(images=images, do_normalize=False, return_tensors="pt")
    return out["pixel_values"].float()


def _unit_pixels_as_is(images: list[Image.Image], image_processor) -> torch.Tensor | None:
    """The PIL processor's result for RGB images already at the model's size, without it.

    Resizing an image to its own size and cropping it to its whole self change nothing, so
    what the processor does to such an image is only its rescale (uint8 times the factor, in
    float64 as numpy does it, then float32): done here for all images at once, bit-identical
    (tests/test_core_speed.py). Every example image the toy ships is 32x32 RGB, and the
    processor's per-image work was about 0.5 s of CPU (under cProfile) for the 610 images of a
    CLI session. None (use the processor) for any other size, mode or processor."""
    try:
        from transformers.image_processing_backends import PilBackend
    except ImportError:  # pragma: no cover - another transformers layout
        return None
    processor = image_processor
    size, crop = getattr(processor, "size", None), getattr(processor, "crop_size", None)
    side = getattr(size, "shortest_edge", None)
    if (
        not images
        or not isinstance(processor, PilBackend)
        or not (processor.do_resize and processor.do_center_crop and processor.do_rescale)
        or not side
        or getattr(size, "height", None) is not None
        or (getattr(crop, "height", None), getattr(crop, "width", None)) != (side, side)
        or getattr(processor, "do_pad", False)
        or not all(
            isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (side, side)
            for image in images
        )
    ):
        return None
    stacked = torch.from_numpy(np.stack([np.asarray(image) for image in images]))
    unit = stacked.permute(0, 3, 1, 2).to(torch.float64) * float(processor.rescale_factor)
    return unit.float().contiguous()


def normalise(pixels: torch.Tensor, image_processor) -> torch.Tensor:
    mean = torch.tensor(image_processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(image_processor.image_std).view(1, 3, 1, 1)
    return (pixels - mean) / std


@dataclass(frozen=True)
class Augment:
    """SPEC section 2's train augmentation. torchvision does not install beside this torch build,
    so the few transforms are written on tensors here."""

    crop_scale: tuple[float, float] = (0.9, 1.0)
    jitter: tuple[float, float, float, float] = (0.32, 0.32, 0.32, 0.08)
    jitter_p: float = 0.8
    grey_p: float = 0.2

    def __call__(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """`one` for every image, the colour transforms run on the whole batch at once.

        The same draws in the same order (all of an image's, then the next image's), then the
        same arithmetic on every pixel: bit-identical to `one` image by image
        (tests/test_core_speed.py), with 1,243 tensor operations for a toy batch of 16 instead
        of 2,124 (740 of them are the scalar random draws)."""
        if not len(pixels):
            return pixels.clone()
        _, _, height, width = pixels.shape
        draws = [self._draw(height, width, generator) for _ in pixels]
        out = torch.stack([_crop_resize(image, d) for image, d in zip(pixels, draws)])
        jittered = [i for i, d in enumerate(draws) if d["jitter"] is not None]
        if jittered:
            out[jittered] = self._jitter_batch(out[jittered], [draws[i] for i in jittered])
        grey = [i for i, d in enumerate(draws) if d["grey"]]
        if grey:
            out[grey] = _grey_batch(out[grey]).expand(-1, 3, -1, -1)
        return out.clamp(0, 1)

    def _draw(self, height: int, width: int, g: torch.Generator) -> dict:
        """One image's random draws, as `one` makes them."""

        def uniform(low, high):
            return low + (high - low) * float(torch.rand((), generator=g))

        area = height * width * uniform(*self.crop_scale)
        ratio = float(np.exp(uniform(np.log(3 / 4), np.log(4 / 3))))
        crop_w = min(width, max(1, round((area * ratio) ** 0.5)))
        crop_h = min(height, max(1, round((area / ratio) ** 0.5)))
        top = int(torch.randint(0, height - crop_h + 1, (), generator=g))
        left = int(torch.randint(0, width - crop_w + 1, (), generator=g))
        jitter = None
        if float(torch.rand((), generator=g)) < self.jitter_p:
            b, c, s, h = self.jitter
            jitter = (uniform(1 - b, 1 + b), uniform(1 - c, 1 + c), uniform(1 - s, 1 + s))
            jitter += (uniform(-h, h),)
        grey = float(torch.rand((), generator=g)) < self.grey_p
        return {"box": (top, left, crop_h, crop_w), "jitter": jitter, "grey": grey}

    @staticmethod
    def _jitter_batch(images: torch.Tensor, draws: list[dict]) -> torch.Tensor:
        """`one`'s brightness, contrast, saturation and hue for a batch: per-image factors
        as float32 columns (a Python float multiplies in float32 too), per-image means and
        hue rotation matrices."""

        def column(values):
            return torch.tensor(values, dtype=images.dtype).view(-1, 1, 1, 1)

        bright, contrast, saturation, hue = zip(*(d["jitter"] for d in draws))
        images = images * column(bright)
        means = _grey_batch(images).mean(dim=(1, 2, 3), keepdim=True)
        images = (images - means) * column(contrast) + means
        grey = _grey_batch(images)
        images = (images - grey) * column(saturation) + grey
        rotations = torch.tensor([_hue_rotation(turns) for turns in hue])
        return torch.einsum("nij,njhw->nihw", _FROM_YIQ @ rotations @ _TO_YIQ, images)

    def one(self, image: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """The augmentation of one image (the definition; `__call__` does a batch)."""

        def uniform(low, high):
            return low + (high - low) * float(torch.rand((), generator=g))

        _, height, width = image.shape
        area = height * width * uniform(*self.crop_scale)
        ratio = float(np.exp(uniform(np.log(3 / 4), np.log(4 / 3))))
        crop_w = min(width, max(1, round((area * ratio) ** 0.5)))
        crop_h = min(height, max(1, round((area / ratio) ** 0.5)))
        top = int(torch.randint(0, height - crop_h + 1, (), generator=g))
        left = int(torch.randint(0, width - crop_w + 1, (), generator=g))
        image = image[:, top : top + crop_h, left : left + crop_w]
        image = torch.nn.functional.interpolate(
            image[None], size=(height, width), mode="bilinear", align_corners=False
        )[0]
        if float(torch.rand((), generator=g)) < self.jitter_p:
            b, c, s, h = self.jitter
            image = image * uniform(1 - b, 1 + b)
            grey = _grey(image)
            image = (image - grey.mean()) * uniform(1 - c, 1 + c) + grey.mean()
            grey = _grey(image)
            image = (image - grey) * uniform(1 - s, 1 + s) + grey
            image = _rotate_hue(image, uniform(-h, h))
        if float(torch.rand((), generator=g)) < self.grey_p:
            image = _grey(image).expand(3, -1, -1)
        return image.clamp(0, 1)


# Constants of the colour transforms, made once (they were made per image: a fifth of a toy
# batch's augmentation). The same values, so the augmented pixels are bit-identical.
_GREY = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_FROM_YIQ = torch.linalg.inv(_TO_YIQ)


def _grey(image: torch.Tensor) -> torch.Tensor:
    return (image * _GREY).sum(0, keepdim=True)


def _grey_batch(images: torch.Tensor) -> torch.Tensor:
    """`_grey` of every image of a batch (N, 3, H, W) -> (N, 1, H, W)."""
    return (images * _GREY).sum(1, keepdim=True)


def _crop_resize(image: torch.Tensor, draw: dict) -> torch.Tensor:
    _, height, width = image.shape
    top, left, crop_h, crop_w = draw["box"]
    image = image[:, top : top + crop_h, left : left + crop_w]
    return torch.nn.functional.interpolate(
        image[None], size=(height, width), mode="bilinear", align_corners=False
    )[0]


def _hue_rotation(turns: float) -> list[list[float]]:
    angle = 2 * np.pi * turns
    cos, sin = float(np.cos(angle)), float(np.sin(angle))
    return [[1.0, 0, 0], [0, cos, -sin], [0, sin, cos]]


def _rotate_hue(image: torch.Tensor, turns: float) -> torch.Tensor:
    """Hue shift as a rotation of the chroma plane in YIQ space."""
    rotate = torch.tensor(_hue_rotation(turns))
    matrix = _FROM_YIQ @ rotate @ _TO_YIQ
    return torch.einsum("ij,jhw->ihw", matrix, image)
