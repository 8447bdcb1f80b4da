"""Real-LLaVA usage from local folders, the way a cluster user without hub access works: a
LLaVA and a CLIP saved in the Hugging Face layout (`save_pretrained`, with the processor, the
tokenizers and the chat template), loaded with `--model DIR --clip DIR` (or LORSU_CLIP) by
every command, trained, exported and reloaded. A CLIP that is not the LLaVA's tower is refused
with a message."""

import json

import pytest
import torch

from lorsu_demo import cli
from lorsu_demo.delta import applied
from lorsu_demo.history import History
from lorsu_demo.model import BundleError, load_bundle
from lorsu_demo.tiny import build_image_processor, build_tiny_random
from lorsu_demo.ui.cli import add_arguments
from lorsu_demo.ui.engine import load_model

TRAIN = ["--sessions", "1", "--shots", "3", "--epochs", "1", "--batch-size", "4", "--lr", "1e-2"]


def save_pair(root, seed=0):
    """A LLaVA folder and a CLIP folder as `save_pretrained` writes them (the hub's layout)."""
    # the chat model's word-level tokenizer learns the class names of the colour folder
    words = ["red", "green", "blue", "yellow"]
    clip, vlm, clip_tokenizer, processor = build_tiny_random(seed=seed, words=words)
    llava_dir, clip_dir = root / "llava", root / "clip"
    vlm.save_pretrained(llava_dir)
    processor.save_pretrained(llava_dir)  # image processor, tokenizer, chat template
    clip.save_pretrained(clip_dir)
    clip_tokenizer.save_pretrained(clip_dir)
    build_image_processor(vlm.config.vision_config.image_size).save_pretrained(clip_dir)
    return llava_dir, clip_dir


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub-layout")
    llava_dir, clip_dir = save_pair(root)
    _, other_clip = save_pair(root / "other", seed=1)
    return llava_dir, clip_dir, other_clip


def vision_weights(bundle):
    return {k: v.detach().clone() for k, v in bundle.vision_state().items()}


def test_the_folders_are_in_the_hub_layout(folders):
    llava_dir, clip_dir, _ = folders
    assert (llava_dir / "config.json").exists() and (clip_dir / "config.json").exists()
    assert list(llava_dir.glob("*.safetensors")) and list(clip_dir.glob("*.safetensors"))
    saved = json.loads((llava_dir / "processor_config.json").read_text())
    chat_template = (llava_dir / "chat_template.jinja").exists() or "chat_template" in saved
    assert chat_template and (llava_dir / "tokenizer.json").exists()


def test_train_export_reload_from_local_folders(folders, colour_folder, tmp_path, capsys):
    llava_dir, clip_dir, _ = folders
    out = tmp_path / "run"
    argv = ["train", "--model", str(llava_dir), "--clip", str(clip_dir)]
    code = cli.main([*argv, "--data", str(colour_folder), "--out", str(out), *TRAIN, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out)
    assert len(summary["sessions"]) == 1
    history = History.load(out / "history.lorsu")
    assert history.model["clip"] == str(clip_dir)

    # export finds the CLIP the run recorded; an explicit --model/--clip works the same
    for extra, name in (([], "recorded"), (["--model", str(llava_dir), "--clip", str(clip_dir)], "given")):  # fmt: skip
        exported = tmp_path / f"model-{name}"
        code = cli.main(["export", "--run", str(out), "--session", "1", "--out", str(exported), *extra])  # fmt: skip
        assert code == 0, capsys.readouterr().err

        base = load_bundle(str(llava_dir), clip=str(clip_dir))
        with applied(base.vision_state(), history.deltas(1)):
            expected = vision_weights(base)
        reloaded = vision_weights(load_bundle(str(exported)))
        assert expected.keys() == reloaded.keys()
        assert all(torch.equal(expected[k], reloaded[k]) for k in expected)
        # and the session changed something, so the comparison could have failed
        untouched = vision_weights(base)
        assert any(not torch.equal(expected[k], untouched[k]) for k in expected)


def test_lorsu_clip_stands_in_for_the_flag(folders, colour_folder, tmp_path, monkeypatch, capsys):
    llava_dir, clip_dir, _ = folders
    monkeypatch.setenv("LORSU_CLIP", str(clip_dir))
    out = tmp_path / "run-env"
    code = cli.main(
        [
            "train",
            "--model",
            str(llava_dir),
            "--data",
            str(colour_folder),
            "--out",
            str(out),
            *TRAIN,
        ]
    )
    assert code == 0, capsys.readouterr().err
    # the app's options take --clip as well, and its loader passes it on
    args = add_arguments_parser().parse_args(["--model", str(llava_dir), "--clip", str(clip_dir)])
    monkeypatch.delenv("LORSU_CLIP")
    bundle, notice = load_model(args.model, device="cpu", clip=args.clip)
    assert notice is None and bundle.source["clip"] == str(clip_dir)


def add_arguments_parser():
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser


def test_a_clip_that_is_not_the_llavas_tower_is_refused(folders, colour_folder, tmp_path, capsys):
    llava_dir, _, other_clip = folders
    with pytest.raises(BundleError, match="is not this VLM's vision encoder"):
        load_bundle(str(llava_dir), clip=str(other_clip))
    out = tmp_path / "run-wrong"
    argv = ["train", "--model", str(llava_dir), "--clip", str(other_clip)]
    code = cli.main([*argv, "--data", str(colour_folder), "--out", str(out), *TRAIN])
    err = capsys.readouterr().err
    assert code == 2 and "relative difference" in err and "--clip" in err
    assert "Traceback" not in err


def test_a_llava_folder_without_clip_says_to_pass_it(folders, colour_folder, tmp_path, capsys):
    llava_dir, _, _ = folders
    argv = ["train", "--model", str(llava_dir), "--data", str(colour_folder)]
    code = cli.main([*argv, "--out", str(tmp_path / "run-none"), *TRAIN])
    err = capsys.readouterr().err
    assert code == 2 and "pass --clip (or LORSU_CLIP)" in err


def test_every_command_with_model_takes_clip():
    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name, sub in commands.items():
        options = {o for action in sub._actions for o in action.option_strings}
        if "--model" in options:
            assert "--clip" in options, name
