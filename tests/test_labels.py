"""Class names a model cannot spell are refused at once, everywhere a label comes in.

The toy model's text side is word-level: a word it was not trained with becomes `<unk>`, every
such class reads the same, and a session would train to nothing. Class names that differ only in
case are one word to a lower-casing tokenizer, so they are refused too.
"""

import io
import zipfile

import gradio as gr
import numpy as np
import pytest
from conftest_ui import colour_image
from PIL import Image

from lorsu_demo.cli import main
from lorsu_demo.data import DataError
from lorsu_demo.model import load_bundle
from lorsu_demo.runs import check_labels
from lorsu_demo.ui import uploads
from lorsu_demo.ui.app import build_app
from lorsu_demo.ui.core import AppCore, UserError
from lorsu_demo.ui.uploads import Card


@pytest.fixture(scope="module")
def toy():
    return load_bundle("toy")


def write_folder(root, classes, per_class=3):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in classes:
            folder = root / split / c
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                colour_image(rng, (0,)).save(folder / f"{i}.png")
    return root


def test_toy_knows_its_class_names_and_not_others(toy):
    assert toy.labels and "seven" in toy.labels and "arrow" in toy.labels
    assert toy.unknown_words(["seven", "arrow"]) == []
    assert toy.unknown_words(["seven", "cat", "big rocket"]) == ["cat", "big", "rocket"]
    # the tokenizer spells these, but no caption or answer ever named a class with them
    assert toy.unknown_words(["8", "b", "photo", "Eight"]) == ["8", "b", "photo"]


def test_unknown_label_message_names_the_known_words(toy):
    with pytest.raises(DataError) as err:
        check_labels(toy, ["cat", "seven"])
    message = str(err.value)
    assert "'cat'" in message and "seven" in message and "arrow" in message
    assert "llava-1.5-7b" in message  # how to get any label


def test_unknown_label_message_suggests_the_name_meant(toy):
    # MNIST-style sets name their folders "0".."9"; plurals and typos are near a known name
    with pytest.raises(DataError) as err:
        check_labels(toy, ["8", "circles", "triangels", "cat"])
    message = str(err.value)
    assert "'8' -> 'eight'" in message
    assert "'circles' -> 'circle'" in message and "'triangels' -> 'triangle'" in message
    assert "'cat' ->" not in message  # nothing near it: no guess


def test_models_with_a_full_tokenizer_accept_any_word(bundle):
    # tiny-random's CLIP tokenizer spells characters, so any plain word is fine
    check_labels(bundle, ["cat", "rocket", "coffee cup"])


def test_cli_train_refuses_an_unknown_label(tmp_path, capsys):
    data = write_folder(tmp_path / "pets", ["cat", "seven"])
    code = main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--sessions", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "'cat'" in err and "seven" in err
    assert not (tmp_path / "run" / "history.lorsu").exists()


def test_app_refuses_unknown_labels_from_cards_zip_and_files(toy, tmp_path):
    core = AppCore(toy, None, tmp_path / "no-examples", work_dir=tmp_path / "work")
    rng = np.random.default_rng(1)
    paths = {}
    for name in ("cat_1.png", "cat_2.png", "rocket_1.png", "rocket_2.png"):
        paths[name] = str(tmp_path / name)
        colour_image(rng, (1,)).save(paths[name])
    cards = [Card("cat", [paths["cat_1.png"], paths["cat_2.png"]])]
    cards.append(Card("rocket", [paths["rocket_1.png"], paths["rocket_2.png"]]))
    with pytest.raises(UserError, match="'cat'.*seven|seven.*'cat'"):
        core.upload("k", cards=cards)
    with pytest.raises(UserError, match="'rocket'"):
        core.upload("k", files=list(paths.values()))
    archive = tmp_path / "pets.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name, path in paths.items():
            zf.write(path, f"{name.split('_')[0]}/{name}")
    with pytest.raises(UserError, match="'cat'"):
        core.upload("k", zip_path=str(archive))
    assert not core.workspace("k").uploads  # nothing half-kept
    # the same images under known names are accepted
    known = [Card("seven", cards[0].files), Card("arrow", cards[1].files)]
    assert core.upload("k", cards=known).classes == ["arrow", "seven"]


def test_the_page_names_the_classes_the_toy_knows_before_any_upload(toy, tmp_path):
    core = AppCore(toy, None, tmp_path / "no-examples", work_dir=tmp_path / "work")
    demo = build_app(core)
    texts = " ".join(
        str(block.value) for block in demo.blocks.values() if isinstance(block, gr.Markdown)
    )
    assert "knows only these class names:** zero, one" in texts and "arrow" in texts
    assert "`eight`, not `8`" in texts
    # the upload hints' examples are names it accepts, not cat and dog
    assert "cat/1.png" not in texts and "arrow/1.png" in texts and "arrow_01.png" in texts


def png_bytes(seed):
    buffer = io.BytesIO()
    colour_image(np.random.default_rng(seed), (2,)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_labels_that_differ_only_in_case_are_refused(tmp_path):
    files = []
    for i, name in enumerate(["Cat_1.png", "Cat_2.png", "cat_3.png", "cat_4.png", "dog_5.png"]):
        path = tmp_path / name
        path.write_bytes(png_bytes(i))
        files.append(str(path))
    with pytest.raises(DataError, match="'Cat' and 'cat'"):
        uploads.from_named_files(files)
    archive = tmp_path / "case.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for i, label in enumerate(["Cat", "Cat", "cat", "cat", "dog", "dog"]):
            zf.writestr(f"{label}/{i}.png", png_bytes(i))
    with pytest.raises(DataError, match="differ only in case"):
        uploads.read_zip(str(archive))


def test_case_check_keeps_distinct_words(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(path)
    files = []
    for name in ("cat_1.png", "cats_1.png"):
        target = tmp_path / name
        target.write_bytes(path.read_bytes())
        files.append(str(target))
    assert uploads.from_named_files(files).classes == ["cat", "cats"]
