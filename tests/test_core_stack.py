"""A history folded into one delta (what a ZeroGPU call ships): bit-identical weights to the
stack it folds, exact rollback, one-buffer pickling, and a cache that folds each session once."""

import os
import pickle

import pytest
import torch
from conftest import colour_set

from lorsu_demo.delta import Delta, DeltaError, Patch, Region, applied
from lorsu_demo.evaluate import EvalSet
from lorsu_demo.events import Done
from lorsu_demo.history import History
from lorsu_demo.methods import make_method
from lorsu_demo.session import run_session
from lorsu_demo.stack import FlatRegion, FoldCache, FoldedDelta, fold

FAST = {"lr": 1e-2, "epochs": 1, "batch_size": 4}


def weights(bundle):
    return {k: v.detach().clone() for k, v in bundle.vision_state().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def history(bundle):
    """Three real sessions whose footprints overlap: rows + mask + dense (lorsu), mask
    (spu), and lorsu again with other heads and another mask."""
    classes = ["red", "green", "blue"]
    train = colour_set("train", 3, seed=1, classes=classes)
    target = EvalSet("target", colour_set("test", 2, seed=2, classes=classes), classes)
    history = History(model=bundle.source)
    for seed, method in enumerate(["lorsu", "spu", "lorsu"], 1):
        events = run_session(
            bundle, history, make_method(method, **FAST), train, target=target, seed=seed
        )
        history.append([e for e in events if isinstance(e, Done)][0].record)
    return history


def test_a_folded_history_writes_the_stacks_weights_and_rolls_back_exactly(bundle, history):
    state = bundle.vision_state()
    base = weights(bundle)
    kinds = {p.region.kind for d in history.deltas() for p in d.values()}
    assert kinds == {"rows", "mask", "dense"}  # every kind of region is folded
    for upto in (1, 2, 3):
        deltas = history.deltas(upto)
        with applied(state, deltas):
            stacked = weights(bundle)
        folded = fold(deltas)
        assert len(folded) == len({name for d in deltas for name in d})
        with applied(state, [folded]):
            assert same(weights(bundle), stacked), upto
        assert same(weights(bundle), base)
        # what a forked worker receives
        received = pickle.loads(pickle.dumps([folded]))
        assert isinstance(received[0], FoldedDelta)
        with applied(state, received):
            assert same(weights(bundle), stacked), upto
        assert same(weights(bundle), base)
    # the sessions changed the weights, so the comparisons could have failed
    assert not same(stacked, base)


def test_mask_regions_carry_their_flat_positions(history):
    folded = fold(history.deltas())
    masks = [p.region for p in folded.values() if p.region.kind == "mask"]
    assert masks and all(isinstance(r, FlatRegion) for r in masks)
    for region in masks:
        positions = torch.nonzero(region.mask().reshape(-1)).reshape(-1)
        assert torch.equal(region.flat.long(), positions)


def test_the_cache_folds_each_session_once_and_matches_a_full_fold(history):
    cache = FoldCache()
    one = cache.get(history.deltas(1))
    assert cache.get(history.deltas(1))[0] is one[0]  # the same version folds nothing
    incremental = cache.get(history.deltas(3))[0]
    full = fold(history.deltas(3))
    assert incremental.keys() == full.keys()
    for name in full:
        assert torch.equal(incremental[name].values, full[name].values), name
        assert torch.equal(incremental[name].region.mask(), full[name].region.mask()), name
    assert cache.get([]) == []
    back = cache.get(history.deltas(2))[0]  # a rollback folds from scratch
    assert all(torch.equal(back[n].values, fold(history.deltas(2))[n].values) for n in back)


def test_mixed_value_dtypes_round_the_way_the_stack_does():
    """Values of another dtype than the parameter are cast on every write; the fold keeps
    them exactly (float64) so the one cast at apply time matches the stack's last one."""
    param = torch.zeros(6, 5, dtype=torch.float16)
    state = {"w": param}
    generator = torch.Generator().manual_seed(0)
    mask = torch.rand(6, 5, generator=generator) < 0.5
    deltas = [
        Delta(
            {"w": Patch(Region.of_rows((6, 5), [1, 4]), torch.randn(2, 5, generator=generator))}
        ),  # fmt: skip
        Delta(
            {
                "w": Patch(
                    Region.of_mask(mask),
                    torch.randn(int(mask.sum()), generator=generator).bfloat16(),
                )
            }
        ),  # fmt: skip
        Delta(
            {
                "w": Patch(
                    Region.of_rows((6, 5), [0, 1]),
                    torch.randn(2, 5, generator=generator, dtype=torch.float64),
                )
            }
        ),  # fmt: skip
    ]
    with applied(state, deltas):
        stacked = param.clone()
    with applied(state, [fold(deltas)]):
        assert torch.equal(param, stacked)
    assert not param.any()
    assert not torch.equal(stacked, torch.zeros_like(stacked))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_the_fast_finite_check_finds_every_bad_value(dtype):
    from lorsu_demo.delta import all_finite

    values = torch.randn(1000).to(dtype)
    assert all_finite(values)
    for bad in (float("nan"), float("inf"), float("-inf")):
        spoiled = values.clone()
        spoiled[123] = bad
        assert not all_finite(spoiled), bad
    both = torch.zeros(10, dtype=dtype)
    both[2], both[7] = float("inf"), float("-inf")  # a NaN sum, not an infinite one
    assert not all_finite(both)
    # finite values whose sum overflows are still finite
    largest = torch.finfo(dtype).max
    assert all_finite(torch.full((8,), largest, dtype=dtype))


def test_a_shared_fold_ships_a_path_and_a_forked_worker_maps_it(bundle, history, tmp_path, monkeypatch):  # fmt: skip
    """Shared through a file, a folded history pickles as its path and token (no tensors); a
    forked worker maps the file and writes the stack's weights; the weights restore exactly
    there and here; the file goes with the server's last reference, not with the child."""
    import gc
    import multiprocessing

    monkeypatch.setenv("LORSU_SHARED_DIR", str(tmp_path / "shared"))
    state = bundle.vision_state()
    base = weights(bundle)
    with applied(state, history.deltas()):
        stacked = weights(bundle)
    folded = fold(history.deltas())
    shared = folded.share()
    path = shared.shared_path
    assert os.path.dirname(path) == str(tmp_path / "shared") and os.path.exists(path)
    assert (os.stat(tmp_path / "shared").st_mode & 0o777) == 0o700
    payload = pickle.dumps([shared])
    assert len(payload) < 1000 < folded.nbytes and path.encode() in payload
    # the same tensors as the in-memory fold, so also a valid safetensors file
    from safetensors.torch import load_file

    assert len(load_file(path)) >= len(folded)
    for name, patch in folded.items():
        assert torch.equal(shared[name].values, patch.values), name
    with applied(state, [shared]):
        assert same(weights(bundle), stacked)
    assert same(weights(bundle), base)

    def worker(pipe):
        (received,) = pickle.loads(payload)
        with applied(state, [received]):
            ok = same(weights(bundle), stacked)
        pipe.send(ok and same(weights(bundle), base))
        pipe.close()
        del received
        gc.collect()

    context = multiprocessing.get_context("fork")
    parent, child = context.Pipe()
    process = context.Process(target=worker, args=(child,))
    process.start()
    assert parent.recv() is True
    process.join(timeout=60)
    assert process.exitcode == 0 and os.path.exists(path)  # the child deleted nothing
    del shared
    gc.collect()
    assert not os.path.exists(path)  # the server's last reference went
    with pytest.raises(DeltaError, match="cannot be read"):
        pickle.loads(payload)


def test_a_shared_file_that_is_not_the_one_meant_is_refused(history, tmp_path, monkeypatch):
    from lorsu_demo.stack import open_shared

    monkeypatch.setenv("LORSU_SHARED_DIR", str(tmp_path))
    shared = fold(history.deltas(2)).share()
    with pytest.raises(DeltaError, match="not the shared history"):
        open_shared(shared.shared_path, "0" * 32)
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(DeltaError, match="cannot be read"):
        open_shared(str(damaged), "x")


def test_a_sharing_cache_keeps_two_versions_and_folds_onto_the_longest_kept_prefix(history, tmp_path, monkeypatch):  # fmt: skip
    monkeypatch.setenv("LORSU_SHARED_DIR", str(tmp_path))
    cache = FoldCache(share=True)
    one = cache.get(history.deltas(1))[0]
    three = cache.get(history.deltas(3))[0]
    assert one.shared_path and three.shared_path and one.shared_path != three.shared_path
    assert cache.get(history.deltas(1))[0] is one  # both versions kept
    assert cache.get(history.deltas(3))[0] is three
    two = cache.get(history.deltas(2))[0]  # folded onto version 1; version 1 leaves the cache
    full = fold(history.deltas(2))
    assert two.keys() == full.keys()
    assert all(torch.equal(two[n].values, full[n].values) for n in full)
    assert cache.get(history.deltas(3))[0] is three
    del one
    import gc

    gc.collect()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        os.path.basename(d.shared_path) for d in (two, three)
    )


