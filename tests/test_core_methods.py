import pytest
import torch
from conftest import changed_keys, snapshot_model

from lorsu_demo.delta import applied
from lorsu_demo.history import History
from lorsu_demo.losses import clip_loss
from lorsu_demo.methods import METHODS, MethodError, make_method
from lorsu_demo.session import SessionContext, run_session

FAST = {"lr": 1e-2, "epochs": 2, "batch_size": 4}


def run(bundle, history, method, train, target, control, seed=0, **kwargs):
    events = list(
        run_session(
            bundle, history, method, train, target=target, controls=[control], seed=seed, **kwargs
        )
    )
    return events, events[-1].record


def context(bundle, method, train, seed=0):
    return SessionContext(
        bundle, train, sorted(train.classes), bundle.caption_templates, seed, method
    )


def direct_head_scores(bundle, ctx, batch_size):
    """The definition, written out: mean gradient (weighted by batch size), squared row norms."""
    layers = bundle.layers
    weights = [
        getattr(layer.self_attn, p).weight
        for layer in layers
        for p in ("q_proj", "k_proj", "v_proj")
    ]
    total = [torch.zeros_like(w) for w in weights]
    from lorsu_demo.data import normalise

    # The pass's order (a seeded shuffle; tests/test_core_fidelity.py checks it).
    order = ctx.importance_order()
    pixels = normalise(ctx.unit_pixels[order], bundle.clip_image_processor)
    label_ids = ctx.label_ids[order]
    n = len(pixels)
    for w in weights:
        w.requires_grad_(True)
    try:
        for start in range(0, n, batch_size):
            part = slice(start, start + batch_size)
            labels = label_ids[part]
            texts = ctx.text_bank[torch.arange(n)[part] % len(ctx.templates), labels]
            loss = clip_loss(bundle.image_features(pixels[part]), texts, labels, bundle.logit_scale)
            grads = torch.autograd.grad(loss, weights)
            for acc, g in zip(total, grads):
                acc += g * len(labels) / n
    finally:
        for w in weights:
            w.requires_grad_(False)
    heads, d = bundle.num_heads, bundle.head_dim
    scores = torch.zeros(len(layers), heads)
    for index, g in enumerate(total):
        layer = index // 3
        for h in range(heads):
            scores[layer, h] += g[h * d : (h + 1) * d].pow(2).sum()
    return scores


@pytest.mark.parametrize("batch_size", [16, 5])
def test_head_scores_match_the_definition(bundle, train_set, batch_size):
    method = make_method("lorsu", batch_size=batch_size)
    ctx = context(bundle, method, train_set)
    method.prepare(ctx)
    expected = direct_head_scores(bundle, ctx, batch_size)
    assert method.head_scores.shape == (bundle.num_layers, bundle.num_heads)
    assert torch.allclose(method.head_scores, expected, rtol=1e-4, atol=1e-12)
    assert expected.max() > 0
    for layer, chosen in enumerate(method.selected):
        assert chosen == sorted(expected[layer].topk(2).indices.tolist())


@pytest.mark.parametrize("k", [1, 2, 3])
def test_exactly_k_heads_in_every_layer(bundle, train_set, k):
    method = make_method("lorsu", heads=k)
    method.prepare(context(bundle, method, train_set))
    assert [len(h) for h in method.selected] == [k] * bundle.num_layers
    assert all(len(set(h)) == k for h in method.selected)


def test_fc1_mask_keeps_the_top_fraction_per_layer(bundle, train_set):
    method = make_method("lorsu", sparsity=0.25)
    method.prepare(context(bundle, method, train_set))
    for mask in method.fc1_masks.values():
        assert int(mask.sum()) == round(0.25 * mask.numel())


def test_a_lorsu_session_changes_only_what_it_may(bundle, train_set, eval_sets):
    target, control = eval_sets
    before = snapshot_model(bundle)
    _, record = run(bundle, History(), make_method("lorsu", **FAST), train_set, target, control)
    assert changed_keys(before, bundle) == set(), (
        "the shared model must be restored after a session"
    )
    with applied(bundle.vision_state(), [record.delta]):
        changed = changed_keys(before, bundle)
        after = snapshot_model(bundle)
    d = bundle.head_dim
    allowed_prefixes = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.fc1")
    for key in changed:
        assert (
            key.startswith("vlm.model.vision_tower.encoder.layers.")
            or key.startswith("clip.vision_model.encoder.layers.")
            or key == "clip.visual_projection.weight"
        ), key
        if key != "clip.visual_projection.weight":
            assert any(p in key for p in allowed_prefixes), key
    # Untouched: out_proj, fc2, LayerNorms, embeddings, text tower, projector and the LLM.
    forbidden = (
        "out_proj",
        "fc2",
        "layer_norm",
        "layrnorm",
        "embeddings",
        "text_model",
        "text_projection",
        "multi_modal_projector",
        "language_model",
        "lm_head",
        "logit_scale",
    )
    assert not [k for k in changed if any(f in k for f in forbidden)]
    assert "clip.visual_projection.weight" in changed
    for layer, heads in enumerate(record.selected_heads):
        rows = torch.zeros(bundle.num_heads * d, dtype=torch.bool)
        for h in heads:
            rows[h * d : (h + 1) * d] = True
        for p in ("q_proj", "k_proj", "v_proj"):
            key = f"vlm.model.vision_tower.encoder.layers.{layer}.self_attn.{p}.weight"
            diff = (before[key] != after[key]).any(1)
            assert not diff[~rows].any(), f"{key}: rows of unselected heads changed"
            assert diff[rows].any(), f"{key}: the selected heads did not learn"
        key = f"vlm.model.vision_tower.encoder.layers.{layer}.mlp.fc1.weight"
        mask = record.delta[f"vision.encoder.layers.{layer}.mlp.fc1.weight"].region.mask()
        diff = before[key] != after[key]
        assert not diff[~mask].any(), "fc1 entries outside the mask changed"
        assert diff[mask].any()
    # The VLM and the CLIP loss see one encoder.
    assert bundle.clip.vision_model is bundle.vlm.model.vision_tower


