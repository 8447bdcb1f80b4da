import io
import struct
import zlib

import numpy as np
import pytest
import torch
from conftest import colour_set
from PIL import Image

from lorsu_demo.data import (
    Augment,
    DataError,
    clean_label,
    from_pairs,
    load_domain,
    load_folder,
    open_image,
    plan_sessions,
    validate,
)
from lorsu_demo.model import BundleError, encoder_layers, load_bundle


def png_claiming(width, height):
    """A tiny PNG whose header claims a huge size: a decompression bomb."""

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0"))
        + chunk(b"IEND", b"")
    )


def test_folder_with_train_and_test(colour_folder):
    domain = load_domain(colour_folder)
    assert domain.classes == ["blue", "green", "red", "yellow"]
    assert len(domain.train) == 24 and len(domain.test) == 16


def test_folder_without_split_gets_a_seeded_holdout(colour_folder):
    a = load_domain(colour_folder / "train", seed=1)
    b = load_domain(colour_folder / "train", seed=1)
    assert [i.source for i in a.test.items] == [i.source for i in b.test.items]
    assert set(a.train.counts()) == set(a.test.counts())
    assert not {i.source for i in a.train.items} & {i.source for i in a.test.items}


def test_sessions_protocol_splits_classes_and_shots(colour_folder):
    domain = load_domain(colour_folder)
    plans = plan_sessions(domain, sessions=2, shots=3, seed=0)
    assert sorted(c for p in plans for c in p.classes) == domain.classes
    assert all(len(p.classes) == 2 for p in plans)
    assert all(count == 3 for p in plans for count in p.train.counts().values())
    again = plan_sessions(domain, sessions=2, shots=3, seed=0)
    assert [i.source for p in plans for i in p.train.items] == [
        i.source for p in again for i in p.train.items
    ]
    other = plan_sessions(domain, sessions=2, shots=3, seed=5)
    assert [i.source for p in plans for i in p.train.items] != [
        i.source for p in other for i in p.train.items
    ]
    with pytest.raises(DataError, match="fewer sessions"):
        plan_sessions(domain, sessions=3, shots=3)


def test_non_image_file_is_named(tmp_path, colour_folder):
    (tmp_path / "cat").mkdir()
    (tmp_path / "dog").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "cat" / "a.png")
    (tmp_path / "dog" / "notes.pdf").write_bytes(b"%PDF-1.4")
    with pytest.raises(DataError, match=r"notes\.pdf is not a PNG"):
        load_folder(tmp_path)


def test_corrupt_and_fake_images_are_refused(tmp_path):
    fake = tmp_path / "fake.png"
    fake.write_text("this is text")
    with pytest.raises(DataError, match="fake.png is not an image"):
        open_image(fake)
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buffer, format="PNG")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(buffer.getvalue()[:60])
    with pytest.raises(DataError, match="cut.png is damaged or truncated"):
        open_image(truncated)


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_claiming(100_000, 100_000))
    with pytest.raises(DataError, match="bomb.png"):
        open_image(bomb)


def test_huge_files_are_refused(tmp_path, monkeypatch):
    import lorsu_demo.data as data

    path = tmp_path / "big.png"
    Image.new("RGB", (200, 200)).save(path)
    monkeypatch.setattr(data, "MAX_FILE_BYTES", 100)
    with pytest.raises(DataError, match="big.png is .* MB"):
        open_image(path)


def test_one_class_is_refused_for_training():
    with pytest.raises(DataError, match="Only one class .*red.* Add images of another class"):
        validate(colour_set("x", 3, 0, classes=["red"]))


def test_labels_are_cleaned_or_refused():
    assert clean_label("  stop_sign ") == "stop sign"
    assert clean_label("Speed-limit  50") == "Speed limit 50"
    for bad, message in [
        ("", "Empty label"),
        ("   ", "Empty label"),
        ("a\x00b", "control characters"),
        ("x" * 80, "under 40"),
        ("{label}", "braces"),
    ]:
        with pytest.raises(DataError, match=message):
            clean_label(bad, "file.png")


def test_pairs_with_empty_label_name_the_image(tmp_path):
    path = tmp_path / "one.png"
    Image.new("RGB", (8, 8)).save(path)
    with pytest.raises(DataError, match="one.png"):
        from_pairs([(path, "")])
    dataset = from_pairs([(path, "cat"), (Image.new("RGB", (4, 4)), "dog")])
    assert dataset.classes == ["cat", "dog"]


def test_augmentation_is_seeded_and_in_range():
    pixels = torch.rand(4, 3, 16, 16)
    a = Augment()(pixels, torch.Generator().manual_seed(0))
    b = Augment()(pixels, torch.Generator().manual_seed(0))
    c = Augment()(pixels, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == pixels.shape and a.min() >= 0 and a.max() <= 1


def test_encoder_layers_accessor_handles_both_layouts(bundle):
    layers = encoder_layers(bundle.vlm.model.vision_tower)
    assert layers is encoder_layers(bundle.clip)
    assert layers is bundle.layers and len(layers) == 3


def test_bundle_shares_one_encoder(bundle):
    assert bundle.clip.vision_model is bundle.vlm.model.vision_tower
    ids = {id(p) for p in bundle.clip.vision_model.parameters()}
    assert ids <= {id(p) for p in bundle.vlm.parameters()}
    assert bundle.layers_read_by_vlm == bundle.num_layers - 1
    assert bundle.logit_scale == pytest.approx(100.0, rel=1e-3)


def test_unreachable_hub_model_names_the_offline_preset():
    with pytest.raises(BundleError, match="--model toy"):
        load_bundle("llava-1.5-7b", device="cpu")


def test_unknown_model_lists_the_choices():
    with pytest.raises(BundleError, match="tiny-random"):
        load_bundle("no-such-model-anywhere")


def test_tiny_random_is_seeded():
    a, b, c = (load_bundle("tiny-random", seed=s) for s in (1, 1, 2))
    wa, wb, wc = (x.layers[0].mlp.fc1.weight for x in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert np.isfinite(wa.numpy()).all()


def test_unknown_memory_mode_is_refused():
    with pytest.raises(BundleError, match="bf16 or 4bit"):
        load_bundle("toy", memory="8bit")