def test_a_session_on_the_folded_history_a_call_ships_matches_the_full_history(bundle, history, tmp_path, monkeypatch):  # fmt: skip
    """What a training call ships (`FoldCache.for_call`): the records without their deltas and
    the stack as one shared delta. A session run on it leaves the same delta, accuracies and
    weights as one run on the full history, and the pickle carries no session's tensors."""
    from lorsu_demo.history import HistoryError
    from lorsu_demo.stack import FoldedHistory

    monkeypatch.setenv("LORSU_SHARED_DIR", str(tmp_path))
    classes = ["red", "green", "blue"]
    train = colour_set("train", 3, seed=3, classes=classes)
    target = EvalSet("target", colour_set("test", 2, seed=2, classes=classes), classes)
    cache = FoldCache(share=True)
    shipped = cache.for_call(history)
    assert isinstance(shipped, FoldedHistory) and len(shipped) == len(history)
    payload = pickle.dumps(shipped)
    assert len(payload) < 0.2 * sum(d.nbytes for d in history.deltas())
    received = pickle.loads(payload)
    with pytest.raises(HistoryError, match="only its latest version"):
        received.deltas(1)
    base = weights(bundle)
    records = []
    for source in (history, received):
        events = run_session(
            bundle, source, make_method("lorsu", **FAST), train, target=target, seed=7
        )
        records.append([e for e in events if isinstance(e, Done)][0].record)
        assert same(weights(bundle), base)
    full, folded = records
    assert full.delta.keys() == folded.delta.keys()
    assert all(torch.equal(full.delta[k].values, folded.delta[k].values) for k in full.delta)
    assert full.accuracies == folded.accuracies and full.index == folded.index == 4
    assert cache.for_call(History()) is not None and len(cache.for_call(History())) == 0
