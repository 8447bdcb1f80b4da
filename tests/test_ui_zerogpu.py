"""ZeroGPU: durations sized from the planned steps, its refusals turned into messages, the
quota a session costs on the page, and the GPU lane's width, with two users' calls running at
once in simulated forked workers (each gets exactly its own results)."""

import multiprocessing
import pickle
import threading
import time

import pytest
import torch
from conftest_ui import FAST, make_core, record_of, same_delta

from lorsu_demo.delta import DeltaError
from lorsu_demo.ui import engine, zerogpu
from lorsu_demo.ui.core import UserError

QUESTION = "What is in this image?"


class ForkingSpaces:
    """A stand-in for the `spaces` package: `GPU(duration=...)` runs each call in a forked
    process, pickling arguments in and results (every yielded item) out, as ZeroGPU does. The
    children meet at a barrier before they work, so two calls provably overlap."""

    def __init__(self, parties: int):
        self.context = multiprocessing.get_context("fork")
        self.barrier = self.context.Barrier(parties, timeout=60)
        self.durations: list[int] = []
        self.payloads: list[tuple[str, bytes]] = []  # (function, pickled arguments)
        self.forking = threading.Lock()

    def GPU(self, duration=60, size=None):  # noqa: N802 - the real package's name
        def wrap(fn):
            def call(*args, **kwargs):
                seconds = duration(*args, **kwargs) if callable(duration) else duration
                self.durations.append(seconds)
                payload = pickle.dumps((args, kwargs))
                self.payloads.append((fn.__name__, payload))
                parent, child = self.context.Pipe()
                process = self.context.Process(target=self._child, args=(fn, payload, child))
                with self.forking:  # filelock refuses two threads forking at one instant
                    process.start()
                child.close()
                finished = False
                try:
                    while True:
                        kind, value = pickle.loads(parent.recv_bytes())
                        if kind == "item":
                            yield value
                        elif kind == "error":
                            raise RuntimeError(value)
                        else:
                            finished = True
                            return
                finally:
                    # A stream closed early (Stop, a closed tab) ends the worker, as on ZeroGPU.
                    process.join(timeout=30 if finished else 0)
                    if process.is_alive():
                        process.kill()
                        process.join()

            return call

        return wrap

    def _child(self, fn, payload, pipe):
        try:
            self.barrier.wait()
            args, kwargs = pickle.loads(payload)
            for item in fn(*args, **kwargs):
                pipe.send_bytes(pickle.dumps(("item", item)))
            pipe.send_bytes(pickle.dumps(("end", None)))
        except Exception as err:  # reported to the parent, which raises it
            pipe.send_bytes(pickle.dumps(("error", f"{type(err).__name__}: {err}")))
        finally:
            pipe.close()


@pytest.fixture(scope="module")
def core(tmp_path_factory):
    return make_core(tmp_path_factory.mktemp("ui-zerogpu"))


def train(core, key, data, epochs=2):
    return list(core.train(key, data, "lorsu", 4, epochs, dict(FAST)))


