"""The Chat tab's confidence bars on the toy model: over the picked data's classes, else the
model's own (top ten shown); the HTML follows the page's colours and escapes class names."""

from __future__ import annotations

import re
from pathlib import Path

import conftest_ui  # noqa: F401  (Gradio's temp dir and analytics, before gradio loads)
import pytest
import torch

from lorsu_demo.model import load_bundle
from lorsu_demo.ui import bars
from lorsu_demo.ui.core import AppCore, UserError

ASSETS = Path(__file__).resolve().parents[1] / "assets"
IMAGE = ASSETS / "domains" / "seven-segment" / "test" / "seven" / "000.png"


@pytest.fixture(scope="module")
def core(tmp_path_factory):
    torch.set_num_threads(1)
    work = tmp_path_factory.mktemp("confidence")
    return AppCore(load_bundle("toy"), None, ASSETS / "domains", work_dir=work)


def shown(html: str, block: str) -> list[tuple[str, str, float]]:
    """(class, who, probability) of every bar in one block ("clip" or "mc") of the HTML."""
    start = html.index(f"lorsu-conf-{block}")
    end = html.index("lorsu-conf-mc", start + 1) if block == "clip" else len(html)
    part = html[start:end]
    rows = re.findall(r'data-class="([^"]*)"(.*?)(?=data-class=|$)', part, re.S)
    return [
        (name, who, float(p))
        for name, rest in rows
        for who, p in re.findall(r'data-who="(\w+)" data-p="([0-9.]+)"', rest)
    ]


def test_without_data_the_models_classes_are_read_and_ten_shown(core):
    result = core.confidence("no-data", str(IMAGE))
    adapted, base = result["readings"]["adapted"], result["readings"]["base"]
    assert adapted["classes"] == core.bundle.labels and len(adapted["classes"]) == 18
    assert "model's classes" in result["source"]
    assert adapted == base  # no sessions: the version is the base model
    assert sum(adapted["clip"]) == pytest.approx(1.0, abs=1e-5)
    assert len(adapted["options"]) == 5 and sum(adapted["mc"]) == pytest.approx(1.0, abs=1e-5)
    html = bars.confidence_html(result)
    clip_bars = shown(html, "clip")
    assert len({name for name, _, _ in clip_bars}) == 10 and "8 more classes" in html
    assert {who for _, who, _ in clip_bars} == {"adapted", "base"}
    # The rows are the ten most likely classes, most likely first.
    ranked = sorted(zip(adapted["clip"], adapted["classes"]), reverse=True)[:10]
    assert [n for n, who, _ in clip_bars if who == "adapted"] == [c for _, c in ranked]
    assert len(shown(html, "mc")) == 10  # five options, two bars each


def test_with_data_picked_its_classes_are_read(core):
    core.select("digits", "seven-segment")
    result = core.confidence("digits", str(IMAGE), version=0, with_base=False)
    assert set(result["readings"]) == {"adapted"}
    reading = result["readings"]["adapted"]
    assert sorted(reading["classes"]) == sorted(
        ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    )
    html = bars.confidence_html(result)
    assert {who for _, who, _ in shown(html, "clip")} == {"adapted"}
    assert "Base model" not in html


def test_bad_requests_get_messages(core):
    with pytest.raises(UserError, match="There is no session 3"):
        core.confidence("bad", str(IMAGE), version=3)
    with pytest.raises(UserError, match="Add an image first"):
        core.confidence("bad", None)


def test_bars_follow_the_theme_and_escape_names():
    reading = {
        "classes": ["<b>x</b>", "y"],
        "clip": [0.25, 0.75],
        "options": ["<b>x</b>", "y"],
        "mc": [0.6, 0.4],
        "prompt": "Q?\nA. <b>x</b>\nB. y",
    }
    html = bars.confidence_html({"readings": {"adapted": reading}, "version": 2})
    assert "<b>x</b>" not in html and "&lt;b&gt;x&lt;/b&gt;" in html
    assert "Adapted (session 2)" in html
    # No fixed text colour or light panel: the page's colours in light and dark mode.
    assert "background:transparent" in html and "color:inherit" in html
    assert not re.search(r"(?<!-)color:\s*#", html) and "white" not in html
    assert 'data-p="0.750000" style="width:75.0%' in html


def test_a_question_and_its_bars_are_one_model_call(core, monkeypatch):
    """The Chat tab asks once: the answers, then the same readings `confidence` gives, from
    the same worker call (on ZeroGPU each call costs a worker's start and quota)."""
    from lorsu_demo.ui import engine

    core.select("one-call", "seven-segment")
    alone = core.confidence("one-call", str(IMAGE))
    calls = []
    chat_worker = engine.chat_worker

    def counted(*args, **kwargs):
        calls.append(args)
        return chat_worker(*args, **kwargs)

    def not_called(*args, **kwargs):
        raise AssertionError("a second model call")

    monkeypatch.setattr(engine, "chat_worker", counted)
    monkeypatch.setattr(engine, "confidence_worker", not_called)
    said = list(core.ask("one-call", str(IMAGE), "What is in the image?"))
    kinds = [which for which, _ in said]
    assert len(calls) == 1 and kinds[-2:] == ["base", "confidence"] and "adapted" in kinds
    assert said[-1][1] == alone
    assert [which for which, _ in core.ask("one-call", str(IMAGE), "Hi?", sure=False)][-1] == (
        "base"
    )


def test_no_classes_to_read_leaves_the_answers_and_says_why(core, monkeypatch):
    def none(ws):
        raise UserError("Pick example data or upload images to see per-class confidence.")

    monkeypatch.setattr(core, "confidence_classes", none)
    said = list(core.ask("bare", str(IMAGE), "What is in the image?"))
    assert said[0][0] == "adapted" and any(which == "base" for which, _ in said)
    assert said[-1] == (
        "confidence-error",
        "Pick example data or upload images to see per-class confidence.",
    )
