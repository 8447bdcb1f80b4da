"""Comparing methods from one starting history, both readers, and the results to take away
(the command that repeats a session, the CSV and JSON tables), on tiny-random and CPU."""

import csv
import io
import json
import math
import shlex

import pytest
import torch
from conftest import changed_keys, snapshot_model
from conftest_ui import make_core

from lorsu_demo import takeaway
from lorsu_demo.cli import main
from lorsu_demo.compare import (
    Compared,
    MethodResult,
    MethodStart,
    parse_methods,
    parse_seeds,
    results_table,
    run_compare,
    summary_table,
)
from lorsu_demo.events import Done, Step
from lorsu_demo.history import History
from lorsu_demo.methods import MethodError, make_method
from lorsu_demo.session import run_session
from lorsu_demo.ui.core import history_file_before

FAST = {"batch_size": 4, "lr": 0.01, "epochs": 2}
ROW_KEYS = {"method", "ti", "cc", "ti_mc", "cc_mc", "trainable_params", "delta_bytes", "seconds"}


def one_session(bundle, history, train_set, target, control, method="lorsu", seed=0):
    events = run_session(
        bundle,
        history,
        make_method(method, **FAST),
        train_set,
        target=target,
        controls=[control],
        seed=seed,
    )
    return next(e for e in events if isinstance(e, Done)).record


def test_compare_trains_each_method_from_the_history_and_changes_nothing(
    bundle, train_set, eval_sets
):
    target, control = eval_sets
    history = History(model=dict(bundle.source))
    history.append(one_session(bundle, history, train_set, target, control))
    deltas_before = [s.delta for s in history.sessions]
    base_before = dict(history.base)
    weights = snapshot_model(bundle)
    events = list(
        run_compare(
            bundle,
            history,
            ["lorsu", "spu"],
            train_set,
            target=target,
            controls=[control],
            settings={"lorsu": FAST, "spu": FAST},
            seed=7,
            also="mc",
        )
    )
    # the history and the shared model are exactly as before
    assert len(history) == 1 and [s.delta for s in history.sessions] == deltas_before
    assert history.base == base_before
    assert not changed_keys(weights, bundle)
    starts = [e.method for e in events if isinstance(e, MethodStart)]
    results = [e for e in events if isinstance(e, MethodResult)]
    assert starts == ["lorsu", "spu"] and [r.method for r in results] == ["lorsu", "spu"]
    assert any(isinstance(e, Step) for e in events)
    assert not any(isinstance(e, Done) for e in events), "nothing to append reaches the caller"
    assert isinstance(events[-1], Compared) and [r["method"] for r in events[-1].results] == [
        "lorsu",
        "spu",
    ]
    for result in results:
        record = result.record
        assert record.index == 2 and record.method == result.method
        assert set(result.result) >= ROW_KEYS | {"ti_clip", "cc_clip"}
        assert result.result["ti"] == record.ti == result.result["ti_clip"]
        readings = record.extra["readings"]
        assert set(readings) == {"clip", "mc"}
        mc = readings["mc"]
        assert result.result["ti_mc"] == mc["ti"]
        # the chat reader's TI is its own accuracy difference, not CLIP's
        assert mc["ti"] == mc["accuracies"][target.name] - mc["base"][target.name]
    # a kept record follows the history exactly as a plain session does
    kept = results[0].record
    history.append(kept)
    assert history.deltas()[-1] is kept.delta
    # the same method from the same start and seed gives the same session
    again = list(
        run_compare(
            bundle,
            History(model=history.model, base=dict(base_before), sessions=history.sessions[:1]),
            ["lorsu"],
            train_set,
            target=target,
            controls=[control],
            settings={"lorsu": FAST},
            seed=7,
        )
    )
    record = next(e for e in again if isinstance(e, MethodResult)).record
    assert record.ti == kept.ti
    for name, patch in kept.delta.items():
        assert torch.equal(patch.values, record.delta[name].values)


