"""Per-class confidence on the toy model: CLIP's softmax and the chat model's option letters,
for a session's version and the base, each agreeing with its reader; the weights untouched."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import changed_keys, snapshot_model

from lorsu_demo import confidence as conf
from lorsu_demo import vqa
from lorsu_demo.chat import generate_answers
from lorsu_demo.data import LabelledImages, load_folder
from lorsu_demo.delta import applied
from lorsu_demo.evaluate import EvalSet, clip_predictions
from lorsu_demo.events import Done
from lorsu_demo.history import History
from lorsu_demo.model import load_bundle
from lorsu_demo.runs import method_settings_for, plan_run, run_sessions

ASSETS = Path(__file__).resolve().parents[1] / "assets"
DOMAIN = ASSETS / "domains" / "seven-segment"


@pytest.fixture(scope="module")
def toy():
    torch.set_num_threads(1)
    return load_bundle("toy")


@pytest.fixture(scope="module")
def images():
    """A few seven-segment test images (where a session changes the model) and control ones
    (where the base model is sure), so the readings are neither all certain nor all vague."""
    domain = load_folder(DOMAIN / "test", name="seven-segment").items[::7][:8]
    control = load_folder(ASSETS / "control", name="control").items[::45][:4]
    return LabelledImages("probe", domain + control)


@pytest.fixture(scope="module")
def session_deltas(toy):
    """The deltas of one short seeded lorsu session on seven-segment."""
    history = History(model=dict(toy.source))
    plan = plan_run(toy, DOMAIN, None, sessions=1, shots=3, seed=0)
    settings = method_settings_for(toy, "lorsu", {"epochs": 4})
    events = [e for _, e in run_sessions(toy, history, plan, "lorsu", settings, seed=0)]
    assert isinstance(events[-1], Done)
    return history.deltas()


def test_clip_probabilities_sum_to_one_and_pick_the_readers_class(toy, images):
    classes = toy.labels
    probs = conf.clip_probabilities(toy, [i.image for i in images.items], classes)
    assert probs.shape == (len(images), len(classes))
    assert torch.allclose(probs.sum(-1), torch.ones(len(images)), atol=1e-5)
    predicted = clip_predictions(toy, EvalSet("probe", images, classes))
    assert torch.equal(probs.argmax(-1), predicted)
    assert (probs.max(-1).values < 0.99).any()  # not a one-hot in disguise


def test_letter_probabilities_pick_the_mc_readers_letter(toy, images):
    eval_set = EvalSet("probe", images, toy.labels)
    prompts = [p for p, _ in vqa.mc_questions(eval_set)]
    pictures = [i.image for i in images.items]
    probs = conf.letter_probabilities(toy, pictures, prompts, 5)
    assert torch.allclose(probs.sum(-1), torch.ones(len(images)), atol=1e-5)
    answers = [vqa.read_letter(a) for a in generate_answers(toy, pictures, prompts, 4)]
    assert set(answers) <= set(vqa.LETTERS)  # the toy answers with a letter
    assert [vqa.LETTERS[i] for i in probs.argmax(-1).tolist()] == answers


def test_confidence_agrees_with_both_readers_for_each_version(toy, images, session_deltas):
    image = images.items[0].image
    classes = ["zero", "one", "two", "three", "four"]  # fits one question: all are options
    readings = conf.confidence(toy, image, classes, session_deltas)
    assert set(readings) == {"adapted", "base"}
    one = EvalSet("one", LabelledImages("one", [images.items[0]]), classes)
    for name, deltas in (("adapted", session_deltas), ("base", [])):
        reading = readings[name]
        assert reading.options == classes and reading.classes == classes
        assert sum(reading.clip) == pytest.approx(1.0, abs=1e-5)
        assert sum(reading.mc) == pytest.approx(1.0, abs=1e-5)
        with applied(toy.vision_state(), deltas):
            clip_pick = int(clip_predictions(toy, one)[0])
            (said,) = generate_answers(toy, [image], [reading.prompt], 4)
        assert max(range(5), key=lambda i: reading.clip[i]) == clip_pick
        assert vqa.LETTERS[max(range(5), key=lambda i: reading.mc[i])] == vqa.read_letter(said)
    assert reading.prompt == vqa.mc_prompt(vqa.DEFAULT_QUESTION, classes)


def test_a_session_changes_the_adapted_reading_not_the_base(toy, images, session_deltas):
    pictures = [i.image for i in images.items[:4]]
    adapted = [conf.confidence(toy, p, toy.labels, session_deltas) for p in pictures]
    base_only = [conf.confidence(toy, p, toy.labels, [], with_base=False) for p in pictures]
    for both, alone in zip(adapted, base_only):
        assert set(alone) == {"adapted"}
        # The base reading is the untouched model's, whatever version is read beside it.
        assert both["base"].clip == alone["adapted"].clip
        assert both["adapted"].clip != both["base"].clip
    changed_mc = [r["adapted"].mc != r["base"].mc for r in adapted]
    assert any(changed_mc)


def test_more_classes_than_letters_ask_the_top_five_of_clip(toy, images, session_deltas):
    readings = conf.confidence(toy, images.items[0].image, toy.labels, session_deltas)
    adapted, base = readings["adapted"], readings["base"]
    assert len(adapted.clip) == len(toy.labels) and len(adapted.options) == 5
    assert adapted.options == base.options and adapted.prompt == base.prompt  # one question
    mean = [(a + b) / 2 for a, b in zip(adapted.clip, base.clip)]
    ranked = sorted(range(len(mean)), key=lambda i: -mean[i])[:5]
    assert set(adapted.options) == {toy.labels[i] for i in ranked}
    order = [toy.labels.index(o) for o in adapted.options]
    assert order == sorted(order)  # in the order the classes were given
    assert len(adapted.mc) == 5


def test_the_weights_are_bit_identical_after_a_reading(toy, images, session_deltas):
    before = snapshot_model(toy)
    conf.confidence(toy, images.items[1].image, toy.labels, session_deltas)
    assert changed_keys(before, toy) == set()


def test_the_weights_are_restored_when_a_reading_fails(toy, images, session_deltas, monkeypatch):
    before = snapshot_model(toy)

    def broken(*args, **kwargs):
        raise RuntimeError("the chat model failed")

    monkeypatch.setattr(conf, "letter_probabilities", broken)
    with pytest.raises(RuntimeError, match="the chat model failed"):
        conf.confidence(toy, images.items[1].image, toy.labels, session_deltas)
    assert changed_keys(before, toy) == set()
    assert not toy.lock.locked()


@pytest.mark.parametrize(
    "classes, message",
    [(["zero"], "at least two class names"), (["zero", "one", "zero"], "only once")],
)
def test_bad_class_lists_are_refused(toy, images, classes, message):
    with pytest.raises(conf.ConfidenceError, match=message):
        conf.confidence(toy, images.items[0].image, classes)


def test_option_letters_need_their_own_tokens(toy):
    groups = conf.letter_token_ids(toy.processor.tokenizer)
    assert len(groups) == 5 and all(groups)
    with pytest.raises(conf.ConfidenceError, match="2 to 5 options"):
        conf.letter_probabilities(toy, [], [], 6)
