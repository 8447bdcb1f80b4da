"""Turning what people upload into labelled images, with messages that say what to fix.

Three ways in: class cards (a name and some images each), a zip of `class/image` folders
(optionally `train/` and `test/` at the top), or files named `class_anything.png`. Everything is
decoded and checked by `lorsu_demo.data` before any compute; a zip is read in memory, never
extracted. Every problem raises `DataError`.
"""

from __future__ import annotations

import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..data import (
    FORMAT_NAMES,
    IMAGE_SUFFIXES,
    MAX_FILE_BYTES,
    DataError,
    Domain,
    Item,
    LabelledImages,
    clean_label,
    open_image,
    split_holdout,
    validate,
)

MAX_UPLOAD_IMAGES = 2000
MAX_ZIP_BYTES = 300 * 2**20  # uncompressed
TEST_FRACTION = 0.3
_IGNORED = ("__MACOSX", ".DS_Store", "Thumbs.db")


@dataclass
class Card:
    name: str
    files: list[str]


def _count_check(n: int) -> None:
    if n > MAX_UPLOAD_IMAGES:
        raise DataError(
            f"{n} images is too many for one upload: use at most {MAX_UPLOAD_IMAGES} "
            "(a few per class is what few-shot learning is about)."
        )


def _display(path) -> str:
    return _clip(Path(str(path)).name)


def _clip(text: str, limit: int = 80) -> str:
    """A name from the upload as messages show it: a 5,000-character folder name would
    otherwise make a 5,000-character message."""
    text = str(text)
    return text if len(text) <= limit else text[: limit // 2] + "…" + text[-(limit // 2 - 1) :]


def from_cards(cards: list[Card]) -> LabelledImages:
    """Class cards: each a class name and its images. Empty cards are ignored."""
    items: list[Item] = []
    seen: dict[str, int] = {}
    used = [(i, c) for i, c in enumerate(cards, 1) if c.name.strip() or c.files]
    _count_check(sum(len(c.files) for _, c in used))
    for number, card in used:
        where = f"card {number}"
        if not card.files:
            raise DataError(
                f"Class card {number} ({card.name.strip()!r}) has no images: add some, "
                "or clear its name."
            )
        label = clean_label(card.name, where)
        if label.lower() in seen:
            raise DataError(
                f"Cards {seen[label.lower()]} and {number} are both called {label!r}: "
                "give every class its own name (or put all its images on one card)."
            )
        seen[label.lower()] = number
        for path in card.files:
            items.append(Item(open_image(path, f"{_display(path)} ({where})"), label, str(path)))
    return _checked(LabelledImages("class cards", items))


def label_from_filename(name: str) -> str:
    """`stop_sign_003.png` -> "stop sign": everything before the last underscore."""
    stem = PurePosixPath(name).stem
    head, sep, _ = stem.rpartition("_")
    if not sep or not head.strip("_ "):
        raise DataError(
            f"{name}: name files <class>_<anything>.png (for example cat_01.png, "
            "dog_01.png) so the class can be read from the name."
        )
    return clean_label(head, name)


def from_named_files(paths: list[str]) -> LabelledImages:
    """Files named `class_xxx.png`; the class is the part before the last underscore."""
    paths = [p for p in paths if _display(p) not in _IGNORED]
    _count_check(len(paths))
    items = []
    for path in paths:
        name = _display(path)
        label = label_from_filename(name)
        items.append(Item(open_image(path, name), label, name))
    return _checked(LabelledImages("named files", items))


def read_zip(path: str) -> tuple[LabelledImages, LabelledImages | None]:
    """A zip of `class/image` (or `train/class/image` + `test/class/image`), under at most one
    wrapping folder. Returns (images, test images or None)."""
    name = _display(path)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise DataError(f"{name} is not a readable zip file ({err}).") from None
    with archive:
        members = []
        for info in archive.infolist():
            parts = PurePosixPath(info.filename).parts
            shown = _clip(info.filename)
            # Checked before hidden entries are skipped: ".." starts with a dot too, and an
            # entry that climbs out of the archive is worth saying, not ignoring.
            if info.filename.startswith("/") or ".." in parts:
                raise DataError(
                    f"{name} contains an unsafe path ({shown}): zip a plain folder of class "
                    "folders, without absolute paths or '..'."
                )
            if info.is_dir() or any(p.startswith(".") or p in _IGNORED for p in parts):
                continue
            if PurePosixPath(info.filename).suffix.lower() not in IMAGE_SUFFIXES:
                if PurePosixPath(info.filename).suffix.lower() in (".md", ".txt", ".json"):
                    continue
                raise DataError(
                    f"{shown} in {name} is not a {FORMAT_NAMES} image: remove it or convert it."
                )
            if info.file_size > MAX_FILE_BYTES:
                raise DataError(
                    f"{shown} in {name} is {info.file_size / 2**20:.0f} MB: use "
                    f"images under {MAX_FILE_BYTES // 2**20} MB."
                )
            members.append((info, list(parts)))
        if not members:
            raise DataError(
                f"{name} holds no images: zip folders named after the classes, each with "
                "its images (cat/1.png, dog/1.png, ...)."
            )
        _count_check(len(members))
        if sum(info.file_size for info, _ in members) > MAX_ZIP_BYTES:
            raise DataError(f"{name} unpacks to more than {MAX_ZIP_BYTES // 2**20} MB.")
        # Strip one wrapping folder (zipping a folder usually adds one).
        while len({tuple(p[:1]) for _, p in members}) == 1 and min(len(p) for _, p in members) > 2:
            members = [(info, p[1:]) for info, p in members]
        tops = {p[0] for _, p in members}
        if tops <= {"train", "test"} and "train" in tops:
            train = _zip_set(archive, name, [(i, p[1:]) for i, p in members if p[0] == "train"])
            test_members = [(i, p[1:]) for i, p in members if p[0] == "test"]
            test = _zip_set(archive, name, test_members, "test") if test_members else None
            return train, test
        return _zip_set(archive, name, members), None


def _zip_set(archive, name, members, split="train") -> LabelledImages:
    items = []
    for info, parts in members:
        shown = f"{_clip(info.filename)} in {name}"
        if len(parts) != 2:
            raise DataError(
                f"{shown} is not inside a class folder: lay the zip out as "
                "<class>/<image> (for example cat/1.png)."
            )
        label = clean_label(parts[0], shown)
        try:
            data = archive.read(info)
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError, NotImplementedError) as err:
            raise DataError(
                f"{shown} is damaged in the zip ({_clip(str(err), 60)}): zip the folder again."
            ) from None
        items.append(Item(open_image(data, shown), label, info.filename))
    return _checked(LabelledImages(f"{name} ({split})", items), training=split == "train")


