import json
import math

import pytest
import torch
from conftest import changed_keys, snapshot_model
from safetensors.torch import save_file

from lorsu_demo.delta import Delta, Patch, Region, applied, apply_stack, restore
from lorsu_demo.evaluate import AccuracyMatrix
from lorsu_demo.history import History, HistoryError
from lorsu_demo.methods import make_method
from lorsu_demo.session import run_session

FAST = {"lr": 1e-2, "epochs": 2, "batch_size": 4}


def train_sessions(bundle, train_set, eval_sets, methods=("lorsu", "lorsu", "spu")):
    target, control = eval_sets
    history = History(model=bundle.source)
    states = [snapshot_model(bundle)]
    for seed, name in enumerate(methods):
        events = run_session(
            bundle,
            history,
            make_method(name, **FAST),
            train_set,
            target=target,
            controls=[control],
            seed=seed,
        )
        history.append(list(events)[-1].record)
        with applied(bundle.vision_state(), history.deltas()):
            states.append(snapshot_model(bundle))
    return history, states


@pytest.fixture
def trained(bundle, train_set, eval_sets):
    return train_sessions(bundle, train_set, eval_sets)


def assert_model_equals(bundle, state):
    assert changed_keys(state, bundle) == set()


def test_each_session_builds_on_the_previous_one(trained):
    history, states = trained
    assert [s.index for s in history.sessions] == [1, 2, 3]
    assert changed_keys_between(states[1], states[2])
    assert changed_keys_between(states[2], states[3])


def changed_keys_between(a, b):
    return {k for k in a if not torch.equal(a[k], b[k])}


def test_rollback_is_bit_exact(bundle, trained):
    history, states = trained
    for k in range(len(states)):
        with applied(bundle.vision_state(), history.deltas(k)):
            assert_model_equals(bundle, states[k])
        assert_model_equals(bundle, states[0])
    dropped = history.rollback(1)
    assert [d.index for d in dropped] == [2, 3] and len(history) == 1
    with applied(bundle.vision_state(), history.deltas()):
        assert_model_equals(bundle, states[1])
    with pytest.raises(HistoryError, match="no session 5"):
        history.rollback(5)


def test_training_after_rollback_continues_from_the_kept_session(
    bundle, trained, train_set, eval_sets
):
    history, states = trained
    history.rollback(1)
    target, control = eval_sets
    record = list(
        run_session(
            bundle,
            history,
            make_method("lorsu", **FAST),
            train_set,
            target=target,
            controls=[control],
            seed=9,
        )
    )[-1].record
    assert record.index == 2
    history.append(record)
    assert_model_equals(bundle, states[0])


def test_history_file_round_trips(bundle, trained, tmp_path):
    history, states = trained
    path = history.save(tmp_path / "h.lorsu")
    loaded = History.load(path)
    assert loaded.base == history.base
    assert [s.summary() for s in loaded.sessions] == [
        json.loads(json.dumps(s.summary())) for s in history.sessions
    ]
    for k in range(len(states)):
        with applied(bundle.vision_state(), loaded.deltas(k)):
            assert_model_equals(bundle, states[k])


def test_damaged_files_are_refused(trained, tmp_path):
    history, _ = trained
    path = history.save(tmp_path / "h.lorsu")
    data = path.read_bytes()

    flipped = bytearray(data)
    flipped[-10] ^= 0xFF
    (tmp_path / "flipped.lorsu").write_bytes(bytes(flipped))
    with pytest.raises(HistoryError, match="checksum|damaged"):
        History.load(tmp_path / "flipped.lorsu")

    (tmp_path / "short.lorsu").write_bytes(data[: len(data) // 2])
    with pytest.raises(HistoryError, match="damaged, truncated"):
        History.load(tmp_path / "short.lorsu")

    (tmp_path / "text.lorsu").write_text("hello, I am not a history")
    with pytest.raises(HistoryError):
        History.load(tmp_path / "text.lorsu")

    save_file(
        {"x": torch.zeros(3)}, str(tmp_path / "foreign.safetensors"), metadata={"format": "pt"}
    )
    with pytest.raises(HistoryError, match="not a lorsu-demo history"):
        History.load(tmp_path / "foreign.safetensors")

    with pytest.raises(HistoryError, match="does not exist"):
        History.load(tmp_path / "missing.lorsu")


def test_a_newer_format_version_is_refused(trained, tmp_path):
    history, _ = trained
    path = history.save(tmp_path / "h.lorsu")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    save_file(tensors, str(tmp_path / "v9.lorsu"), metadata={**metadata, "version": "9"})
    with pytest.raises(HistoryError, match="version 9"):
        History.load(tmp_path / "v9.lorsu")


def test_deltas_store_what_changed_not_dense_copies(trained, bundle):
    history, _ = trained
    dense_bytes = sum(p.numel() * p.element_size() for p in bundle.vision_state().values())
    lorsu = history.sessions[0]
    kinds = {patch.region.kind for patch in lorsu.delta.values()}
    assert {"rows", "mask"} <= kinds
    assert lorsu.delta_bytes < dense_bytes / 2


def test_stack_apply_and_restore_is_exact_with_overlapping_regions():
    param = torch.randn(6, 4)
    original = param.clone()
    state = {"w": param}
    first = Delta({"w": Patch(Region.of_rows((6, 4), [1, 2]), torch.randn(2, 4))})
    mask = torch.zeros(6, 4, dtype=torch.bool)
    mask[2, 1] = mask[5, 3] = True
    second = Delta({"w": Patch(Region.of_mask(mask), torch.randn(2))})
    third = Delta({"w": Patch(Region.dense((6, 4)), torch.randn(6, 4))})
    undo = apply_stack(state, [first, second])
    assert torch.equal(param[1], first["w"].values[0])
    assert param[2, 1] == second["w"].values[0] and param[5, 3] == second["w"].values[1]
    restore(state, undo)
    assert torch.equal(param, original)
    with applied(state, [first, second, third]):
        assert torch.equal(param, third["w"].values)
    assert torch.equal(param, original)


def test_accuracy_matrix_figures():
    # Two sessions, each training one set; a control set is never trained.
    matrix = AccuracyMatrix(
        sets=["s1", "s2", "control"],
        rows=[[10.0, 20.0, 80.0], [50.0, 30.0, 78.0], [40.0, 60.0, 79.0]],
        trained_at={"s1": 1, "s2": 2},
    )
    # s2 was trained in the last session: nothing after its training has fallen yet.
    assert matrix.forgetting() == {"s1": 10.0, "s2": 0.0, "control": 1.0}
    summary = matrix.summary()
    assert summary["last"] == 50.0  # mean of 40 and 60
    # MTIL: the rows after each session only (not the base row); Transfer from s2 on.
    assert summary["avg"] == pytest.approx((50 + 30 + 40 + 60) / 4)
    assert summary["transfer"] == pytest.approx(30.0)
    assert summary["bwt"] == -10.0  # only s1 was trained before the last session
    empty = AccuracyMatrix(["control"], [[80.0]], {})
    assert math.isnan(empty.summary()["avg"])


def test_a_history_keeps_the_reader_it_started_with(bundle, train_set, eval_sets):
    history, _ = train_sessions(bundle, train_set, eval_sets, methods=("lorsu",))
    target, control = eval_sets
    events = run_session(
        bundle,
        history,
        make_method("lorsu", **FAST),
        train_set,
        target=target,
        controls=[control],
        reader="mc",
    )
    with pytest.raises(HistoryError, match="'clip' reader"):
        next(events)
    assert not bundle.lock.locked()
