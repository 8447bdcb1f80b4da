"""The ZeroGPU boundary: a `@spaces.GPU` training call runs in a forked worker, its arguments and
results are pickled, and weight changes made there never reach the main process. The user's
history goes in, the new session record comes out, and applying the deltas afterwards in the
main process must give exactly the weights the worker trained."""

import pickle

import torch
from conftest import snapshot_model

from lorsu_demo.delta import applied
from lorsu_demo.events import Done
from lorsu_demo.history import History
from lorsu_demo.methods import make_method
from lorsu_demo.model import load_bundle
from lorsu_demo.session import run_session

FAST = {"lr": 1e-2, "epochs": 2, "batch_size": 4}


def train_call(bundle, payload: bytes) -> bytes:
    """What the GPU function does with its pickled arguments; returns pickled results: the
    record, and the weights it saw with every delta applied (for the comparison only)."""
    history, train, target, method, settings, seed = pickle.loads(payload)
    events = run_session(
        bundle, history, make_method(method, **settings), train, target=target, seed=seed
    )
    record = [e for e in events if isinstance(e, Done)][0].record
    with applied(bundle.vision_state(), [*history.deltas(), record.delta]):
        weights = {k: v.detach().cpu().clone() for k, v in bundle.vision_state().items()}
    return pickle.dumps((record, weights))


def all_cpu(value) -> bool:
    if isinstance(value, torch.Tensor):
        return value.device.type == "cpu"
    if isinstance(value, dict):
        return all(all_cpu(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(all_cpu(v) for v in value)
    return True


def test_deltas_cross_the_boundary_bit_exactly(bundle, train_set, eval_sets):
    target, _ = eval_sets
    worker = load_bundle("tiny-random")  # the forked worker's own copy of the weights
    before = snapshot_model(bundle)
    copy = snapshot_model(worker)
    assert copy.keys() == before.keys() and all(torch.equal(before[k], copy[k]) for k in before)
    history = History(model=bundle.source)
    for index, method in enumerate(["lorsu", "spu", "lorsu-ppl"]):
        payload = pickle.dumps((history, train_set, target, method, FAST, index))
        record, worker_weights = pickle.loads(train_call(worker, payload))
        assert all_cpu([p.values for p in record.delta.values()]) and all_cpu(record.carry)
        # Nothing of the worker's training reached the main process's model.
        after = snapshot_model(bundle)
        assert all(torch.equal(before[k], after[k]) for k in before)
        history.append(record)
        with applied(bundle.vision_state(), history.deltas()):
            for name, param in bundle.vision_state().items():
                assert torch.equal(param.detach(), worker_weights[name]), (index, name)
        after = snapshot_model(bundle)
        assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_worker_session_equals_the_same_session_in_process(bundle, train_set, eval_sets):
    target, _ = eval_sets
    history = History(model=bundle.source)
    payload = pickle.dumps((history, train_set, target, "lorsu", FAST, 7))
    remote, _ = pickle.loads(train_call(load_bundle("tiny-random"), payload))
    events = run_session(
        bundle, history, make_method("lorsu", **FAST), train_set, target=target, seed=7
    )
    local = [e for e in events if isinstance(e, Done)][0].record
    assert sorted(remote.delta) == sorted(local.delta)
    for name, patch in local.delta.items():
        assert torch.equal(patch.values, remote.delta[name].values), name
