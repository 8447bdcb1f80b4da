"""Bad images and zips get a clear message, huge ones are refused before decoding, and an
upload's memory is bounded (issue 10). Handler level (`AppCore`), on tiny-random."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
from bad_inputs import BAD_IMAGES, damaged_zip, encoded, noisy_png, zip_of
from conftest_ui import make_core
from PIL import Image

from lorsu_demo.data import (
    MAX_UPLOAD_PIXELS,
    DataError,
    PixelBudget,
    clean_label,
    open_image,
    pixel_budget,
)
from lorsu_demo.ui import uploads
from lorsu_demo.ui.core import UserError
from lorsu_demo.ui.uploads import Card

QUESTION = "What is in this image?"


@pytest.fixture(scope="module")
def core(tmp_path_factory):
    return make_core(tmp_path_factory.mktemp("security-inputs"))


@pytest.fixture
def never_decoded(monkeypatch):
    """Counts full decodes (Image.load), to show a refusal came before one."""
    calls = []
    real = Image.Image.load

    def counting(self):
        calls.append(self.size)
        return real(self)

    monkeypatch.setattr(Image.Image, "load", counting)
    return calls


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_every_bad_chat_image_gets_the_upload_message(core, tmp_path, case, never_decoded):
    filename, data, expected = BAD_IMAGES[case]
    path = tmp_path / filename
    path.write_bytes(data)
    with pytest.raises(UserError, match=expected) as chat_err:
        list(core.chat("chatter", str(path), QUESTION))
    assert filename in str(chat_err.value) and len(str(chat_err.value)) < 300
    if expected in ("too large", "decompression bomb"):  # refused from the header alone
        assert never_decoded == []
    # The same file on a class card gets the same message.
    with pytest.raises(UserError, match=expected):
        core.upload("chatter", [Card("cat", [str(path)]), Card("dog", [str(path)])])
    # And the app keeps serving.
    good = tmp_path / "good.png"
    good.write_bytes(noisy_png())
    answer, base = list(core.chat("chatter", str(good), QUESTION))[-1]
    assert isinstance(answer, str) and isinstance(base, str)


def test_a_damaged_zip_entry_is_named(core, tmp_path):
    path = tmp_path / "damaged.zip"
    path.write_bytes(damaged_zip())
    with pytest.raises(UserError, match=r"cat/2\.png in damaged\.zip is damaged in the zip"):
        core.upload("zips", zip_path=str(path))


def test_long_folder_names_make_short_messages(tmp_path):
    path = tmp_path / "long.zip"
    path.write_bytes(zip_of({"x" * 5000 + "/1.png": noisy_png(), "dog/1.png": noisy_png(1)}))
    with pytest.raises(DataError) as err:
        uploads.read_zip(str(path))
    assert "characters long" in str(err.value) and len(str(err.value)) < 300
    path.write_bytes(zip_of({"cat/1.png": noisy_png(), "a/" + "y" * 5000 + "/1.png": noisy_png()}))
    with pytest.raises(DataError) as err:
        uploads.read_zip(str(path))
    assert "class folder" in str(err.value) and len(str(err.value)) < 300


def test_dot_dot_entries_are_reported_not_skipped(tmp_path):
    path = tmp_path / "climb.zip"
    entries = {"cat/1.png": noisy_png(), "dog/1.png": noisy_png(1), "../evil/1.png": noisy_png(2)}
    path.write_bytes(zip_of(entries))
    with pytest.raises(DataError, match=r"unsafe path \(\.\./evil/1\.png\)"):
        uploads.read_zip(str(path))


def test_gif_and_tiff_are_accepted_alike_by_cards_and_zips(tmp_path):
    image = Image.open(io.BytesIO(noisy_png())).convert("RGB")
    files = {}
    for label, fmt, suffix in (("cat", "GIF", ".gif"), ("dog", "TIFF", ".tiff")):
        for i in range(2):
            files[f"{label}/{i}{suffix}"] = encoded(image, fmt)
    path = tmp_path / "formats.zip"
    path.write_bytes(zip_of(files))
    from_zip, _ = uploads.read_zip(str(path))
    cards = []
    for label in ("cat", "dog"):
        paths = []
        for name, data in files.items():
            if name.startswith(label):
                paths.append(tmp_path / name.replace("/", "_"))
                paths[-1].write_bytes(data)
        cards.append(Card(label, [str(p) for p in paths]))
    from_cards = uploads.from_cards(cards)
    assert from_zip.counts() == from_cards.counts() == {"cat": 2, "dog": 2}
    path.write_bytes(zip_of({"cat/1.psd": b"8BPS", "dog/1.png": noisy_png()}))
    with pytest.raises(DataError, match="PNG, JPEG, WebP, GIF, TIFF or BMP"):
        uploads.read_zip(str(path))


def test_emoji_with_joiners_is_a_label_and_control_characters_are_named():
    assert clean_label("👩‍🔬 scientist") == "👩‍🔬 scientist"
    assert clean_label("❤️ heart") == "❤️ heart"  # a variation selector (also Cf)
    with pytest.raises(
        DataError, match=r"control characters or unassigned code points \(U\+0007\)"
    ):
        clean_label("bell\x07")


def test_uploads_are_kept_at_the_models_size_and_counted(core, tmp_path):
    paths = []
    for label in ("cat", "dog"):
        for i in range(3):
            path = tmp_path / f"{label}_{i}.png"
            Image.new("RGB", (1200, 900), (40 * i, 80, 120)).save(path)
            paths.append(str(path))
    data = core.upload("keeper", files=paths)
    side = core.store_side()
    items = [*data.domain.train.items, *data.domain.test.items]
    assert {i.image.size for i in items} == {(round(1200 * side / 900), side)}


def test_a_workspace_counts_what_its_earlier_uploads_keep(core, tmp_path, monkeypatch):
    """Each upload keeps 6 images of 299 x 224 pixels (401,856); a cap of 600,000 takes one."""
    import functools

    from lorsu_demo.ui import core as core_module

    monkeypatch.setattr(
        core_module, "PixelBudget", functools.partial(PixelBudget, keep_limit=600_000)
    )
    paths = []
    for label in ("cat", "dog"):
        for i in range(3):
            path = tmp_path / f"{label}_{i}.png"
            Image.new("RGB", (1200, 900), (40 * i, 80, 120)).save(path)
            paths.append(str(path))
    core.upload("capped", files=paths)
    with pytest.raises(UserError, match="more than 0.6 megapixels, the most one session may keep"):
        core.upload("capped", files=paths)
    core.upload("another-tab", files=paths)  # the cap is per workspace


def test_the_pixel_caps_are_said_in_the_message(tmp_path):
    big = tmp_path / "big.png"
    Image.new("RGB", (2000, 2000)).save(big)
    with pixel_budget(PixelBudget(224, decode_limit=7_000_000)):
        open_image(big)
        with pytest.raises(DataError, match="more than 7 megapixels in all"):
            open_image(big)
    with pixel_budget(PixelBudget(224, keep_limit=100_000)):
        open_image(big)  # kept at 224 x 224 = 50,176 pixels
        with pytest.raises(
            DataError, match="more than 0.1 megapixels, the most one session may keep"
        ):
            open_image(big)


def test_a_jpeg_is_decoded_reduced(tmp_path, never_decoded):
    path = tmp_path / "photo.jpg"
    Image.new("RGB", (4000, 3000), (10, 200, 30)).save(path, quality=80)
    with pixel_budget(PixelBudget(336)) as budget:
        image = open_image(path)
    assert image.size == (448, 336)
    assert budget.decoded == 500 * 375  # decoded at 1/8 scale (draft), not 12 megapixels


WORST_CASE = """
import ctypes, gc, json, sys, time
from lorsu_demo.data import PixelBudget, pixel_budget
from lorsu_demo.ui import uploads

