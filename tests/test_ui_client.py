"""The public API of a launched app, through `gradio_client`: /train streams, cancel leaves no
session, /chat answers, /rollback restores the earlier answer exactly, clients stay isolated."""

import threading
import time
from pathlib import Path

import pytest
import torch
from conftest_ui import FAST, make_core, serving
from gradio_client import Client, handle_file

QUESTION = "What is in this image?"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    core = make_core(tmp_path_factory.mktemp("ui-client"))
    with serving(core, as_the_app=False) as url:
        yield core, url


@pytest.fixture(scope="module")
def images(served):
    core, _ = served
    folder = Path(core.examples.folder) / "colours" / "test"
    return [str(p) for p in sorted(folder.rglob("*.png"))]


def client(url):
    return Client(url, verbose=False)


def weights(core):
    return {k: v.detach().clone() for k, v in core.bundle.vision_state().items()}


def train(c, data="colours", method="lorsu", shots=4, epochs=2, **settings):
    job = c.submit(data, method, shots, epochs, {**FAST, **settings}, api_name="/train")
    job.result(timeout=120)
    return job.outputs()


def ask(c, image, version=-1, with_base=True):
    return c.predict(handle_file(image), QUESTION, version, with_base, api_name="/chat")


def test_api_names_are_public(served):
    _, url = served
    names = client(url).view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert set(names) == {
        "/train",
        "/chat",
        "/rollback",
        "/sessions",
        "/export_history",
        "/import_history",
        "/compare",
        "/keep",
    }


def test_train_streams_updates_and_chat_answers(served, images):
    _, url = served
    c = client(url)
    outputs = train(c)
    kinds = [o["kind"] for o in outputs]
    assert kinds.count("step") == 6 and "scores" in kinds and "metrics" in kinds
    assert kinds[-1] == "done" and outputs[-1]["session"]["index"] == 1
    assert set(outputs[-1]["session"]["accuracies"]) >= {"colours", "mixes", "control:control"}
    sessions = c.predict(api_name="/sessions")
    assert [s["session"] for s in sessions["sessions"]] == [1]
    answer, base = ask(c, images[0])
    assert isinstance(answer, str) and answer and isinstance(base, str) and base
    with pytest.raises(Exception, match="no session 7"):
        ask(c, images[0], version=7)
    with pytest.raises(Exception, match="no example domain 'nowhere'"):
        c.predict("nowhere", "lorsu", 5, 1, {}, api_name="/train")


def test_cancel_leaves_no_session(served):
    core, url = served
    c = client(url)
    before = weights(core)
    job = c.submit("colours", "lorsu", 6, 60, FAST, api_name="/train")
    deadline = time.time() + 60
    while time.time() < deadline and not any(o["kind"] == "step" for o in job.outputs()):
        time.sleep(0.05)
    assert any(o["kind"] == "step" for o in job.outputs()), "training should have started"
    job.cancel()
    ws = core.workspace(c.session_hash)
    deadline = time.time() + 30
    while time.time() < deadline and (ws.busy or core.bundle.lock.locked()):
        time.sleep(0.05)
    assert not ws.busy and not core.bundle.lock.locked()
    assert c.predict(api_name="/sessions")["sessions"] == []
    after = weights(core)
    assert all(torch.equal(before[k], after[k]) for k in before)
    # the lane is free again: the same client trains to the end
    assert train(c, epochs=1)[-1]["kind"] == "done"


