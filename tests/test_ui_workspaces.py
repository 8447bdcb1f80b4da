"""Browsers' workspaces on disk: a reload or a server restart finds the sessions, uploads and
chat version again (same key); another key does not; idle ones are swept; a session cut short
by a reload is reported once, with its inputs. No browser: the store and AppCore directly."""

import json
import os
import stat
import time

import pytest
import torch
from conftest_ui import FAST, colour_image, make_core

from lorsu_demo.events import Done, Step, Stopped
from lorsu_demo.ui import workspace
from lorsu_demo.ui.uploads import Card


def images(tmp_path, prefix, channels, n=4):
    import numpy as np

    paths = []
    for i in range(n):
        path = tmp_path / f"{prefix}{i}.png"
        colour_image(np.random.default_rng(i), channels).save(path)
        paths.append(str(path))
    return paths


def delta_values(history):
    return [
        {name: patch.values.clone() for name, patch in record.delta.items()}
        for record in history.sessions
    ]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tmp_path_factory.mktemp("workspaces")


def test_a_restart_finds_the_workspace_by_its_key(world, tmp_path):
    state = world / "state-restart"
    core = make_core(world, state=state)
    key, ws = core.attach("page-1", None)
    assert workspace.valid_browser_key(key) and ws.persistent
    data = core.upload(
        "page-1",
        [Card("red", images(tmp_path, "r", (0,))), Card("blue", images(tmp_path, "b", (2,)))],
    )
    events = list(core.train("page-1", "colours", "lorsu", 3, 1, FAST))
    assert isinstance(events[-1][0], Done)
    core.select("page-1", data.name)  # the upload is the picked data again
    core.set_chat_version("page-1", 0)
    before = delta_values(ws.history)
    core.close("page-1")  # the tab closed: saved, and out of memory
    assert key not in core.store

    restarted = make_core(world, state=state)  # a new process, the same state folder
    again_key, again = restarted.attach("page-2", key)
    assert again_key == key
    assert len(again.history) == 1 and again.history.base == ws.history.base
    for old, new in zip(before, delta_values(again.history), strict=True):
        assert old.keys() == new.keys()
        assert all(torch.equal(old[name], new[name]) for name in old)
    assert list(again.uploads) == [data.name] and again.selected == data.name
    up = again.uploads[data.name]
    assert [i.label for i in up.domain.train.items] == [i.label for i in data.domain.train.items]
    assert all(
        a.image.tobytes() == b.image.tobytes()
        for a, b in zip(up.domain.train.items, data.domain.train.items, strict=True)
    )
    assert again.chat_version == 0
    assert data.from_cards and up.from_cards  # a reload puts the class cards back
    assert {k: len(v) for k, v in up.card_images().items()} == {"blue": 4, "red": 4}
    # the restored history answers: the chat with session 1 runs on it
    answer, _ = list(restarted.chat("page-2", images(tmp_path, "q", (0,), 1)[0], "What?", 1))[-1]
    assert isinstance(answer, str)

    other_key, other = restarted.attach("page-3", None)  # another browser: a new workspace
    assert other_key != key and len(other.history) == 0 and not other.uploads
    # a key the browser made up (or tampered with) is not used: a new one is given
    odd_key, odd = restarted.attach("page-4", "../../etc/passwd")
    assert workspace.valid_browser_key(odd_key) and odd_key != key and len(odd.history) == 0
    # the key never appears on disk, only a digest of it
    names = [p.name for p in (state / "workspaces").iterdir()]
    assert key not in names and restarted.store.disk.folder(key).name in names


def test_two_pages_of_one_browser_share_it_until_both_close(world):
    core = make_core(world, state=world / "state-tabs")
    key, ws = core.attach("tab-a", None)
    _, same = core.attach("tab-b", key)
    assert same is ws
    assert not core.store.disk.folder(key).exists()  # a page load alone writes nothing
    core.select("tab-b", "colours")
    core.close("tab-a")
    assert key in core.store  # tab b still uses it
    core.close("tab-b")
    assert key not in core.store
    assert core.store.disk.folder(key).is_dir()


def test_idle_workspaces_are_swept_from_memory_and_disk(world):
    core = make_core(world, state=world / "state-sweep", idle_hours=1)
    old_key, old = core.attach("old-page", None)
    new_key, _ = core.attach("new-page", None)
    core.select("old-page", "colours")
    core.select("new-page", "mixes")
    core.close("old-page")
    meta = core.store.disk.folder(old_key) / "meta.json"
    saved = json.loads(meta.read_text())
    saved["seen"] = time.time() - 2 * 3600  # untouched for two hours
    meta.write_text(json.dumps(saved))
    assert core.store.sweep(core.idle) == 1
    assert not core.store.disk.folder(old_key).exists()
    assert core.store.disk.folder(new_key).exists() and new_key in core.store
    # what was swept is gone for that browser too: its key now opens an empty workspace
    _, fresh = core.attach("old-page-again", old_key)
    assert len(fresh.history) == 0 and fresh is not old


