import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from lorsu_demo.cli import main
from lorsu_demo.delta import applied
from lorsu_demo.history import History
from lorsu_demo.model import load_bundle


@pytest.fixture(scope="module")
def run_dir(colour_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    args = [
        "train",
        "--model",
        "tiny-random",
        "--data",
        str(colour_folder),
        "--control",
        str(colour_folder / "test"),
        "--sessions",
        "2",
        "--shots",
        "3",
        "--epochs",
        "2",
        "--lr",
        "0.01",
        "--out",
        str(out),
        "--json",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "lorsu_demo", *args], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return out, json.loads(result.stdout), result.stderr


def test_train_prints_the_documented_json(run_dir, colour_folder):
    out, summary, stderr = run_dir
    assert set(summary) >= {"base", "sessions", "final", "accuracy_matrix"}
    assert set(summary["base"]) == {"target_acc", "control_acc"}
    assert [s["index"] for s in summary["sessions"]] == [1, 2]
    for session in summary["sessions"]:
        assert set(session) >= {
            "index",
            "classes",
            "target_acc",
            "control_acc",
            "ti",
            "cc",
            "selected_heads",
            "trainable_params",
            "delta_bytes",
            "seconds",
        }
        assert len(session["selected_heads"]) == 3 and all(
            len(h) == 2 for h in session["selected_heads"]
        )
        assert session["ti"] == pytest.approx(session["target_acc"] - summary["base"]["target_acc"])
        assert 0 <= session["target_acc"] <= 100
    assert sorted(c for s in summary["sessions"] for c in s["classes"]) == [
        "blue",
        "green",
        "red",
        "yellow",
    ]
    assert summary["final"]["ti"] == summary["sessions"][-1]["ti"]
    matrix = summary["accuracy_matrix"]
    assert len(matrix["rows"]) == 3 and f"{colour_folder.name}:s1" in matrix["sets"]
    assert "step" in stderr and "Done: session 2 saved" in stderr
    assert json.loads((out / "run.json").read_text()) == summary


def test_sessions_table(run_dir, capsys):
    out, summary, _ = run_dir
    assert main(["sessions", "--run", str(out)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["#", "method", "target"]
    assert len(table) == 3 and table[2].split()[1] == "lorsu"


def test_export_writes_the_model_after_a_session(run_dir, tmp_path):
    out, _, _ = run_dir
    history = History.load(out / "history.lorsu")
    for session in (0, 2):
        target = tmp_path / f"s{session}"
        assert (
            main(["export", "--run", str(out), "--session", str(session), "--out", str(target)])
            == 0
        )
        exported = LlavaForConditionalGeneration.from_pretrained(target)
        AutoProcessor.from_pretrained(target)
        bundle = load_bundle("tiny-random")
        with applied(bundle.vision_state(), history.deltas(session)):
            expected = bundle.vlm.state_dict()
            for key, value in exported.state_dict().items():
                assert torch.equal(value, expected[key]), key
        reloaded = load_bundle(str(target))
        assert reloaded.clip.vision_model is reloaded.vlm.model.vision_tower


def test_errors_are_one_clear_line(tmp_path, capsys):
    assert (
        main(
            [
                "train",
                "--model",
                "tiny-random",
                "--data",
                str(tmp_path / "nowhere"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error:") and "nowhere is not a folder" in err and "Traceback" not in err
    (tmp_path / "bad.lorsu").write_text("nope")
    assert main(["sessions", "--run", str(tmp_path / "bad.lorsu")]) == 2
    assert "not a lorsu-demo history file" in capsys.readouterr().err


def test_existing_run_is_not_overwritten(run_dir, colour_folder, capsys):
    out, _, _ = run_dir
    code = main(
        ["train", "--model", "tiny-random", "--data", str(colour_folder), "--out", str(out)]
    )
    assert code == 2 and "already holds a run" in capsys.readouterr().err


def test_template_without_label_is_refused(colour_folder, tmp_path, capsys):
    args = [
        "train",
        "--model",
        "tiny-random",
        "--data",
        str(colour_folder),
        "--out",
        str(tmp_path / "o"),
    ]
    assert main([*args, "--template", "a photo of a thing."]) == 2
    assert "must contain {label}" in capsys.readouterr().err


def test_train_json_reports_every_other_set_beside_cc(run_dir, colour_folder):
    _, summary, _ = run_dir
    first, second = summary["sessions"]
    name = colour_folder.name
    # Session 1 trained s1 (and measured s2 before its training: an "other" set then).
    assert set(first["others"]["sets"]) == {f"{name}:s2"}
    # Session 2 trained s2: s1 is now the other set, its change measured against the base.
    others = second["others"]
    assert set(others["sets"]) == {f"{name}:s1"}
    s1 = others["sets"][f"{name}:s1"]
    assert s1["change"] == pytest.approx(s1["now"] - s1["base"])
    matrix = summary["accuracy_matrix"]
    column = matrix["sets"].index(f"{name}:s1")
    assert s1["now"] == matrix["rows"][2][column] and s1["base"] == matrix["rows"][0][column]
    assert summary["final"]["worst_other"] == f"{name}:s1"
    assert summary["final"]["worst_other_change"] == s1["change"]


def test_dac_trains_its_iterations_and_says_epochs_do_not_apply(colour_folder, tmp_path, capsys):
    out = tmp_path / "dac"
    args = ["train", "--model", "tiny-random", "--data", str(colour_folder), "--method", "dac"]
    args += ["--shots", "2", "--epochs", "3", "--set", "iterations=2", "--set", "batch_size=4"]
    args += ["--set", "rank=4", "--set", "experts_per_image=2", "--set", "experts_per_batch=2"]
    args += ["--set", "experts_merged=1", "--set", "ago_columns=1", "--out", str(out), "--json"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "dac trains 2 iterations" in captured.err and "--epochs is not used" in captured.err
    history = History.load(out / "history.lorsu")
    assert len(history.sessions[0].curve) == 2  # steps, not 3 epochs