def test_rollback_restores_the_earlier_answer_exactly(served, images):
    _, url = served
    c = client(url)
    train(c, lr=1e-2, epochs=3)
    first = {i: ask(c, i, 1, False)[0] for i in images}
    base = {i: ask(c, i, 0, False)[0] for i in images}
    assert any(first[i] != base[i] for i in images), "session 1 should change an answer"
    train(c, data="mixes", method="full", lr=1e-2)
    result = c.predict(1, api_name="/rollback")
    assert result["message"] == "Rolled back to session 1: session 2 removed exactly."
    assert [s["session"] for s in result["sessions"]] == [1]
    assert {i: ask(c, i, -1, False)[0] for i in images} == first
    # the history file goes out and comes back in (another client resumes it)
    path = c.predict(api_name="/export_history")
    other = client(url)
    loaded = other.predict(handle_file(path), api_name="/import_history")
    assert loaded["message"].startswith("Loaded 1 session")
    assert {i: ask(other, i, -1, False)[0] for i in images} == first
    junk = Path(path).with_name("junk.lorsu")
    junk.write_bytes(b"not a history")
    with pytest.raises(Exception, match="not a lorsu-demo history file|damaged"):
        other.predict(handle_file(str(junk)), api_name="/import_history")


def test_two_clients_at_once_stay_isolated(served, images):
    _, url = served
    alice, bob = client(url), client(url)
    base = ask(bob, images[-1], 0, False)[0]
    results = {}

    def alice_trains():
        results["alice"] = train(alice, lr=1e-2, epochs=3)

    def bob_chats():
        results["bob"] = [ask(bob, images[-1], -1, False)[0] for _ in range(3)]

    threads = [threading.Thread(target=alice_trains), threading.Thread(target=bob_chats)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    assert results["alice"][-1]["kind"] == "done"
    assert results["bob"] == [base] * 3, "bob never sees alice's session"
    assert len(alice.predict(api_name="/sessions")["sessions"]) == 1
    assert bob.predict(api_name="/sessions")["sessions"] == []
    assert ask(bob, images[-1], -1, False)[0] == base


def test_compare_leaves_the_history_untouched_and_keeps_one(served):
    core, url = served
    c = client(url)
    train(c, lr=1e-2, epochs=1)
    before = c.predict(api_name="/sessions")
    weights_before = weights(core)
    job = c.submit(
        "mixes", "lorsu,lora,spu,full", 3, 1, {**FAST, "lr": 1e-2}, 5, "mc", api_name="/compare"
    )
    job.result(timeout=300)
    outputs = job.outputs()
    assert [o["method"] for o in outputs if o["kind"] == "method"] == [
        "lorsu",
        "lora",
        "spu",
        "full",
    ]
    assert any(o["kind"] == "step" for o in outputs), "progress is streamed"
    results = outputs[-1]["results"]
    assert [r["method"] for r in results] == ["lorsu", "lora", "spu", "full"]
    for row in results:
        assert {"ti", "cc", "ti_mc", "cc_mc", "trainable_params", "delta_bytes", "seconds"} <= set(
            row
        )
    # full fine-tuning trains every encoder weight: more than any other method
    params = {r["method"]: r["trainable_params"] for r in results}
    assert params["full"] > max(params["lorsu"], params["lora"], params["spu"])
    assert c.predict(api_name="/sessions") == before, "the history is untouched"
    after = weights(core)
    assert all(torch.equal(weights_before[k], after[k]) for k in after)
    kept = c.predict("spu", api_name="/keep")
    assert [s["method"] for s in kept["sessions"]] == ["lorsu", "spu"]
    assert kept["sessions"][1]["ti"] == results[2]["ti"]
    with pytest.raises(Exception, match="run a comparison first"):
        c.predict("lora", api_name="/keep")
    with pytest.raises(Exception, match="Unknown method 'lorsa'"):
        c.predict("mixes", "lorsa", 3, 1, FAST, 0, "", api_name="/compare")


def test_train_takes_a_seed_and_gives_the_command_that_repeats_it(served):
    _, url = served
    c = client(url)
    job = c.submit("colours", "lorsu", 3, 1, FAST, 7, api_name="/train")
    job.result(timeout=120)
    session = job.outputs()[-1]["session"]
    assert "--seed 7" in session["command"] and "--shots 3" in session["command"]
    job = c.submit("colours", "lorsu", 3, 1, FAST, api_name="/train")  # seed left out
    job.result(timeout=120)
    command = job.outputs()[-1]["session"]["command"]
    assert "--seed 2" in command and "--start-from history-before-session-2.lorsu" in command
