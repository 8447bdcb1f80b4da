"""CPU lanes: a small CPU model gets one copy per lane (LORSU_CPU_LANES), two users' sessions
run at once on two copies, and each gets exactly what it gets alone (the global random
generator's seeded part is serialised); the shared model never moves."""

import threading
from contextlib import contextmanager

import torch
from conftest_ui import FAST, make_core, record_of, same_delta

from lorsu_demo.ui import engine, zerogpu
from lorsu_demo.ui.app import build_app


def test_two_sessions_on_two_copies_at_once_match_each_alone(tmp_path, monkeypatch):
    saved = dict(engine._MODEL)
    monkeypatch.setenv("LORSU_CPU_LANES", "2")
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    assert zerogpu.cpu_lanes() == 2
    try:
        core = make_core(tmp_path)
        assert engine.lane_width(core.bundle) == 2
        pool = list(engine._MODEL["pool"].queue)
        assert len(pool) == 2 and core.bundle in pool
        copy = next(b for b in pool if b is not core.bundle)
        assert copy.clip.vision_model is copy.vlm.model.vision_tower  # still tied
        assert copy.lock is not core.bundle.lock
        ours, theirs = core.bundle.vision_state(), copy.vision_state()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
        assert all(ours[k].data_ptr() != theirs[k].data_ptr() for k in ours)

        def train(key, data):
            return record_of(list(core.train(key, data, "lorsu", 4, 2, dict(FAST))))

        alone = {data: train(f"alone-{data}", data) for data in ("colours", "mixes")}
        weights = {k: v.detach().clone() for k, v in ours.items()}

        busy, most, guard = [0], [0], threading.Lock()
        real_borrow = engine.borrow

        @contextmanager
        def counting_borrow():
            with real_borrow() as bundle:
                with guard:
                    busy[0] += 1
                    most[0] = max(most[0], busy[0])
                try:
                    yield bundle
                finally:
                    with guard:
                        busy[0] -= 1

        monkeypatch.setattr(engine, "borrow", counting_borrow)
        results, gate = {}, threading.Barrier(2)

        def user(data):
            gate.wait()
            results[data] = train(f"user-{data}", data)

        threads = [threading.Thread(target=user, args=(d,)) for d in ("colours", "mixes")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=600)
        assert set(results) == {"colours", "mixes"}
        assert most[0] == 2  # both copies were in use at the same time
        for data in ("colours", "mixes"):
            assert same_delta(results[data], alone[data]), data
            assert results[data].accuracies == alone[data].accuracies
        assert not same_delta(results["colours"], results["mixes"])
        assert all(torch.equal(weights[k], v) for k, v in ours.items())
        assert all(torch.equal(weights[k], v) for k, v in theirs.items())
    finally:
        engine._MODEL.clear()
        engine._MODEL.update(saved)


def test_a_gpu_or_large_model_is_not_copied(monkeypatch):
    monkeypatch.setenv("LORSU_CPU_LANES", "3")
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)

    class Large:
        device = torch.device("cpu")
        encoder_parameters = 64_000_000  # above SMALL_ENCODER

    class OnGpu:
        device = torch.device("cuda")

    assert engine.pool_size(Large()) == 1 and engine.pool_size(OnGpu()) == 1
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")  # ZeroGPU: separate worker processes
    monkeypatch.setattr(OnGpu, "device", torch.device("cpu"))
    assert engine.pool_size(OnGpu()) == 1


def test_cpu_lanes_default_to_the_usable_cores(monkeypatch):
    monkeypatch.delenv("LORSU_CPU_LANES", raising=False)
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    monkeypatch.setattr(zerogpu.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert zerogpu.cpu_lanes() == 3
    monkeypatch.setattr(zerogpu.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert zerogpu.cpu_lanes() == zerogpu.MAX_CPU_LANES
    monkeypatch.setenv("LORSU_CPU_LANES", "1")  # a teacher's choice wins
    assert zerogpu.cpu_lanes() == 1


def test_the_model_lane_is_as_wide_as_the_copies(tmp_path, monkeypatch):
    """The queue lets as many model calls run as there are copies (none waits inside a worker
    for one), one on a GPU, and ZeroGPU's own width there."""
    saved = dict(engine._MODEL)
    monkeypatch.setenv("LORSU_CPU_LANES", "3")
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    try:
        core = make_core(tmp_path)
        assert engine.lane_width(core.bundle) == 3 == engine._MODEL["pool"].qsize()
        demo = build_app(core)
        limits = {fn.concurrency_limit for fn in demo.fns.values() if fn.concurrency_id == "gpu"}
        assert limits == {3}

        class OnGpu:
            device = torch.device("cuda")

        assert engine.lane_width(OnGpu()) == 1
        monkeypatch.setenv("SPACES_ZERO_GPU", "true")
        monkeypatch.setenv("LORSU_GPU_LANES", "5")
        assert engine.lane_width(OnGpu()) == 5
    finally:
        engine._MODEL.clear()
        engine._MODEL.update(saved)
