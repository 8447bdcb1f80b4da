"""The Compare tab's handlers, the readings and Copy as CLI under the live view, and the table
downloads, called as Gradio calls them (no server, no browser) on tiny-random."""

import csv
import io
import pickle
from types import SimpleNamespace

import pytest
import torch
from conftest_ui import make_core
from matplotlib.figure import Figure

from lorsu_demo import takeaway
from lorsu_demo.compare import MethodResult
from lorsu_demo.history import History
from lorsu_demo.ui import takeaway as takeaway_ui
from lorsu_demo.ui import zerogpu
from lorsu_demo.ui.app import build_app
from lorsu_demo.ui.compare_core import _method_seconds, compare, keep, method_worker
from lorsu_demo.ui.core import UserError


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    core = make_core(tmp_path_factory.mktemp("ui-compare"))
    return core, build_app(core)


def handler(demo, name):
    found = [f.fn for f in demo.fns.values() if getattr(f.fn, "__name__", "") == name]
    assert len(found) == 1, name
    return found[0]


def request(key):
    return SimpleNamespace(session_hash=key)


def test_compare_tab_runs_methods_and_keeps_one(app):
    core, demo = app
    key = "tab"
    on_compare = handler(demo, "on_compare")
    updates = list(on_compare("colours", ["lorsu", "lora"], 3, 1, 2, True, request(key)))
    status, figure, table, choices, run, stop = updates[-1]
    assert "Compared 2 methods" in status and "Your history is unchanged" in status
    assert isinstance(figure, Figure)
    assert [row[0] for row in table] == ["lorsu", "lora"]
    assert all(row[3] != "—" for row in table), "read with the chat model too"
    assert choices["choices"] == [("lorsu", "lorsu"), ("lora", "lora")] or choices["choices"] == [
        "lorsu",
        "lora",
    ]
    assert run["interactive"] is True and stop["interactive"] is False
    assert len(core.workspace(key).history) == 0, "the history is untouched"
    command = handler(demo, "on_choice")("lora", request(key))
    assert command.startswith("python -m lorsu_demo train --model tiny-random")
    assert "--method lora --shots 3 --seed 2" in command
    outputs = handler(demo, "on_keep")("lora", request(key))
    assert "Kept lora: it is session 1 now" in outputs[0]
    assert [row[1] for row in outputs[2]] == ["lora"]  # the Sessions tab's table
    record = core.workspace(key).history.sessions[0]
    assert record.method == "lora" and record.extra["user_seed"] == 2
    # the readings and the command of the latest session, as shown under the live view
    readings, command_update, start = takeaway_ui.session_extras(core, key)
    assert "read two ways" in readings and "chat model, multiple choice" in readings
    assert command_update["value"] == record.extra["command"]
    assert start["visible"] is False  # the first session starts from the base model
    # a second kept comparison starts from session 1: its command needs that history file
    list(compare(core, key, "mixes", "lorsu", 2, 1, None, 0, None, None))
    keep(core, key, "lorsu")
    readings, command_update, start = takeaway_ui.session_extras(core, key)
    assert "--start-from history-before-session-2.lorsu" in command_update["value"]
    assert start["visible"] and start["value"].endswith("history-before-session-2.lorsu")


def test_keep_refuses_when_the_history_moved_on(app):
    core, _ = app
    key = "moved"
    events = list(compare(core, key, "colours", "lorsu,spu", 2, 1, None, None, None, None))
    assert events[-1][0].kind == "compared"
    for _ in core.train(key, "mixes", "lorsu", 2, 1, {"batch_size": 4}):
        pass
    with pytest.raises(UserError, match="no longer follow them: compare again"):
        keep(core, key, "spu")
    with pytest.raises(UserError, match="has no 'full'"):
        keep(core, key, "full")


def test_compare_and_seed_refusals_are_messages(app):
    core, _ = app
    for args, message in (
        (("colours", "lorsu,lorsa", 2), "Unknown method 'lorsa'"),
        (("colours", "lorsu", 0), "at least one shot"),
        (("nowhere", "lorsu", 2), "no example domain 'nowhere'"),
    ):
        event, view = next(iter(compare(core, "refuse", *args)))
        assert event["kind"] == "error" and message in view.status
    event, view = next(iter(compare(core, "refuse", "colours", "lorsu", 2, 1, {"rnak": 2})))
    assert "has the setting 'rnak'" in view.status
    event, live = list(core.train("refuse", "colours", "lorsu", 2, 1, {}, seed=-3))[-1]
    assert event["kind"] == "error" and "The seed must be a whole number" in live.status
    assert len(core.workspace("refuse").history) == 0


def test_table_files_follow_the_history(app):
    core, _ = app
    key = "files"
    assert takeaway_ui.table_files(core, key) is None
    for _ in core.train(key, "colours", "lorsu", 2, 1, {"batch_size": 4}, also=None):
        pass
    paths = takeaway_ui.table_files(core, key)
    names = sorted(p.rsplit("/", 1)[1] for p in paths)
    assert names == [
        "lorsu-tiny-random-1-matrix.csv",
        "lorsu-tiny-random-1-matrix.json",
        "lorsu-tiny-random-1-sessions.csv",
        "lorsu-tiny-random-1-sessions.json",
    ]
    history = core.workspace(key).history
    matrix_csv = next(p for p in paths if p.endswith("matrix.csv"))
    rows = list(csv.reader(io.StringIO(open(matrix_csv).read())))
    assert [float(c) for c in rows[2][1:] if c] == [v for v in history.matrix().rows[1] if v == v]
    assert open(matrix_csv).read() == takeaway.matrix_csv(history)


def test_stop_ends_a_comparison_with_nothing_kept(app):
    core, _ = app
    key = "stop"
    before = {k: v.clone() for k, v in core.bundle.vision_state().items()}
    core.arm(key)
    seen = []
    for event, view in compare(core, key, "colours", "lorsu,full", 3, 3, {"batch_size": 2}):
        seen.append((event, view.tone))
        if getattr(event, "kind", None) == "step":
            core.stop(key)
    assert seen[-1][0].kind == "stopped" and seen[-1][1] == "stopped"
    seen = [e for e, _ in seen]
    assert sum(getattr(e, "kind", None) == "step" for e in seen) == 1
    ws = core.workspace(key)
    assert not ws.busy and ws.compared == {} and len(ws.history) == 0
    after = core.bundle.vision_state()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(UserError, match="run a comparison first"):
        keep(core, key, "lorsu")


def test_each_method_is_one_gpu_call_within_zerogpus_limit(app):
    """On ZeroGPU a comparison asks for one GPU call per method (a call has a longest
    duration); what goes in and comes out of a call must pickle."""
    core, _ = app
    data = core.examples.get("colours")
    history = History(model=core.bundle.source)
    train = data.session_images(3, 1)
    settings = {"batch_size": 4, "epochs": 1}
    args = (history, "spu", settings, train, data.target, core.controls, [], 1001, 3, "clip", "mc")
    args = pickle.loads(pickle.dumps(args))
    events = [pickle.loads(pickle.dumps(e)) for e in method_worker(*args)]
    assert isinstance(events[-1], MethodResult) and events[-1].record.method == "spu"
    assert set(events[-1].record.extra["readings"]) == {"clip", "mc"}
    assert len(history) == 0
    long = {"batch_size": 1, "epochs": 500}
    assert _method_seconds(history, "full", long, train, data.target) == zerogpu.MAX_DURATION_S
    short = _method_seconds(history, "spu", settings, train, data.target)
    assert short < _method_seconds(history, "spu", settings, train, data.target, also="mc")