def status_mb(key):
    with open("/proc/self/status") as f:
        line = next(l for l in f if l.startswith(key))
    return int(line.split()[1]) / 1024

path, side = sys.argv[1], int(sys.argv[2])
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # Linux: the peak (VmHWM) restarts from the current resident memory
before = status_mb("VmRSS")
clock = time.perf_counter()
if side:
    with pixel_budget(PixelBudget(side)):
        images, _ = uploads.read_zip(path)
else:  # what the code did before: every image kept at full size
    images, _ = uploads.read_zip(path)
seconds = time.perf_counter() - clock
# What the code holds, not what glibc caches: freed heap is kept for reuse unless trimmed, and
# whether it is depends on the machine (a CI run kept all 148 MB after the images were gone).
gc.collect()
try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
except (OSError, AttributeError):
    pass
kept = sum(i.image.size[0] * i.image.size[1] for i in images.items)
print(json.dumps({"retained_mb": status_mb("VmRSS") - before, "peak_mb": status_mb("VmHWM") - before,
                  "images": len(images), "kept_pixels": kept, "seconds": seconds}))
"""


def worst_case_zip(path: Path, count=6, side=6000) -> Path:
    """The issue's attack: a small zip of 6000x6000 PNGs (one flat image, many names)."""
    data = encoded(Image.new("RGB", (side, side), (120, 60, 200)), "PNG")
    entries = {f"{label}/{i}.png": data for label in ("cat", "dog") for i in range(count // 2)}
    path.write_bytes(zip_of(entries, zipfile.ZIP_STORED))  # the PNGs are compressed already
    return path


def measure(path: Path, side: int) -> dict:
    script = textwrap.dedent(WORST_CASE)
    out = subprocess.run(
        [sys.executable, "-c", script, str(path), str(side)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


# A 6000x6000 RGB image is 108 MB decoded; six kept at full size are 648 MB (measured: 972 MB
# retained by the code before, see docs/security.md). Decoding one at a time peaks at a few
# hundred MB at most (measured: 148 MB); the bounds are generous, the old code exceeds both.
RETAINED_BOUND_MB = 60
PEAK_BOUND_MB = 300


def test_a_worst_case_upload_keeps_little_memory(tmp_path):
    path = worst_case_zip(tmp_path / "six.zip")
    assert path.stat().st_size < 2_000_000, "a small file"
    assert 6 * 6000 * 6000 <= MAX_UPLOAD_PIXELS, "accepted: the worst case under the caps"
    result = measure(path, 336)
    assert result["images"] == 6
    assert result["kept_pixels"] == 6 * 336 * 336
    assert result["retained_mb"] < RETAINED_BOUND_MB, result
    assert result["peak_mb"] < PEAK_BOUND_MB, result


def test_one_more_image_is_over_the_upload_cap(tmp_path):
    path = worst_case_zip(tmp_path / "eight.zip", count=8)
    with pixel_budget(PixelBudget(336)):
        with pytest.raises(DataError, match=f"more than {MAX_UPLOAD_PIXELS / 1e6:g} mega"):
            uploads.read_zip(str(path))