def test_the_browser_secret_is_fixed(tmp_path, monkeypatch):
    monkeypatch.delenv("LORSU_BROWSER_SECRET", raising=False)
    first = workspace.browser_secret(tmp_path)
    assert first == workspace.browser_secret(tmp_path) and len(first) >= 32
    mode = stat.S_IMODE(os.stat(tmp_path / "browser-secret").st_mode)
    assert mode == 0o600
    monkeypatch.setenv("LORSU_BROWSER_SECRET", "from-the-environment")
    assert workspace.browser_secret(tmp_path) == "from-the-environment"


def test_idle_hours_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("LORSU_WORKSPACE_HOURS", "2.5")
    assert workspace.idle_seconds() == 2.5 * 3600
    monkeypatch.setenv("LORSU_WORKSPACE_HOURS", "soon")
    assert workspace.idle_seconds() == workspace.IDLE_SECONDS


def test_a_reload_mid_session_is_reported_once_with_its_inputs(world):
    state = world / "state-reload"
    core = make_core(world, state=state)
    key, ws = core.attach("first-load", None)
    core.select("first-load", "colours")
    ended = None
    for event, _ in core.train("first-load", None, "lorsu", 4, 5, FAST, seed=7):
        if isinstance(event, Step):
            core.close("first-load")  # the page reloads: Gradio unloads the old page
        ended = event
    assert isinstance(ended, Stopped) and len(ws.history) == 0 and not ws.busy
    assert not core.bundle.lock.locked()

    restarted = make_core(world, state=state)  # even across a restart
    _, again = restarted.attach("second-load", key)
    note = restarted.take_interrupted("second-load")
    assert note["message"].startswith("Session 1 was interrupted by a reload; nothing was saved.")
    assert (note["method"], note["shots"], note["epochs"], note["seed"]) == ("lorsu", 4, 5, 7)
    assert note["data"] == "colours" and note["settings"]["batch_size"] == 4
    assert restarted.take_interrupted("second-load") is None  # said once
    assert again.selected == "colours"

    # the generator itself closed (Gradio drops the event): the same note
    events = restarted.train("second-load", None, "lorsu", 4, 5, FAST)
    for event, _ in events:
        if isinstance(event, Step):
            break
    events.close()
    note = restarted.take_interrupted("second-load")
    assert note and note["index"] == 1 and len(again.history) == 0 and not again.busy


def test_api_clients_are_not_kept_on_disk(world):
    core = make_core(world, state=world / "state-api")
    events = list(core.train("api-client", "colours", "lorsu", 3, 1, FAST))
    assert isinstance(events[-1][0], Done)
    assert not (world / "state-api" / "workspaces").exists()


def test_the_queue_note_gives_the_position_and_an_eta(world):
    core = make_core(world, state=world / "state-queue")
    core.arm("first")
    assert core.queue_note("first", lanes=1) == "Waiting for the model: yours is next."
    # the first session runs (and finishes): its duration is what the estimate uses
    events = list(core.train("first", "colours", "lorsu", 3, 1, FAST))
    assert isinstance(events[-1][0], Done) and core.queue_note("first") is None
    took = core._durations[-1]
    # while one session runs, two Train presses wait behind it, in the order pressed
    core.arm("second")
    core.arm("third")
    core._running["someone"] = time.monotonic()  # as core.train marks a running session
    second = core.queue_note("second", lanes=1)
    third = core.queue_note("third", lanes=1)
    assert second.startswith("Waiting for the model: position 1 in the line (1 session running)")
    assert third.startswith("Waiting for the model: position 2 in the line")
    assert "the median of the last 1" in third
    wait = [float(w) for w in __import__("re").findall(r"about (\d+) s to wait", third)]
    assert wait and abs(wait[0] - 2 * took) <= 1.5  # the running one and the second, ahead
    # with two lanes the second starts at once
    assert "yours is next" in core.queue_note("second", lanes=2)
    list(core.train("second", "colours", "lorsu", 3, 1, FAST))
    assert core.queue_note("second") is None
    assert core.queue_note("third", lanes=1).startswith("Waiting for the model: position 1")