def test_two_users_at_once_in_forked_workers_get_their_own_results(core, monkeypatch, tmp_path):
    # Reference: each user's first and second steps, one after the other, in this process.
    for key, data in (("ref-a", "colours"), ("ref-b", "mixes")):
        train(core, key, data)
    ref_a2 = record_of(train(core, "ref-a", "colours"))
    ref_b2 = record_of(train(core, "ref-b", "mixes"))
    image = core.examples.get("colours").domain.test.items[0].image
    ref_chat_a = list(core.chat("ref-a", image, QUESTION))[-1]
    ref_chat_b = list(core.chat("ref-b", image, QUESTION))[-1]
    weights = {k: v.detach().clone() for k, v in core.bundle.vision_state().items()}

    # The same users' histories so far, then their second sessions at once in forked workers.
    for key, data in (("a", "colours"), ("b", "mixes")):
        train(core, key, data)
    fake = ForkingSpaces(parties=2)
    monkeypatch.setattr(engine, "spaces", fake)
    # Histories travel as shared files (as on ZeroGPU): each call pickles a path, not tensors.
    monkeypatch.setenv("LORSU_SHARED_DIR", str(tmp_path / "shared"))
    for name, duration in (
        ("session_worker", engine._session_seconds),
        ("chat_worker", zerogpu.CHAT_S),
    ):
        monkeypatch.setattr(engine, name, engine.gpu(duration)(getattr(engine, name)))
    results = {}

    def user(key, data):
        results[key] = record_of(train(core, key, data))
        results[key + "-chat"] = list(core.chat(key, image, QUESTION))[-1]

    threads = [threading.Thread(target=user, args=a) for a in (("a", "colours"), ("b", "mixes"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert set(results) == {"a", "b", "a-chat", "b-chat"}
    # Each user got exactly what they would have got alone, and not the other's.
    assert same_delta(results["a"], ref_a2) and same_delta(results["b"], ref_b2)
    assert not same_delta(results["a"], results["b"])
    assert results["a"].accuracies == ref_a2.accuracies
    assert results["b"].accuracies == ref_b2.accuracies
    assert results["a-chat"] == ref_chat_a and results["b-chat"] == ref_chat_b
    # The work ran in the children: the shared model in this process never moved.
    assert all(torch.equal(weights[k], v) for k, v in core.bundle.vision_state().items())
    # Durations came from the planned steps: 12 images, batch 4, 2 epochs = 6 steps.
    assert fake.durations.count(zerogpu.session_seconds(6)) == 2
    assert fake.durations.count(zerogpu.CHAT_S) == 2
    # Every call referenced its own user's latest version by path; no delta travelled.
    files = {key: core.workspace(key).folds.get(core.workspace(key).history.deltas())[0]
             for key in ("a", "b")}  # fmt: skip
    paths = {key: folded.shared_path for key, folded in files.items()}
    assert paths["a"] != paths["b"] and all(paths.values())
    chats = [payload for name, payload in fake.payloads if name == "chat_worker"]
    assert len(chats) == 2 and all(
        (paths["a"].encode() in p) != (paths["b"].encode() in p) for p in chats
    )
    sessions = [payload for name, payload in fake.payloads if name == "session_worker"]
    assert len(sessions) == 2
    for payload in sessions:  # the first session's delta went as a file, not as tensors
        (history, *_), _ = pickle.loads(payload)
        assert len(history) == 1 and history.sessions[0].delta == {}
        assert history.deltas()[0].shared_path


def test_lane_width_follows_the_platform(monkeypatch):
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    monkeypatch.setenv("LORSU_GPU_LANES", "6")
    assert zerogpu.lane_width() == 1  # one shared model: calls take turns
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    assert zerogpu.lane_width() == 6
    monkeypatch.delenv("LORSU_GPU_LANES")
    assert zerogpu.lane_width() == 4
    monkeypatch.setenv("LORSU_GPU_LANES", "many")
    assert zerogpu.lane_width() == 4


def test_durations_grow_with_the_steps_and_stay_within_the_quota(monkeypatch):
    monkeypatch.delenv("LORSU_ZEROGPU_SIZE", raising=False)
    assert zerogpu.session_seconds(10) < zerogpu.session_seconds(20)
    assert zerogpu.session_seconds(10_000) == zerogpu.MAX_DURATION_S
    # The longest request still fits a visitor's full quota once counted 1.5x.
    assert zerogpu.quota_seconds(zerogpu.MAX_DURATION_S) <= zerogpu.VISITOR_QUOTA_S
    assert zerogpu.quota_seconds(40) == 60
    monkeypatch.setenv("LORSU_ZEROGPU_SIZE", "xlarge")
    assert zerogpu.quota_seconds(40) == 80


def test_the_page_says_what_a_session_costs_of_the_quota(core, monkeypatch):
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    monkeypatch.delenv("LORSU_ZEROGPU_SIZE", raising=False)
    # the live view is one object updated in place: read its status as the session goes
    statuses = [live.status for _, live in core.train("quota", "colours", "lorsu", 4, 1, FAST)]
    first, last = statuses[0], statuses[-1]
    asked = zerogpu.session_seconds(3)
    assert f"reserves {asked} s" in first
    assert f"{100 * asked * 1.5 / 120:.0f}% of the 2 minutes" in first
    assert "of your daily ZeroGPU quota" in last
    monkeypatch.delenv("SPACES_ZERO_GPU")
    statuses = [live.status for _, live in core.train("quota", "colours", "lorsu", 4, 1, FAST)]
    assert not any("quota" in status for status in statuses)


class QuotaError(Exception):
    """What `spaces` raises (a gradio.Error whose title names the refusal)."""

    def __init__(self, message, title):
        super().__init__(message)
        self.title = title


QUOTA = QuotaError(
    "You have exceeded your GPU quota (59s left vs. 60s requested). Sign-up on Hugging Face "
    "to get more quotas or retry in 0:00:56",
    "ZeroGPU quota exceeded",
)
ILLEGAL = QuotaError(
    "The requested GPU duration (900s) is larger than the maximum allowed",
    "ZeroGPU illegal duration",
)


def test_zerogpu_refusals_read_as_clear_messages():
    quota = zerogpu.gpu_problem(QUOTA)
    assert "run out (59 s left, 60 s needed)" in quota and "in 0:00:56" in quota
    assert "python app.py" in quota
    assert "fewer shots or epochs" in zerogpu.gpu_problem(ILLEGAL)
    assert zerogpu.gpu_problem(RuntimeError("CUDA out of memory")) is None


def refusing(error):
    def worker(*args, **kwargs):
        raise error
        yield  # a generator, like the real workers

    return worker


def test_refusals_reach_the_screen_as_messages(core, monkeypatch):
    monkeypatch.setattr(engine, "session_worker", refusing(QUOTA))
    pairs = train(core, "refused", "colours", epochs=1)
    event, live = pairs[-1]
    assert event["kind"] == "error" and live.status.startswith("Your free ZeroGPU time")
    assert len(core.workspace("refused").history) == 0
    train_ok = core.workspace("refused")
    assert not train_ok.busy
    monkeypatch.setattr(engine, "chat_worker", refusing(ILLEGAL))
    image = core.examples.get("colours").domain.test.items[0].image
    with pytest.raises(UserError, match="more GPU time than one call may have"):
        list(core.chat("refused", image, QUESTION))
    monkeypatch.setattr(engine, "chat_worker", refusing(DeltaError("layer 9 does not exist")))
    with pytest.raises(UserError, match="cannot be applied: layer 9 does not exist"):
        list(core.chat("refused", image, QUESTION))

    def raises(*args, **kwargs):
        raise QUOTA

    monkeypatch.setattr(engine, "confidence_worker", raises)
    with pytest.raises(UserError, match="Your free ZeroGPU time"):
        core.confidence("refused", image)
    monkeypatch.setattr(engine, "export_worker", raises)
    with pytest.raises(UserError, match="Your free ZeroGPU time"):
        core.export_model("refused", None)

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(engine, "export_worker", out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"):  # not a refusal: not hidden
        core.export_model("refused", None)


def test_a_stopped_child_does_not_hang_the_caller(core, monkeypatch):
    """Closing a forked worker's stream early (a Stop press) ends the child."""
    fake = ForkingSpaces(parties=1)
    monkeypatch.setattr(engine, "spaces", fake)
    worker = engine.gpu(zerogpu.CHAT_S)(engine.chat_worker)
    image = core.examples.get("colours").domain.test.items[0].image
    stream = worker(image, QUESTION, [], True)
    started = time.perf_counter()
    assert next(stream)[0] == "adapted"
    stream.close()
    assert time.perf_counter() - started < 20
    assert not multiprocessing.active_children()
