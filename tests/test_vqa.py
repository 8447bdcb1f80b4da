"""Accuracy through the VLM's answers: 5-way multiple choice and open-ended (SPEC section 4)."""

import json
import threading

import pytest
from conftest import COLOURS, colour_set

from lorsu_demo import vqa
from lorsu_demo.cli import main
from lorsu_demo.evaluate import READERS, EvalSet, accuracy
from lorsu_demo.history import History
from lorsu_demo.runs import HISTORY_FILE

CLASSES = ["cat", "dog", "fox", "owl", "bee", "ant", "elk"]


def test_readers_are_registered():
    assert READERS["mc"] is vqa.mc_accuracy and READERS["open"] is vqa.open_accuracy


def test_multiple_choice_prompt_is_the_papers():
    options, letter = vqa.choices_for("fox", CLASSES, "set:0")
    prompt = vqa.mc_prompt("What animal is this?", options)
    lines = prompt.split("\n")
    assert lines[0] == "What animal is this?"
    assert [line[:3] for line in lines[1:6]] == ["A. ", "B. ", "C. ", "D. ", "E. "]
    assert lines[6] == "Answer with the option's letter from the given choices directly."
    assert len(lines) == 7
    assert options["ABCDE".index(letter)] == "fox"
    assert len(set(options)) == 5 and set(options) <= set(CLASSES)


def test_distractors_are_seeded_per_image():
    draws = [vqa.choices_for("fox", CLASSES, f"set:{i}") for i in range(40)]
    assert draws == [vqa.choices_for("fox", CLASSES, f"set:{i}") for i in range(40)]
    assert len({tuple(o) for o, _ in draws}) > 10  # different images, different questions
    assert {letter for _, letter in draws} == set("ABCDE")  # the answer is not always A
    assert vqa.choices_for("fox", CLASSES, "set:0", seed=1) != draws[0] or any(
        vqa.choices_for("fox", CLASSES, f"set:{i}", seed=1) != draws[i] for i in range(40)
    )


def test_fewer_than_five_classes_gives_fewer_options():
    options, letter = vqa.choices_for("red", ["red", "green", "blue"], "k")
    assert sorted(options) == ["blue", "green", "red"] and letter in "ABC"


@pytest.mark.parametrize(
    "answer, letter, right",
    [("B", "B", True), (" b.", "B", True), ("B\n", "B", True), ("C", "B", False)]
    + [("B. dog", "B", False), ("The answer is B", "B", False), ("", "B", False)],
)
def test_exact_letter_match(answer, letter, right):
    assert (vqa.read_letter(answer) == letter) is right


@pytest.mark.parametrize(
    "answer, label, right",
    [
        ("This is a red", "red", True),
        ("A speed limit 30 sign.", "speed_limit_30", True),
        ("reddish", "red", False),
        ("speed limit 300", "speed_limit_30", False),
        ("", "red", False),
    ],
)
def test_open_answer_names_the_class(answer, label, right):
    assert vqa.names_class(answer, label) is right


def target_set():
    test = colour_set("test", 2, seed=2)
    return EvalSet("target", test, list(COLOURS))


def test_readers_score_what_the_vlm_answers(bundle, monkeypatch):
    """The readers with a stand-in VLM that answers right, wrong, or right for half."""
    monkeypatch.setenv("LORSU_EVAL_THREADS", "1")  # (two threads would not ask the stand-in)
    target = target_set()
    truth = dict(vqa.mc_questions(target))
    labels = [i.label for i in target.images.items]

    def right(bundle, images, questions, max_new_tokens):
        if questions[0] in truth:
            return [truth[q] + "." for q in questions]
        return [f"this is a {labels[i]}" for i in range(len(questions))]

    monkeypatch.setattr(vqa, "generate_answers", right)
    assert accuracy(bundle, target, "mc") == 100.0
    monkeypatch.setattr(vqa, "generate_answers", lambda b, im, q, n: ["F"] * len(q))
    assert accuracy(bundle, target, "mc") == 0.0
    prompts = []

    def half(bundle, images, questions, max_new_tokens):
        prompts.extend(questions)
        start = len(prompts) - len(questions)
        return [
            labels[start + i] if (start + i) % 2 == 0 else "nothing" for i in range(len(questions))
        ]

    monkeypatch.setattr(vqa, "generate_answers", half)
    assert accuracy(bundle, target, "open") == 50.0
    assert prompts[0] == vqa.PPL_PROMPT.format(question=vqa.DEFAULT_QUESTION)


