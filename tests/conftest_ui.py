"""Shared set-up of the UI tests (imported by tests/test_ui*.py; pytest does not load it alone).

Gradio's temp dir and analytics are set before gradio is imported. The app runs on
`tiny-random` with example domains of coloured squares written to a temp folder, so the tests
depend neither on the toy assets nor on a network.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

_TEMP = Path(tempfile.mkdtemp(prefix="lorsu-ui-tests-"))
os.environ["GRADIO_TEMP_DIR"] = str(_TEMP / "gradio")
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_RUN_HISTORY", "False")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from lorsu_demo.events import Done  # noqa: E402

# Two colour worlds: the "example domains" the app offers, and a control set.
PALETTES = {
    "colours": {"red": (0,), "green": (1,), "blue": (2,)},
    "mixes": {"yellow": (0, 1), "purple": (0, 2), "cyan": (1, 2)},
}
CONTROL = {"red": (0,), "green": (1,), "blue": (2,), "yellow": (0, 1)}


def colour_image(rng, channels, size=32) -> Image.Image:
    pixels = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
    for c in channels:
        pixels[..., c] += 150
    return Image.fromarray(pixels)


def write_classes(root: Path, palette: dict, per_class: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for label, channels in palette.items():
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            colour_image(rng, channels).save(folder / f"{i:03d}.png")


def write_world(root: Path) -> tuple[Path, Path]:
    """root/domains/<name>/{train,test}/<class>/*.png (+ README.md) and root/control/."""
    domains = root / "domains"
    for seed, (name, palette) in enumerate(PALETTES.items()):
        write_classes(domains / name / "train", palette, 6, seed * 10 + 1)
        write_classes(domains / name / "test", palette, 3, seed * 10 + 2)
        (domains / name / "README.md").write_text(
            f"# Coloured squares: {name}\n\nSquares of noise in {', '.join(palette)}.\n"
        )
    write_classes(root / "control", CONTROL, 3, 99)
    return domains, root / "control"


def record_of(pairs):
    """The record of the session in a train() stream (its last status says why, if none)."""
    done = [event for event, _ in pairs if isinstance(event, Done)]
    assert done, [live.status for _, live in pairs][-1]
    return done[-1].record


def same_delta(a, b) -> bool:
    return sorted(a.delta) == sorted(b.delta) and all(
        torch.equal(a.delta[k].values, b.delta[k].values) for k in a.delta
    )


def make_core(root: Path, work: Path | None = None, state: Path | None = None, **kwargs):
    """An app core on tiny-random; browsers' workspaces are kept under `state` (default
    root/state), never in the user's own state folder."""
    from lorsu_demo.model import load_bundle
    from lorsu_demo.ui.core import AppCore

    torch.set_num_threads(1)
    domains, control = write_world(root)
    bundle = load_bundle("tiny-random")
    return AppCore(
        bundle,
        None,
        domains,
        [str(control)],
        work_dir=work or root / "work",
        state_dir=state or root / "state",
        **kwargs,
    )


FAST = {"batch_size": 4}


@contextmanager
def serving(core, as_the_app: bool = True):
    """The app on `core`, served on a free local port, until the block ends: yields its url.
    `as_the_app` launches it with the app's own settings (theme, CSS, upload limit); else with
    Gradio's defaults."""
    from lorsu_demo.ui.app import build_app, launch

    demo = build_app(core)
    if as_the_app:
        launch(demo, host="127.0.0.1", prevent_thread_lock=True, quiet=True)
    else:
        demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    try:
        yield demo.local_url
    finally:
        demo.close()


@contextmanager
def chromium():
    """Debian's Chromium, driven by Playwright, until the block ends."""
    from playwright.sync_api import sync_playwright

    from lorsu_demo.ui import tour

    with sync_playwright() as playwright:
        browser = tour.open_browser(playwright)
        try:
            yield browser
        finally:
            browser.close()
