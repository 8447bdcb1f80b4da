"""The toy world's data generation: deterministic for a seed, and well-formed (no training)."""

from __future__ import annotations

import numpy as np
import pytest

from lorsu_demo.toyworld import data
from lorsu_demo.toyworld.data import (
    BASE_CLASSES,
    DIGITS,
    DOMAINS,
    IMAGE_SIZE,
    SHAPES,
    base_dataset,
    control_dataset,
    domain_dataset,
)

PROCEDURAL = [name for name, d in DOMAINS.items() if d.kind == "procedural"]


def test_base_dataset_is_deterministic_for_a_seed():
    a, la = base_dataset(2, seed=0)
    b, lb = base_dataset(2, seed=0)
    assert a.dtype == np.uint8 and a.shape == (2 * len(BASE_CLASSES), IMAGE_SIZE, IMAGE_SIZE, 3)
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    c, lc = base_dataset(2, seed=1)
    assert np.array_equal(la, lc)
    assert not np.array_equal(a, c)


def test_splits_are_independent_streams_and_prefix_stable():
    train, _ = base_dataset(3, seed=0, split="clip", classes=DIGITS[:2])
    other, _ = base_dataset(3, seed=0, split="llm", classes=DIGITS[:2])
    assert not np.array_equal(train, other)
    # the first k images of a class do not depend on how many were asked for
    fewer, _ = base_dataset(2, seed=0, split="clip", classes=DIGITS[:2])
    assert np.array_equal(fewer[:2], train[:2]) and np.array_equal(fewer[2:], train[3:5])


def test_control_is_held_out_base_world():
    x, y = control_dataset(1, seed=0)
    assert x.shape[0] == len(BASE_CLASSES)
    assert list(y) == list(range(len(BASE_CLASSES)))
    clip_train, _ = base_dataset(1, seed=0, split="clip")
    assert not any(np.array_equal(x[i], clip_train[i]) for i in range(len(x)))


def test_classes_and_domains_are_consistent():
    assert len(set(BASE_CLASSES)) == len(BASE_CLASSES) == len(DIGITS) + len(SHAPES)
    assert len(DOMAINS) >= 3
    assert any(d.kind == "real" for d in DOMAINS.values())
    for d in DOMAINS.values():
        assert set(d.classes) <= set(BASE_CLASSES)  # the language side knows every class word
        assert 5 <= len(d.classes) <= 10
        assert "{label}" in d.caption_template


@pytest.mark.parametrize("name", PROCEDURAL)
def test_procedural_domains_are_deterministic(name):
    n_classes = len(DOMAINS[name].classes)
    a, la = domain_dataset(name, "train", 2, seed=0)
    b, _ = domain_dataset(name, "train", 2, seed=0)
    assert a.shape == (2 * n_classes, IMAGE_SIZE, IMAGE_SIZE, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert list(la) == sorted(list(range(n_classes)) * 2)
    assert not np.array_equal(a, domain_dataset(name, "train", 2, seed=1)[0])
    assert not np.array_equal(a, domain_dataset(name, "test", 2, seed=0)[0])


def test_real_domain_is_deterministic_and_splits_are_disjoint():
    a, la = domain_dataset("handwritten", "train", 3, seed=0)
    b, _ = domain_dataset("handwritten", "train", 3, seed=0)
    assert a.shape == (30, IMAGE_SIZE, IMAGE_SIZE, 3) and np.array_equal(a, b)
    assert not np.array_equal(a, domain_dataset("handwritten", "train", 3, seed=1)[0])
    test, _ = domain_dataset("handwritten", "test", 20, seed=0)
    train, _ = domain_dataset("handwritten", "train", 10, seed=0)
    train_set = {t.tobytes() for t in train}
    assert not any(t.tobytes() in train_set for t in test)
    with pytest.raises(ValueError):
        domain_dataset("handwritten", "train", 101)


def test_images_have_content():
    """Every image has a visible figure: enough contrast between its darkest and lightest parts
    (the 1st and 99th percentiles: a sketch's thin, light pencil line covers few pixels)."""
    x, _ = base_dataset(1, seed=3)
    sets = [x] + [domain_dataset(n, "test", 1, seed=3)[0] for n in PROCEDURAL]
    for images in sets:
        grey = images.astype(np.float32).mean(-1)
        spread = np.percentile(grey, 99, axis=(1, 2)) - np.percentile(grey, 1, axis=(1, 2))
        assert spread.min() > 45


def test_classes_differ_from_each_other():
    """Mean images of two classes are not the same picture (guards against a broken renderer)."""
    x, y = base_dataset(4, seed=0)
    means = np.stack([x[y == c].astype(np.float32).mean(0) for c in range(len(BASE_CLASSES))])
    dist = np.abs(means[:, None] - means[None]).mean(axis=(2, 3, 4))
    off_diag = dist[~np.eye(len(BASE_CLASSES), dtype=bool)]
    assert off_diag.min() > 1.0


def test_write_data_layout(tmp_path, monkeypatch):
    # keep it fast: only the procedural domains, a couple of images each
    monkeypatch.setattr(data, "DOMAINS", {n: DOMAINS[n] for n in PROCEDURAL})
    data.write_data(tmp_path, seed=0, n_train=2, n_test=1, n_control=1)
    assert (tmp_path / "LICENSES.md").read_text().startswith("# Licences")
    assert sorted(p.name for p in (tmp_path / "control").iterdir()) == sorted(BASE_CLASSES)
    for name in PROCEDURAL:
        root = tmp_path / "domains" / name
        assert "Caption template" in (root / "README.md").read_text()
        for split, n in (("train", 2), ("test", 1)):
            folders = sorted(p.name for p in (root / split).iterdir())
            assert folders == sorted(DOMAINS[name].classes)
            assert all(len(list((root / split / c).glob("*.png"))) == n for c in folders)


def test_letters_are_deterministic_and_not_a_class_word():
    a, la = data.letters_dataset(2, seed=0)
    b, _ = data.letters_dataset(2, seed=0)
    assert a.shape == (2 * len(data.LETTER_CLASSES), IMAGE_SIZE, IMAGE_SIZE, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, data.letters_dataset(2, seed=1)[0])
    assert list(la) == sorted(list(range(len(data.LETTER_CLASSES))) * 2)
    assert not set(data.LETTER_CLASSES) & set(BASE_CLASSES)
