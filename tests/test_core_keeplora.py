import torch

from lorsu_demo.delta import applied
from lorsu_demo.history import History
from lorsu_demo.methods import make_method
from lorsu_demo.methods.keeplora import extend_basis, principal_basis
from lorsu_demo.session import run_session

FAST = {"lr": 1e-2, "epochs": 2, "batch_size": 4}


def session(bundle, history, name, train, eval_sets, seed=0):
    target, control = eval_sets
    record = list(
        run_session(
            bundle,
            history,
            make_method(name, **FAST),
            train,
            target=target,
            controls=[control],
            seed=seed,
        )
    )[-1].record
    history.append(record)
    return record


def weight_update(record, name):
    return record.delta[name].values.float()


def test_updates_avoid_the_principal_subspace_and_past_features(bundle, train_set, eval_sets):
    history = History()
    v_proj = "vision.encoder.layers.1.self_attn.v_proj.weight"
    out_proj = "vision.encoder.layers.1.self_attn.out_proj.weight"
    before = {n: bundle.vision_state()[n].detach().clone() for n in (v_proj, out_proj)}
    first = session(bundle, history, "keeplora", train_set, eval_sets)
    for name, weight in before.items():
        update = weight_update(first, name) - weight
        assert update.abs().max() > 0
        principal = principal_basis(weight, 0.85)
        assert (update @ principal).norm() < 1e-4 * update.norm() + 1e-7
    features = first.carry["features/1/out"]
    assert features.shape[0] == before[out_proj].shape[1] and features.shape[1] >= 1
    assert torch.allclose(features.T @ features, torch.eye(features.shape[1]), atol=1e-4)
    with applied(bundle.vision_state(), history.deltas()):
        start = {n: bundle.vision_state()[n].detach().clone() for n in before}
    second = session(bundle, history, "keeplora", train_set, eval_sets, seed=1)
    update = weight_update(second, out_proj) - start[out_proj]
    assert update.abs().max() > 0
    assert (update @ features).norm() < 1e-4 * update.norm() + 1e-7
    # In this 32-wide encoder the first session's features and the principal subspace fill
    # q/k/v's whole input space: a fully protected weight must not move at all.
    assert torch.equal(second.delta[v_proj].values, start[v_proj])


def test_layer_scaling_makes_shallow_updates_smaller(bundle, train_set, eval_sets):
    plain = session(bundle, History(), "keeplora", train_set, eval_sets)
    scaled = session(bundle, History(), "keeplora++", train_set, eval_sets)
    base = bundle.vision_state()
    first = "vision.encoder.layers.0.self_attn.q_proj.weight"
    last = "vision.encoder.layers.2.self_attn.q_proj.weight"

    def size(record, name):
        return (weight_update(record, name) - base[name]).norm()

    assert size(scaled, first) / size(plain, first) < size(scaled, last) / size(plain, last)


def test_extend_basis_covers_the_requested_energy():
    torch.manual_seed(0)
    features = torch.randn(200, 3) @ torch.randn(3, 8) + 0.01 * torch.randn(200, 8)
    basis = extend_basis(None, features, 0.99)
    assert basis.shape[1] == 3
    covered = (features @ basis).pow(2).sum() / features.pow(2).sum()
    assert covered >= 0.99