def test_compare_refuses_unknown_methods_and_settings(bundle):
    with pytest.raises(MethodError, match="Unknown method 'lorsa'"):
        parse_methods("lorsu, lorsa")
    assert parse_methods(" lora,lorsu,lora ") == ["lora", "lorsu"]
    assert parse_methods(None) == ["lorsu", "lora", "spu", "full"]
    from lorsu_demo.compare import settings_per_method

    with pytest.raises(MethodError, match="has the setting 'rnak'"):
        settings_per_method(bundle, ["lorsu", "full"], {"rnak": 4})
    settings = settings_per_method(bundle, ["lorsu", "full"], {"rank": 4, "lr": 0.5})
    assert settings["lorsu"]["rank"] == 4 and "rank" not in settings["full"]
    assert settings["full"]["lr"] == 0.5


def cli_json(capsys, args):
    code = main(args)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def test_cli_compare_prints_the_results_of_each_method(colour_folder, capsys, tmp_path):
    common = ["--model", "tiny-random", "--data", str(colour_folder), "--shots", "3"]
    common += ["--control", str(colour_folder / "test"), "--seed", "4", "--lr", "0.01"]
    common += ["--epochs", "2", "--batch-size", "4"]
    out = cli_json(
        capsys,
        ["compare", *common, "--methods", "lorsu,lora,full", "--json", "--out", str(tmp_path)],
    )
    assert [r["method"] for r in out["results"]] == ["lorsu", "lora", "full"]
    assert out["seed"] == 4 and out["shots"] == 3 and out["also"] == "mc"
    for row in out["results"]:
        assert set(row) >= ROW_KEYS
        assert all(isinstance(row[k], (int, float)) for k in ROW_KEYS - {"method"})
    # a one-session `train` run with the same arguments is the compared lorsu session
    train = cli_json(capsys, ["train", *common, "--out", str(tmp_path / "train"), "--json"])
    lorsu = out["results"][0]
    assert train["sessions"][0]["ti"] == lorsu["ti"]
    trained = History.load(tmp_path / "train" / "history.lorsu").sessions[0].delta
    compared = History.load(tmp_path / "lorsu" / "history.lorsu").sessions[0].delta
    assert set(trained) == set(compared)
    assert all(torch.equal(trained[k].values, compared[k].values) for k in trained)
    # without --json: the same rows as a Markdown table
    lines = results_table(out["results"]).splitlines()
    assert lines[0].startswith("| method | TI clip | CC clip | TI mc | CC mc |")
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["lorsu", "lora", "full"]
    assert f"{lorsu['ti_mc']:+.1f}" in lines[2]
    # --out keeps every method's session as a history to continue
    kept = History.load(tmp_path / "full" / "history.lorsu")
    assert [s.method for s in kept.sessions] == ["full"]
    assert kept.sessions[0].extra["readings"]["mc"]["ti"] == out["results"][2]["ti_mc"]
    # mistakes are messages
    assert main(["compare", *common, "--methods", "lorsu,nope"]) == 2
    assert "Unknown method 'nope'" in capsys.readouterr().err


def test_seeds_are_read_as_ranges_and_lists_and_mistakes_are_messages():
    assert parse_seeds("0-4") == [0, 1, 2, 3, 4]
    assert parse_seeds("3, 0,7") == [3, 0, 7]
    assert parse_seeds("0-2,9") == [0, 1, 2, 9]
    for bad, says in [("x", "numbers"), ("4-1", "empty"), ("1,0-2", "twice"), ("", "numbers")]:
        with pytest.raises(MethodError, match=says):
            parse_seeds(bad)