def test_another_draw_of_distractors_asks_other_questions(bundle, monkeypatch):
    """`seed` reaches the questions: a stand-in that knows the default draw's answers is right
    on every question of that draw and not on another draw's."""
    monkeypatch.setenv("LORSU_EVAL_THREADS", "1")
    target = target_set()
    truth = dict(vqa.mc_questions(target))
    asked = []

    def by_heart(bundle, images, questions, max_new_tokens):
        asked.extend(questions)
        return [truth.get(q, "F") for q in questions]

    monkeypatch.setattr(vqa, "generate_answers", by_heart)
    assert vqa.mc_accuracy(bundle, target) == vqa.mc_accuracy(bundle, target, seed=0) == 100.0
    assert asked[: len(truth)] == list(truth)
    assert vqa.mc_accuracy(bundle, target, seed=1) < 100.0
    assert asked[-len(truth) :] == [q for q, _ in vqa.mc_questions(target, 1)] != list(truth)


def test_readers_run_end_to_end_on_the_tiny_vlm(bundle):
    target = target_set()
    first = {r: accuracy(bundle, target, r) for r in ("mc", "open")}
    assert all(0 <= v <= 100 for v in first.values())
    assert first == {r: accuracy(bundle, target, r) for r in ("mc", "open")}  # greedy, seeded


def test_answers_do_not_depend_on_how_many_are_asked_at_once(bundle):
    """The readers batch their questions (left-padded, masked): the same answers one at a
    time, eight at a time or all at once, for questions of different lengths."""
    images = [item.image for item in colour_set("mixed", 6, seed=5).items]
    questions = [vqa.mc_questions(target_set())[0][0], vqa.DEFAULT_QUESTION] * (len(images) // 2)
    alone = vqa._generate(bundle, images, questions, vqa.MC_MAX_NEW_TOKENS, batch_size=1)
    assert len(set(alone)) > 1  # the answers differ, so a mix-up would show
    for size in (8, len(images)):
        assert vqa._generate(bundle, images, questions, vqa.MC_MAX_NEW_TOKENS, size) == alone


def test_cli_eval_mc(colour_folder, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--model", "tiny-random", "--data", str(colour_folder), "--shots", "2"]
    argv += ["--epochs", "1", "--eval", "mc", "--out", str(out), "--json"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert 0 <= summary["sessions"][0]["target_acc"] <= 100
    history = History.load(out / HISTORY_FILE)
    assert history.sessions[0].extra["reader"] == "mc"


def test_answers_on_two_threads_are_the_answers_on_one(bundle, monkeypatch):
    """The readers share their batches between two threads where a core is free: each batch
    is generated as it would be alone, in the same order."""
    images = [item.image for item in colour_set("mixed", 6, seed=5).items]
    questions = [vqa.mc_questions(target_set())[0][0], vqa.DEFAULT_QUESTION] * (len(images) // 2)
    monkeypatch.setenv("LORSU_EVAL_THREADS", "1")
    one = vqa._generate(bundle, images, questions, vqa.MC_MAX_NEW_TOKENS, batch_size=5)
    assert len(set(one)) > 1
    monkeypatch.setenv("LORSU_EVAL_THREADS", "2")
    called = []
    real = vqa.generate_tokens
    monkeypatch.setattr(
        vqa, "generate_tokens", lambda *a: called.append(threading.current_thread()) or real(*a)
    )
    assert vqa._generate(bundle, images, questions, vqa.MC_MAX_NEW_TOKENS, batch_size=5) == one
    assert len(called) == 5 and threading.main_thread() not in called  # on the pool's threads