def _checked(images: LabelledImages, training: bool = True) -> LabelledImages:
    if not images.items:
        raise DataError("No images yet: add images of at least two classes.")
    validate(images, for_training=training)
    return images


def make_domain(
    name: str, images: LabelledImages, test: LabelledImages | None = None, seed: int = 0
) -> Domain:
    """A domain from uploaded images: a seeded hold-out per class unless a test set was given.
    Every class needs a test image (to measure TI) and a training image."""
    if test is None:
        counts = images.counts()
        short = [c for c, n in counts.items() if n < 2]
        if short:
            raise DataError(
                f"{_names(short)} {'has' if len(short) == 1 else 'have'} only one image: add at "
                "least two per class (about a third is kept aside to measure accuracy)."
            )
        train, test = split_holdout(images, TEST_FRACTION, seed)
    else:
        train = images
        missing = sorted(set(train.classes) - set(test.classes))
        if missing:
            raise DataError(f"The test folder has no images of {_names(missing)}: add some.")
        extra = sorted(set(test.classes) - set(train.classes))
        if extra:
            raise DataError(f"The train folder has no images of {_names(extra)}: add some.")
    validate(train)
    return Domain(
        name,
        LabelledImages(f"{name}/train", train.items),
        LabelledImages(f"{name}/test", test.items),
    )


def _names(labels: list[str]) -> str:
    quoted = [repr(label) for label in labels[:5]]
    more = f" and {len(labels) - 5} more" if len(labels) > 5 else ""
    return ("Class " if len(labels) == 1 else "Classes ") + ", ".join(quoted) + more


def summary(domain: Domain) -> list[list]:
    """Rows of (class, training images, test images)."""
    train, test = Counter(domain.train.labels), Counter(domain.test.labels)
    return [[c, train.get(c, 0), test.get(c, 0)] for c in domain.classes]
