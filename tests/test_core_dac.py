import torch
from conftest import changed_keys, snapshot_model

from lorsu_demo.history import History
from lorsu_demo.methods import make_method
from lorsu_demo.session import SessionContext, run_session

FAST = {
    "lr": 1e-2,
    "iterations": 5,  # DAC trains by steps, as its authors (500 at full scale)
    "batch_size": 4,
    "rank": 6,
    "experts_per_image": 3,
    "experts_per_batch": 3,
    "experts_merged": 2,
    "ago_columns": 2,
}


def session(bundle, history, train, eval_sets, seed=0):
    target, control = eval_sets
    events = list(
        run_session(
            bundle,
            history,
            make_method("dac", **FAST),
            train,
            target=target,
            controls=[control],
            seed=seed,
        )
    )
    history.append(events[-1].record)
    return events[-1].record


def test_only_the_most_activated_experts_are_merged(bundle, train_set, eval_sets):
    history = History()
    base = {k: v.detach().clone() for k, v in bundle.vision_state().items()}
    first = session(bundle, history, train_set, eval_sets)
    name = "vision.encoder.layers.1.mlp.fc1.weight"
    update = first.delta[name].values - base[name]
    assert 0 < torch.linalg.matrix_rank(update) <= 2
    assert first.carry[f"up/{name}"].shape == (base[name].shape[0], 2)
    votes = first.extra["expert_votes"]
    assert len(votes) == bundle.num_layers and all(sum(v) > 0 for v in votes)
    second = session(bundle, history, train_set, eval_sets, seed=1)
    assert second.carry[f"up/{name}"].shape[1] == 4


def test_router_learns_and_ago_loss_uses_earlier_up_factors(bundle, train_set, eval_sets):
    history = History()
    first = session(bundle, history, train_set, eval_sets)
    before = snapshot_model(bundle)
    method = make_method("dac", **FAST)
    ctx = SessionContext(
        bundle,
        train_set,
        sorted(train_set.classes),
        bundle.caption_templates,
        0,
        method,
        first.carry,
    )
    trainable = method.install(ctx)
    try:
        # B starts at zero, as in LoRA, so nothing reaches the router before B has moved.
        for module in method.experts.values():
            module.up.data.normal_()
        pixels, labels, texts = next(ctx.epoch_batches())
        bundle.clip.train()
        ctx.loss(pixels, labels, texts).backward()
        ago = method.extra_loss(ctx)
        assert ago is not None and float(ago.detach()) > 0
        router = method.routers[0].score.weight
        assert router.grad is not None and router.grad.abs().sum() > 0
    finally:
        bundle.clip.eval()
        method.remove(ctx)
        for p in trainable:
            p.requires_grad_(False)
    assert changed_keys(before, bundle) == set()
    assert (
        make_method("dac", **FAST).extra_loss(
            SessionContext(
                bundle, train_set, sorted(train_set.classes), bundle.caption_templates, 0, method
            )
        )
        is None
    )
