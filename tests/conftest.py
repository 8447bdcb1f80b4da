import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402

from lorsu_demo.data import Item, LabelledImages  # noqa: E402
from lorsu_demo.evaluate import EvalSet  # noqa: E402
from lorsu_demo.model import load_bundle  # noqa: E402

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

COLOURS = {"red": (0,), "green": (1,), "blue": (2,), "yellow": (0, 1)}


def colour_image(rng, channels, size=32):
    pixels = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
    for c in channels:
        pixels[..., c] += 150
    return Image.fromarray(pixels)


def colour_set(name, per_class, seed, classes=None):
    rng = np.random.default_rng(seed)
    classes = classes or list(COLOURS)
    return LabelledImages(
        name, [Item(colour_image(rng, COLOURS[c]), c) for c in classes for _ in range(per_class)]
    )


@pytest.fixture(scope="session")
def bundle():
    torch.set_num_threads(1)
    return load_bundle("tiny-random")


@pytest.fixture(scope="session")
def colour_folder(tmp_path_factory):
    """DIR/train/<class>/*.png and DIR/test/<class>/*.png, four colour classes."""
    root = tmp_path_factory.mktemp("colours")
    for split, per_class, seed in (("train", 6, 1), ("test", 4, 2)):
        for item_index, item in enumerate(colour_set(split, per_class, seed).items):
            folder = root / split / item.label
            folder.mkdir(parents=True, exist_ok=True)
            item.image.save(folder / f"{item_index}.png")
    return root


@pytest.fixture
def train_set():
    return colour_set("train", 3, seed=1, classes=["red", "green", "blue"])


@pytest.fixture
def eval_sets():
    test = colour_set("test", 3, seed=2)
    target = EvalSet("target", test.subset(["red", "green", "blue"]), ["red", "green", "blue"])
    control = EvalSet("control", test, list(COLOURS), role="control")
    return target, control


def snapshot_model(bundle):
    """Every tensor of both models (the VLM, the CLIP text side and projections), cloned."""
    state = {f"vlm.{k}": v.detach().clone() for k, v in bundle.vlm.state_dict().items()}
    state.update({f"clip.{k}": v.detach().clone() for k, v in bundle.clip.state_dict().items()})
    return state


def changed_keys(before, bundle):
    after = snapshot_model(bundle)
    return {k for k in before if not torch.equal(before[k], after[k])}