def test_random_heads_differ_from_scored_heads(bundle, train_set, eval_sets):
    target, control = eval_sets
    chosen = {}
    for name in ("lorsu", "lorsu-rand"):
        _, record = run(
            bundle, History(), make_method(name, **FAST), train_set, target, control, seed=3
        )
        chosen[name] = record.selected_heads
    assert chosen["lorsu"] != chosen["lorsu-rand"]


def test_all_heads_ablation_selects_every_head(bundle, train_set, eval_sets):
    target, control = eval_sets
    _, record = run(bundle, History(), make_method("lorsu-aah", **FAST), train_set, target, control)
    assert record.selected_heads == [list(range(bundle.num_heads))] * bundle.num_layers


@pytest.mark.parametrize("name", ["lora", "spu", "full"])
def test_baselines_train_and_restore(bundle, train_set, eval_sets, name):
    target, control = eval_sets
    before = snapshot_model(bundle)
    events, record = run(bundle, History(), make_method(name, **FAST), train_set, target, control)
    assert changed_keys(before, bundle) == set()
    with applied(bundle.vision_state(), [record.delta]):
        changed = changed_keys(before, bundle)
    assert changed, f"{name} changed nothing"
    assert not [
        k
        for k in changed
        if "language_model" in k or "text_model" in k or "multi_modal_projector" in k
    ]
    if name == "spu":
        assert all("fc1" in k or "visual_projection" in k for k in changed)
    assert record.trainable_params > 0 and record.delta_bytes > 0


def test_lorsu_delta_is_sparse(bundle, train_set, eval_sets):
    target, control = eval_sets
    _, lorsu = run(bundle, History(), make_method("lorsu", **FAST), train_set, target, control)
    _, full = run(bundle, History(), make_method("full", **FAST), train_set, target, control)
    assert lorsu.delta.changed_values < full.delta.changed_values / 2
    assert lorsu.delta_bytes < full.delta_bytes


def test_same_seed_reproduces_a_session_bit_for_bit(bundle, train_set, eval_sets):
    target, control = eval_sets
    records = [
        run(bundle, History(), make_method("lorsu", **FAST), train_set, target, control, seed=s)[1]
        for s in (7, 7, 8)
    ]
    a, b, c = (r.delta for r in records)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k].values, b[k].values) for k in a)
    assert [r["loss"] for r in records[0].curve] == [r["loss"] for r in records[1].curve]
    assert any(not torch.equal(a[k].values, c[k].values) for k in a if k in c)


def test_events_follow_the_protocol(bundle, train_set, eval_sets):
    target, control = eval_sets
    events, record = run(
        bundle, History(), make_method("lorsu", **FAST), train_set, target, control
    )
    kinds = [e.kind for e in events]
    assert kinds[-1] == "done" and "scores" in kinds
    steps = [e for e in events if e.kind == "step"]
    assert [s.step for s in steps] == list(range(1, steps[0].total + 1))
    assert steps[0].total == 2 * 3  # 9 images, batch 4, 2 epochs
    metrics = [e for e in events if e.kind == "metrics"]
    assert metrics[-1].target_acc == record.accuracies["target"]
    assert metrics[-1].ti == pytest.approx(record.ti)
    assert set(record.seconds) >= {"scoring", "training", "merging", "evaluating"}
    for event in events:
        assert isinstance(event.to_dict(), dict)


def test_closing_the_generator_mid_session_leaves_nothing(bundle, train_set, eval_sets):
    target, control = eval_sets
    before = snapshot_model(bundle)
    events = run_session(
        bundle,
        History(),
        make_method("lorsu", **FAST),
        train_set,
        target=target,
        controls=[control],
    )
    for event in events:
        if event.kind == "step" and event.step == 3:
            break
    events.close()
    assert changed_keys(before, bundle) == set()
    assert not any(p.requires_grad for p in bundle.vlm.parameters())
    assert bundle.lock.acquire(blocking=False)
    bundle.lock.release()


def test_should_stop_ends_with_stopped_and_no_record(bundle, train_set, eval_sets):
    target, control = eval_sets
    before = snapshot_model(bundle)
    steps = []

    def stop():
        return len(steps) >= 2

    events = []
    for event in run_session(
        bundle,
        History(),
        make_method("full", **FAST),
        train_set,
        target=target,
        controls=[control],
        should_stop=stop,
    ):
        events.append(event)
        if event.kind == "step":
            steps.append(event)
    assert events[-1].kind == "stopped"
    assert not any(e.kind == "done" for e in events)
    assert changed_keys(before, bundle) == set()


def test_unknown_settings_and_methods_are_refused():
    with pytest.raises(MethodError, match="heads"):
        make_method("lora", heads=3)
    with pytest.raises(MethodError, match="Unknown method"):
        make_method("nope")
    assert {"lorsu", "lorsu-rand", "lorsu-aah", "lora", "spu", "full"} <= set(METHODS)
