"""The committed toy world in assets/: the `toy` preset loads, knows its world, learns a domain,
and the recipe that made it runs end to end (at a tiny scale here; the real run takes minutes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lorsu_demo import cli
from lorsu_demo.chat import answer
from lorsu_demo.data import Item, LabelledImages, load_folder, normalise, to_unit_pixels
from lorsu_demo.evaluate import EvalSet, accuracy, clip_predictions
from lorsu_demo.model import load_bundle
from lorsu_demo.runs import control_sets
from lorsu_demo.toyworld import data, transfer
from lorsu_demo.toyworld import train as recipe
from lorsu_demo.toyworld.data import (
    BASE_CLASSES,
    BASE_FIGURES,
    BASE_LOOKS,
    DOMAINS,
    base_looks_dataset,
    control_dataset,
    domain_dataset,
    letters_dataset,
)

ASSETS = Path(__file__).resolve().parents[1] / "assets"
TEMPLATE = "a photo of a {label}."


@pytest.fixture(scope="module")
def toy():
    return load_bundle("toy")


def domain_test_set(name: str) -> EvalSet:
    images = load_folder(ASSETS / "domains" / name / "test", name=name)
    return EvalSet(name, images, DOMAINS[name].classes, [TEMPLATE])


def test_toy_preset_loads_from_assets_with_one_vision_tower(toy):
    assert type(toy.vlm).__name__ == "LlavaForConditionalGeneration"
    assert type(toy.clip).__name__ == "CLIPModel"
    assert toy.clip.vision_model is toy.vlm.model.vision_tower
    assert toy.device.type == "cpu" and toy.dtype == torch.float32
    assert Path(toy.control_dir) == (ASSETS / "control").resolve()
    assert toy.defaults["lr"] > 0 and toy.defaults["epochs"] >= 1


def test_assets_fit_the_size_budget():
    total = sum(f.stat().st_size for f in ASSETS.rglob("*") if f.is_file())
    assert total <= 25 * 2**20, f"assets/ holds {total / 2**20:.1f} MB"


@pytest.mark.parametrize("name", list(DOMAINS))
def test_domain_packs_are_complete_and_documented(name):
    root = ASSETS / "domains" / name
    readme = (root / "README.md").read_text()
    assert "Caption template" in readme and "Licence" in readme
    for split in ("train", "test"):
        assert sorted(p.name for p in (root / split).iterdir()) == sorted(DOMAINS[name].classes)
        for c in DOMAINS[name].classes:
            assert len(list((root / split / c).glob("*.png"))) >= 5
    assert f"domains/{name}" in (ASSETS / "LICENSES.md").read_text()


@pytest.mark.parametrize("name", list(DOMAINS))
def test_committed_images_are_what_the_recipe_generates(name):
    expected, labels = domain_dataset(name, "test", 2, seed=0)
    for c, cls in enumerate(DOMAINS[name].classes):
        files = sorted((ASSETS / "domains" / name / "test" / cls).glob("*.png"))[:2]
        on_disk = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
        assert np.array_equal(on_disk, expected[labels == c])
    control, control_labels = control_dataset(1, seed=0)
    first = sorted((ASSETS / "control" / BASE_CLASSES[0]).glob("*.png"))[0]
    assert np.array_equal(np.asarray(Image.open(first).convert("RGB")), control[0])
    assert control_labels[0] == 0


def test_base_model_knows_the_control_and_not_the_domains(toy):
    """Issue 9: the control at 90 or more and every domain at 50 or less, under CLIP and under
    the chat model's multiple choice. Seven-segment starts at 57.0 under multiple choice: no
    harder display kept the chat's share of CLIP's gain (docs/toyworld.md, "Harder domains")."""
    (control,) = control_sets(toy, None)
    over_the_issue = {("seven-segment", "mc"): 57.0}
    for reader in ("clip", "mc"):
        assert accuracy(toy, control, reader) >= 90.0, reader
        for name in DOMAINS:
            limit = over_the_issue.get((name, reader), 50.0)
            assert accuracy(toy, domain_test_set(name), reader) <= limit, (name, reader)


def with_shuffled_labels(eval_set: EvalSet, seed: int) -> EvalSet:
    items = eval_set.images.items
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed))
    labels = [items[i].label for i in order.tolist()]
    shuffled = LabelledImages("shuffled", [Item(i.image, y) for i, y in zip(items, labels)])
    return EvalSet("shuffled", shuffled, eval_set.classes)


def test_the_read_layer_reading_knows_the_control_and_not_shuffled_labels(toy):
    """`toyworld.transfer`'s reading of the tokens LLaVA reads: the read-layer loss made them a
    CLIP embedding of the base world, so they know the control set; with the labels shuffled
    among the images the same reading falls towards chance."""
    from lorsu_demo.toyworld.transfer import read_layer_accuracy

    (control,) = control_sets(toy, None)
    assert read_layer_accuracy(toy, control) >= 90.0
    assert read_layer_accuracy(toy, with_shuffled_labels(control, seed=0)) <= 20.0


def test_the_read_layer_among_the_chat_options_is_never_below_its_reading_among_all(toy):
    """`toyworld.transfer`'s "read layer 5-way": the read layer's zero-shot choice among the five
    options the chat is offered. The right class that wins among all classes wins among five, so
    it is at least the plain reading; on the control set both know every class, and with the
    labels shuffled the five-way reading falls towards its chance (20%)."""
    from lorsu_demo.toyworld.transfer import read_layer_accuracy, read_layer_option_accuracy

    target = domain_test_set("seven-segment")
    five_way, all_way = read_layer_option_accuracy(toy, target), read_layer_accuracy(toy, target)
    assert five_way >= all_way and five_way > all_way + 5.0  # five options are easier than ten
    (control,) = control_sets(toy, None)
    assert read_layer_option_accuracy(toy, control) >= 90.0
    assert read_layer_option_accuracy(toy, with_shuffled_labels(control, seed=1)) <= 35.0


def test_the_third_stage_can_label_with_the_read_layer_guess(toy):
    """`--mimic-reader read` labels stage 3's samples with the read layer's guess: the same
    reading as `toyworld.transfer`'s, from the same forward as the tokens the LLM is given."""
    from lorsu_demo.toyworld.transfer import read_layer_embedding

    vision, projection = toy.clip.vision_model, toy.clip.visual_projection
    text = recipe.class_text_embeddings(toy.clip, toy.clip_tokenizer)
    images, _ = domain_dataset("sketches", "test", 3, 0)
    pixels = recipe.to_pixels(images)
    with torch.no_grad():
        feats, by_clip = recipe.read_features_and_scores(vision, projection, text, pixels)
        same, by_read = recipe.read_features_and_scores(vision, projection, text, pixels, "read")
        out = vision(pixel_values=recipe.normalize(pixels), output_hidden_states=True)
        expected = read_layer_embedding(toy.clip, out.hidden_states) @ text.T
    assert torch.equal(feats, same)
    torch.testing.assert_close(by_read, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(by_read, by_clip)  # two readings, not one under two names


def test_a_seeded_session_teaches_the_chat_model_not_just_clip(tmp_path, capsys):
    """The app's promise: what a session teaches the encoder reaches the chat model's answers.
    seven-segment is the domain where the first toy world's chat moved by +0.5 only, and the
    second's by +13.5 (before the LLM learnt to answer what CLIP says)."""
    cli.main(
        ["train", "--data", str(ASSETS / "domains" / "seven-segment"), "--sessions", "1"]
        + ["--shots", "5", "--seed", "0", "--eval", "mc", "--out", str(tmp_path / "run")]
        + ["--json"]
    )
    run = json.loads(capsys.readouterr().out)
    (session,) = run["sessions"]
    assert run["base"]["control_acc"] >= 90.0
    assert session["ti"] >= 15.0, session  # multiple-choice points, chance is 20
    assert session["cc"] >= -3.0, session


def test_the_committed_world_passes_the_recipes_own_transfer_check():
    """On every example domain the chat takes up at least half of what one default session
    teaches CLIP (0.65, 0.57 and 0.85 when written): a change to the engine's sessions or to the
    chat's reading that loses that would make the recipe refuse the world it ships."""
    assert recipe.transfer_problems(ASSETS, 0.5, 5, log=lambda message: None) == []


def test_the_chat_model_answers_what_clip_says_of_a_look_it_never_learnt(toy):
    """Recipe stage 3: on letters (no base class, a stream the recipe never drew), the chat's
    multiple choice picks CLIP's own guess. The LLM before stage 3 agreed on 51.5% of these;
    the shipped one on 84.8%."""
    images, _ = letters_dataset(3, seed=0, split="check")
    items = [Item(Image.fromarray(x), BASE_CLASSES[0]) for x in images]
    unlabelled = EvalSet("letters", LabelledImages("letters", items), BASE_CLASSES, [TEMPLATE])
    guesses = clip_predictions(toy, unlabelled).tolist()
    as_clip_says = LabelledImages(
        "letters", [Item(i.image, BASE_CLASSES[g]) for i, g in zip(items, guesses)]
    )
    judged = EvalSet("letters", as_clip_says, BASE_CLASSES, [TEMPLATE])
    assert accuracy(toy, judged, "clip") == 100.0
    assert accuracy(toy, judged, "mc") >= 70.0


def test_the_recipe_trains_the_read_layer_with_the_clip_loss(toy):
    images = load_folder(ASSETS / "control")
    processor = toy.clip_image_processor
    pixels = to_unit_pixels([i.image for i in images.items[::20]], processor)
    labels = [i.label for i in images.items[::20]]
    with torch.no_grad():
        out = toy.clip.vision_model(
            pixel_values=normalise(pixels, processor), output_hidden_states=True
        )
        read = recipe.read_layer_embedding(toy.clip, out.hidden_states)
        texts = toy.text_features([TEMPLATE.format(label=c) for c in BASE_CLASSES])
    # the mean of the patch tokens LLaVA reads is itself a CLIP embedding of the class
    predicted = [BASE_CLASSES[k] for k in (read @ texts.T).argmax(1).tolist()]
    assert np.mean([p == y for p, y in zip(predicted, labels)]) >= 0.9


@pytest.mark.parametrize("name", ["handwritten", "sketches"])
def test_a_seeded_lorsu_session_learns_without_forgetting(name, tmp_path, capsys):
    """The two domains whose sessions cost CLIP's control 5.6 and 4.4 points with the
    2,500-step encoder: issue 9 asks TI of at least 15 with CC of at least -3."""
    cli.main(
        ["train", "--data", str(ASSETS / "domains" / name), "--sessions", "1"]
        + ["--shots", "5", "--seed", "0", "--out", str(tmp_path / "run"), "--json"]
    )
    run = json.loads(capsys.readouterr().out)
    (session,) = run["sessions"]
    assert run["model"]["model"] == "toy" and session["method"] == "lorsu"
    assert session["ti"] >= 15.0, session
    assert session["cc"] >= -3.0, session


def test_chat_answers_control_images_with_the_right_words(toy):
    control = load_folder(ASSETS / "control")
    items = [next(i for i in control.items if i.label == c) for c in ("three", "star")]
    for item, other in zip(items, ("seven", "heart")):
        reply = answer(toy, item.image, "What is in the image?").lower()
        assert item.label in reply.replace(".", " ").split(), reply
        assert answer(toy, item.image, f"Is this a {item.label}?").lower().strip(" .") == "yes"
        assert answer(toy, item.image, f"Is this a {other}?").lower().strip(" .") == "no"


def test_chat_multiple_choice_reads_the_control_set(toy):
    control = load_folder(ASSETS / "control")
    per_class = {}
    for item in control.items:
        per_class.setdefault(item.label, []).append(item)
    small = LabelledImages("control", [i for items in per_class.values() for i in items[:2]])
    assert accuracy(toy, EvalSet("control", small, BASE_CLASSES, [TEMPLATE]), "mc") >= 90.0


def tiny_recipe(out: Path, *args: str) -> None:
    """The recipe at a tiny scale, every stage in two steps (later `args` override these)."""
    tiny = ["--clip-images", "2", "--clip-letters", "1", "--clip-steps", "2", "--llm-images", "2"]
    tiny += ["--min-share", "0", "--share-draws", "1"]
    tiny += ["--llm-steps", "2", "--mimic-steps", "2", "--mimic-sessions", "1"]
    tiny += ["--mimic-letters", "1", "--threads", "1", "--domain-images", "3", "2"]
    recipe.main(["--out", str(out), *tiny, "--vision-layers", "2", *args])


def test_the_recipe_runs_end_to_end_at_a_tiny_scale(tmp_path, capsys):
    with pytest.raises(SystemExit) as failed:
        tiny_recipe(
            tmp_path,
            *["--llm-more-steps", "2", "--llm-more-rounds", "2", "--domain-images", "5", "2"],
            *["--mimic-method-sessions", "1", "--mimic-look-sessions", "2"],
            *["--vision-layers", "3", "--mimic-look-figures", "mosaic,angular"],
            *["--min-share", "0.5"],
        )
    # Two steps teach the LLM nothing: the stage goes on for its two more rounds, and the
    # finished world, written all the same, fails its check on the control set.
    assert failed.value.code == 1
    out, err = capsys.readouterr()
    assert "round 2 of the LLM stage" in out and "round 3" not in out
    assert "control set's multiple-choice questions" in err and "--train-seed" in err
    # ... and one session on each example domain, read by CLIP and the chat, judges it too.
    for name in DOMAINS:
        assert f"one default session on {name}: CLIP TI" in out
    written = load_bundle(str(tmp_path / "toy"))
    assert written.clip.vision_model is written.vlm.model.vision_tower
    assert len(written.clip.vision_model.encoder.layers) == 3  # not the shipped depth, 4
    description = json.loads((tmp_path / "toy" / "bundle.json").read_text())["description"]
    assert "patch 8, 3 layers" in description
    assert sorted(p.name for p in (tmp_path / "domains").iterdir()) == sorted(DOMAINS)
    assert written.processor.tokenizer.get_vocab() == written.clip_tokenizer.get_vocab()


def test_the_training_seed_changes_the_weights_and_not_the_images(tmp_path):
    for name, extra in (
        ("default", []),
        ("same", ["--train-seed", "0"]),
        ("other", ["--train-seed", "1"]),
    ):
        tiny_recipe(
            tmp_path / name, "--seed", "0", "--llm-more-rounds", "0", "--min-control", "0", *extra
        )

    def files(name, under):
        root = tmp_path / name / under
        return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    for under in ("control", "domains", "toy/clip", "toy/vlm"):
        assert files("same", under) == files("default", under)
    for under in ("control", "domains"):
        assert files("other", under) == files("default", under)
    for tower in ("clip", "vlm"):
        weights = Path("toy") / tower / "model.safetensors"
        assert (tmp_path / "other" / weights).read_bytes() != (
            tmp_path / "default" / weights
        ).read_bytes()

    def rebuild(name):
        description = json.loads((tmp_path / name / "toy" / "bundle.json").read_text())[
            "description"
        ]
        return description.split("Rebuild with ")[1]

    assert rebuild("default") == "`python -m lorsu_demo.toyworld.train --out assets --seed 0`."
    assert "--seed 0 --train-seed 1`" in rebuild("other")


def test_a_stage_that_learnt_every_question_gets_no_more_rounds(tmp_path, monkeypatch):
    stages = []

    def learnt_everything(*args, **kwargs):
        stages.append(kwargs["steps"])
        recipe_train_llm(*args, **kwargs)
        return {"mc": 1.0, "open": 1.0, "yes/no": 1.0}

    recipe_train_llm = recipe.train_llm
    monkeypatch.setattr(recipe, "train_llm", learnt_everything)
    tiny_recipe(tmp_path, "--llm-steps", "3", "--llm-more-steps", "5", "--min-control", "0")
    assert stages == [3, 2]  # the LLM stage and the third, no round of 5 steps between


def test_a_clip_only_build_has_no_llm_stage_to_judge(tmp_path, capsys):
    tiny_recipe(tmp_path, "--llm-steps", "0", "--mimic-steps", "0", "--min-control", "0")
    assert "round" not in capsys.readouterr().out
    assert (tmp_path / "toy" / "clip" / "model.safetensors").exists()


def test_a_standin_curriculum_starts_the_llm_stage_on_words_alone(tmp_path, monkeypatch):
    shares = []

    def recording(vlm, feats, input_ids, attention_mask, image_override=None):
        if image_override is not None:  # a training step, not a progress line
            shares.append((~image_override.isnan()).all(-1).all(-1).float().mean().item())
        return recipe_logits(vlm, feats, input_ids, attention_mask, image_override)

    recipe_logits = recipe.llava_logits_from_features
    monkeypatch.setattr(recipe, "llava_logits_from_features", recording)
    common = ["--llm-steps", "4", "--mimic-steps", "0", "--llm-more-rounds", "0"]
    tiny_recipe(tmp_path / "plain", *common, "--min-control", "0")
    plain, shares[:] = list(shares), []
    tiny_recipe(tmp_path / "words", *common, "--min-control", "0", "--llm-standin-start", "1")
    assert len(plain) == len(shares) == 4
    # 64 samples a step; the share of stand-ins falls 1.0, 0.65, 0.3, 0.3 instead of 0.3 throughout
    assert plain[0] < 0.6 and shares[0] == 1.0 and 0.4 < shares[1] < 1.0
    assert shares[2] < 0.6 and shares[3] < 0.6


def test_a_world_whose_chat_does_not_follow_a_session_is_not_shipped(tmp_path, monkeypatch, capsys):
    shares = {"handwritten": (30.0, 20.0), "seven-segment": (40.0, 24.0), "sketches": (25.6, 0.9)}
    read = []

    def measured(model, data, draws=0):
        clip_gain, chat_gain = shares[Path(data).name]
        read.append((model, Path(data).name, draws))
        return {"target_gain": {"clip": clip_gain}, "mc_draws": {"gain_mean": chat_gain}}

    monkeypatch.setattr(transfer, "measure", measured)
    problems = recipe.transfer_problems(tmp_path, 0.5, 3, log=lambda message: None)
    assert len(problems) == 1 and "sketches" in problems[0] and "+0.9" in problems[0]
    assert read == [(str(tmp_path / "toy"), name, 3) for name in DOMAINS]
    assert recipe.transfer_problems(tmp_path, 0.03, 3, log=lambda message: None) == []
    shares["sketches"] = (0.0, 0.0)  # CLIP learnt nothing: no share to take up
    assert len(recipe.transfer_problems(tmp_path, 0.03, 3, log=lambda message: None)) == 1

    with pytest.raises(SystemExit) as failed:  # the recipe says so, after writing the world
        tiny_recipe(tmp_path, "--llm-more-rounds", "0", "--min-control", "0", "--min-share", "0.5")
    assert failed.value.code == 1
    err = capsys.readouterr().err
    assert "a session on sketches moves its chat's multiple choice by +0.0" in err
    assert "handwritten" not in err and (tmp_path / "toy" / "vlm").is_dir()


def test_option_distillation_is_least_when_the_letters_follow_the_readers_softmax():
    """`--mimic-soft`: a ranked question's answer letter is trained towards the reader's softmax
    over its options; rows without options (true labels) take no part."""
    letters = torch.tensor([15, 66, 67, 68, 69])
    scores = torch.zeros(2, len(BASE_CLASSES))
    options = ["one", "seven", "two"]
    scores[0, [BASE_CLASSES.index(c) for c in options]] = torch.tensor([0.30, 0.32, 0.25])
    asked = [("q", "B", options), ("q", "A", None)]
    labels = torch.full((2, 4), -100)
    labels[:, 2] = 15
    target = torch.softmax(100 * torch.tensor([0.30, 0.32, 0.25]), 0)
    following = torch.full((2, 4, 80), -30.0)
    following[0, 1, letters[:3]] = target.log()
    loss = recipe.option_distillation_loss(following, labels, asked, scores, letters, 100.0)
    entropy = -(target * target.log()).sum()
    torch.testing.assert_close(loss, entropy, rtol=1e-4, atol=1e-4)
    only_best = following.clone()
    only_best[0, 1, letters[:3]] = torch.tensor([-30.0, 0.0, -30.0])
    assert recipe.option_distillation_loss(only_best, labels, asked, scores, letters, 100.0) > (
        loss + 0.1
    )


def test_the_recipe_refuses_to_distil_options_without_ranked_questions(tmp_path, capsys):
    with pytest.raises(SystemExit):
        recipe.main(["--out", str(tmp_path), "--mimic-soft", "1"])
    assert "--mimic-ranked" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_base_looks_draw_every_base_class_in_each_new_look_and_no_domain_look():
    """Stage 3's look sessions teach base classes in the letters' looks; not in "outline", which
    for shapes is the sketches domain's look, and not in the base world's own printed look."""
    assert "outline" not in BASE_LOOKS and "printed" not in BASE_LOOKS
    images, labels, looks, figures = base_looks_dataset(2, seed=0, split="check")
    assert set(figures.tolist()) == {BASE_FIGURES.index("strokes")}
    assert images.shape == (len(BASE_LOOKS) * len(BASE_CLASSES) * 2, 32, 32, 3)
    for j in range(len(BASE_LOOKS)):
        assert np.bincount(labels[looks == j], minlength=len(BASE_CLASSES)).tolist() == [2] * 18
    brightness = {look: images[looks == j].mean() for j, look in enumerate(BASE_LOOKS)}
    # inverted is light ink on a dark ground; low-res keeps the base world's light ground
    assert brightness["inverted"] < 110 < brightness["low-res"]
    again, *_ = base_looks_dataset(2, seed=0, split="check")
    assert np.array_equal(images, again)


def test_base_looks_draw_new_figures_of_the_base_classes_too():
    """Look sessions can also draw a known class as a new figure, as the seven-segment domain's
    digits are: lit on a grid of cells, or (digits) straightened into a few segments."""
    images, labels, looks, figures = base_looks_dataset(
        2, seed=0, split="check", figures=("strokes", "mosaic", "angular")
    )
    strokes, *_ = base_looks_dataset(2, seed=0, split="check")
    per_figure = len(BASE_LOOKS) * len(BASE_CLASSES) * 2
    assert images.shape[0] == 3 * per_figure
    assert np.array_equal(images[:per_figure], strokes)  # strokes are drawn as they were
    assert np.bincount(figures).tolist() == [per_figure] * 3
    shapes = np.isin(labels, [BASE_CLASSES.index(s) for s in BASE_CLASSES[10:]])
    digits = ~shapes
    mosaic, angular = (figures == BASE_FIGURES.index(f) for f in ("mosaic", "angular"))
    assert (images[mosaic] != images[:per_figure]).any(axis=(1, 2, 3)).all()
    assert (images[angular & digits] != images[:per_figure][digits[:per_figure]]).any()

    rng = np.random.default_rng(3)
    full = Image.new("L", (128, 128), 255)
    empty = Image.new("L", (128, 128), 0)
    assert (np.asarray(data._mosaic(full, rng)) == 255).any()
    assert not (np.asarray(data._mosaic(empty, rng)) == 255).any()  # unlit cells only glow

    loop = np.stack(
        [
            np.cos(np.linspace(0, 6.283185307179586, 40)),
            np.sin(np.linspace(0, 6.283185307179586, 40)),
        ],
        1,
    )
    loop[-1] = loop[0]
    corners = data._straightened(loop, 0.3)
    assert len(corners) >= 6 and np.allclose(corners[[0, -1]], loop[[0, -1]])
    line = np.array([[0.0, 0.0], [0.5, 0.0], [1.0, 0.0]])
    assert len(data._straightened(line, 0.3)) == 4  # about 0.3 apart, both ends kept


def test_angular_leaves_shapes_as_they_are():
    for look in BASE_LOOKS:
        a = data.render_base_in_look("star", np.random.default_rng(5), look, "angular")
        b = data.render_base_in_look("star", np.random.default_rng(5), look, "strokes")
        assert np.array_equal(a, b)


def test_the_recipe_refuses_unknown_look_figures(tmp_path, capsys):
    with pytest.raises(SystemExit):
        recipe.main(["--out", str(tmp_path), "--mimic-look-figures", "mosaic,neon"])
    assert "--mimic-look-figures" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_ranked_questions_are_answered_with_what_clip_ranks_first_among_the_options():
    import random
    import re

    from lorsu_demo.vqa import display_name

    scores = torch.randn(len(BASE_CLASSES), generator=torch.Generator().manual_seed(0))
    by_name = {display_name(c): float(s) for c, s in zip(BASE_CLASSES, scores)}
    guess = BASE_CLASSES[int(scores.argmax())]
    rng = random.Random(0)
    without_guess = 0
    for _ in range(200):
        question, letter, ranked = recipe.sample_ranked_qa(scores, rng, 1.0)
        assert ranked
        options = dict(re.findall(r"^([A-E])\. (.+)$", question, flags=re.M))
        assert 2 <= len(options) <= 5
        assert letter == max(options, key=lambda k: by_name[options[k]])
        without_guess += display_name(guess) not in options.values()
    assert without_guess > 50  # the options often leave out CLIP's overall guess

    plain, mixed = random.Random(1), random.Random(1)
    for _ in range(50):
        question, answer_, ranked = recipe.sample_ranked_qa(scores, mixed, 0.0)
        assert (question, answer_) == recipe.sample_qa(guess, plain) and not ranked


def test_the_recipe_names_what_decides_the_weights_last_bits(monkeypatch):
    """A reproduction must match these to give the same weights bit for bit (docs/toyworld.md)."""
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    line = recipe.arithmetic()
    assert torch.__version__ in line and torch.backends.cpu.get_cpu_capability() in line
    assert "MKL_CBWR=COMPATIBLE" in line and "ONEDNN_MAX_CPU_ISA=(unset)" in line
    assert f"{torch.get_num_threads()} threads" in line


def test_transfer_reads_the_chat_under_several_draws_of_distractors(toy):
    """`toyworld.transfer --mc-draws`: each draw asks other questions of the same images, the
    first is the one the app asks, and an empty delta gains nothing under any draw."""
    from lorsu_demo.delta import Delta
    from lorsu_demo.toyworld.transfer import mc_draws
    from lorsu_demo.vqa import mc_accuracy

    target = domain_test_set("sketches")
    drawn = mc_draws(toy, target, Delta(), draws=3)
    assert drawn["before"][0] == mc_accuracy(toy, target)
    assert drawn["gain"] == [0.0, 0.0, 0.0] and drawn["gain_sd"] == 0.0
    assert len(set(drawn["before"])) > 1  # other questions, other answers
    # draw 0 already read (as `measure` has it) is taken as given, not read again
    given = mc_draws(toy, target, Delta(), draws=3, first=(-1.0, 5.0))
    assert given["before"] == [-1.0, *drawn["before"][1:]] and given["gain"][0] == 6.0
    assert given["gain"][1:] == [0.0, 0.0]