def test_cli_compare_over_seeds_summarises_each_method(colour_folder, capsys, tmp_path):
    """`--seeds` is `--seed` run once per seed: each seed's comparison is the one `--seed S`
    gives, and the summary is their mean, sd, min and max."""
    common = ["--model", "tiny-random", "--data", str(colour_folder), "--shots", "3"]
    common += ["--control", str(colour_folder / "test"), "--lr", "0.01", "--model-seed", "4"]
    common += ["--epochs", "2", "--batch-size", "4", "--methods", "lorsu,full", "--json"]
    out = cli_json(capsys, ["compare", *common, "--seeds", "1,2", "--out", str(tmp_path)])
    assert out["seeds"] == [1, 2] and [run["seed"] for run in out["per_seed"]] == [1, 2]
    for run in out["per_seed"]:
        alone = cli_json(capsys, ["compare", *common, "--seed", str(run["seed"])])
        assert run["results"] == [
            {**r, "seconds": s["seconds"]} for r, s in zip(alone["results"], run["results"])
        ]
    lorsu = out["summary"][0]
    assert lorsu["method"] == "lorsu" and lorsu["seeds"] == 2
    # CLIP's reading, which differs between the two seeds' shots on tiny-random (the random
    # chat model's multiple choice stays where it was), so a summary that ignored a seed fails
    tis = [run["results"][0]["ti_clip"] for run in out["per_seed"]]
    assert tis[0] != tis[1]
    assert lorsu["ti_clip"]["mean"] == pytest.approx(sum(tis) / 2)
    assert lorsu["ti_clip"]["sd"] == pytest.approx(abs(tis[0] - tis[1]) / math.sqrt(2))
    assert (lorsu["ti_clip"]["min"], lorsu["ti_clip"]["max"]) == (min(tis), max(tis))
    assert set(out["summary"][1]) >= {"method", "ti_clip", "cc_clip", "ti_mc", "cc_mc"}
    # each seed's sessions are kept apart
    assert History.load(tmp_path / "seed-2" / "full" / "history.lorsu").sessions[0].method == "full"
    # the table a person reads
    lines = summary_table(out["summary"]).splitlines()
    assert lines[0].startswith("| method | seeds | TI clip | CC clip | TI mc | CC mc |")
    assert f"{lorsu['ti_clip']['mean']:+.1f} +- {lorsu['ti_clip']['sd']:.1f} " in lines[2]
    # one seed or several, not both
    assert main(["compare", *common, "--seed", "1", "--seeds", "1,2"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["compare", *common, "--seeds", "2-1"]) == 2
    assert "low-high" in capsys.readouterr().err


@pytest.fixture(scope="module")
def app_core(tmp_path_factory):
    return make_core(tmp_path_factory.mktemp("takeaway"))


def finish(events):
    last = None
    for event, live in events:
        last = (event, live)
    assert isinstance(last[0], Done), last[1].status
    return last[0].record


def test_the_copied_command_repeats_the_session_bit_for_bit(app_core, capsys, tmp_path):
    core = app_core
    key = "copy"
    fast = {"batch_size": 4, "lr": 0.01}
    first = finish(core.train(key, "colours", "lorsu", 3, 2, fast, seed=3, also="mc"))
    second = finish(core.train(key, "colours", "spu", 2, 1, fast, also=None))
    assert first.extra["user_seed"] == 3 and second.extra["user_seed"] == 2  # blank: index
    # both readers are in the record of a session that asked for them
    assert set(first.extra["readings"]) == {"clip", "mc"}
    assert "readings" not in second.extra
    history = core.workspace(key).history
    for record in (first, second):
        command = record.extra["command"]
        assert command.startswith("python -m lorsu_demo train --model tiny-random")
        assert f"--seed {record.extra['user_seed']}" in command
        args = shlex.split(command)[3:]
        out = tmp_path / f"run{record.index}"
        args[args.index("--out") + 1] = str(out)
        if record.index > 1:
            start = args.index("--start-from") + 1
            assert args[start] == history_file_before(record.index)
            path = tmp_path / args[start]
            takeaway.history_upto(history, record.index - 1).save(path)
            args[start] = str(path)
        else:
            assert "--start-from" not in args
        summary = json.loads(main_json(capsys, args))
        again = History.load(out / "history.lorsu").sessions[-1]
        assert summary["sessions"][-1]["ti"] == record.ti  # bit for bit: ==, not approx
        assert again.index == record.index and again.settings == record.settings
        assert set(again.delta) == set(record.delta)
        for name, patch in record.delta.items():
            assert torch.equal(patch.values, again.delta[name].values), name


def main_json(capsys, args):
    code = main([*args, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def test_tables_match_the_history(app_core):
    core = app_core
    key = "tables"
    fast = {"batch_size": 4, "epochs": 1}
    finish(core.train(key, "colours", "lorsu", 2, 1, fast, also="mc"))
    finish(core.train(key, "mixes", "lora", 2, 1, fast, also=None))
    finish(core.train(key, "colours", "full", 2, 1, fast, also=None))
    history = core.workspace(key).history
    matrix = history.matrix()
    rows = list(csv.reader(io.StringIO(takeaway.matrix_csv(history))))
    assert rows[0] == ["after_session", *matrix.sets]
    assert len(rows) == len(matrix.rows) + 1
    for j, (row, expected) in enumerate(zip(rows[1:], matrix.rows, strict=True)):
        assert row[0] == str(j)
        for cell, value in zip(row[1:], expected, strict=True):
            assert (cell == "" and math.isnan(value)) or float(cell) == value
    sessions = list(csv.DictReader(io.StringIO(takeaway.sessions_csv(history))))
    assert [s["method"] for s in sessions] == ["lorsu", "lora", "full"]
    assert sessions[0]["ti_mc"] != "" and sessions[1]["ti_mc"] == ""
    assert float(sessions[2]["ti"]) == history.sessions[2].ti
    # the matrix boxes every session's trained set: colours twice, mixes once
    cells = takeaway.trained_cells(history)
    assert cells == [(1, "colours"), (2, "mixes"), (3, "colours")]
    document = takeaway.matrix_json(history)
    assert document["trained"] == [[1, "colours"], [2, "mixes"], [3, "colours"]]
    json.dumps(document, allow_nan=False)  # valid JSON: no NaN
    paths = takeaway.write_tables(history, core.work_dir / "t", "x")
    assert sorted(p.name for p in paths) == [
        "x-matrix.csv",
        "x-matrix.json",
        "x-sessions.csv",
        "x-sessions.json",
    ]
    assert paths[2].read_text() == takeaway.matrix_csv(history)


def test_start_from_refuses_a_history_of_another_model(bundle, colour_folder, tmp_path, capsys):
    from lorsu_demo.compare import start_history
    from lorsu_demo.history import HistoryError
    from lorsu_demo.model import load_bundle

    path = History(model=dict(bundle.source)).save(tmp_path / "h.lorsu")
    assert len(start_history(path, bundle)) == 0
    with pytest.raises(HistoryError, match="pass --model-seed 0"):
        start_history(path, load_bundle("tiny-random", seed=1))
    other = History(model={"model": "toy"}).save(tmp_path / "toy.lorsu")
    with pytest.raises(HistoryError, match="pass --model toy"):
        start_history(other, bundle)
    args = ["train", "--model", "tiny-random", "--data", str(colour_folder)]
    args += ["--out", str(tmp_path / "run")]
    assert main([*args, "--start-from", str(tmp_path / "none.lorsu")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_the_base_s_second_reading_is_measured_once_for_every_history(
    bundle, train_set, eval_sets, monkeypatch
):
    """Thirty students' first sessions read the same untouched model: its multiple-choice
    accuracies are measured for the first and reused, exactly, for the others."""
    from lorsu_demo import evaluate
    from lorsu_demo.compare import second_reading

    target, control = eval_sets
    bundle.base_cache.clear()
    record = one_session(bundle, History(model=dict(bundle.source)), train_set, target, control)
    measured = []
    real = evaluate.accuracy
    monkeypatch.setattr(
        evaluate, "accuracy", lambda b, s, r="clip": measured.append(s.name) or real(b, s, r)
    )
    first = second_reading(bundle, History(model=dict(bundle.source)), record, target, [control])
    assert sorted(measured) == sorted([target.name, control.name])
    measured.clear()
    again = second_reading(bundle, History(model=dict(bundle.source)), record, target, [control])
    assert measured == [] and again["base"] == first["base"]
    assert again["ti"] == first["ti"] and again["cc"] == first["cc"]
