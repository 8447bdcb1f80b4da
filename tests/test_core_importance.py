"""The importance (scoring) pass, batched (issue 14): one forward and one backward per batch,
the same gradient as the definition worked out one batch at a time, and no value read back to
the host inside the pass (on CUDA such a read waits for the device)."""

import pytest
import torch

from lorsu_demo.data import normalise
from lorsu_demo.losses import clip_loss, logit_norm_surrogate
from lorsu_demo.methods import make_method
from lorsu_demo.methods.base import state_name
from lorsu_demo.model import Bundle
from lorsu_demo.session import SessionContext

QKV_FC1 = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "mlp.fc1.weight")


def names_of(bundle):
    return [state_name(l, s) for l in range(bundle.num_layers) for s in QKV_FC1]


def one_batch_at_a_time(bundle, ctx, names, objective, groups):
    """SPEC section 2 written out: every batch (a list of positions in the pass's order) its
    own forward and `torch.autograd.grad`, the mean of the batches' gradients weighted by
    their sizes, accumulated in float64."""
    state = bundle.vision_state()
    params = [state[n] for n in names]
    order = ctx.importance_order()
    pixels = normalise(ctx.unit_pixels[order], bundle.clip_image_processor)
    labels = ctx.label_ids[order]
    texts = ctx.text_bank[torch.arange(len(order)) % len(ctx.templates), labels]
    total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        for group in groups:
            index = torch.tensor(group)
            features = bundle.image_features(pixels[index])
            if objective == "clip":
                loss = clip_loss(features, texts[index], labels[index], bundle.logit_scale)
            else:
                loss = logit_norm_surrogate(features, texts[index], bundle.logit_scale)
            for acc, g in zip(total, torch.autograd.grad(loss, params)):
                acc += g.double() * len(group) / len(order)
    finally:
        for p in params:
            p.requires_grad_(False)
    return dict(zip(names, total))


def context(bundle, method, train):
    return SessionContext(bundle, train, sorted(train.classes), bundle.caption_templates, 5, method)


def close(a, b, tolerance=1e-5):
    scale = float(b.abs().max())
    return float((a.double() - b).abs().max()) <= tolerance * scale


@pytest.mark.parametrize("objective", ["clip", "spu"])
@pytest.mark.parametrize("batch_size", [4, 3])
def test_the_batched_pass_equals_one_batch_at_a_time(bundle, train_set, objective, batch_size):
    method = make_method("lorsu" if objective == "clip" else "spu", batch_size=batch_size)
    ctx = context(bundle, method, train_set)
    names = names_of(bundle)
    batched = ctx.importance_gradient(names, objective)
    n = len(train_set)  # 9 images: batches of 4, 4, 1 or of 3, 3, 3
    batches = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    expected = one_batch_at_a_time(bundle, ctx, names, objective, batches)
    for name in names:
        assert float(expected[name].abs().max()) > 0, name
        assert close(batched[name], expected[name]), name
    # The comparison can fail: other batches (the in-batch loss depends on what a batch holds)
    # or one image at a time give other gradients, far outside the tolerance.
    others = [list(range(n))[i::batch_size] for i in range(batch_size)]
    singles = [[i] for i in range(n)]
    for groups in (others, singles):
        wrong = one_batch_at_a_time(bundle, ctx, names, objective, groups)
        assert not all(close(batched[name], wrong[name]) for name in names)


def test_scores_from_the_batched_pass_match_the_definition(bundle, train_set):
    """LoRSU's head scores and fc1 masks from the pass equal those of the written-out
    definition (one batch at a time)."""
    method = make_method("lorsu", batch_size=4)
    ctx = context(bundle, method, train_set)
    method.prepare(ctx)
    n = len(train_set)
    batches = [list(range(i, min(i + 4, n))) for i in range(0, n, 4)]
    names = [
        state_name(l, f"self_attn.{p}_proj.weight") for l in range(bundle.num_layers) for p in "qkv"
    ]
    expected = one_batch_at_a_time(bundle, ctx, names, "clip", batches)
    heads, d = bundle.num_heads, bundle.head_dim
    scores = torch.zeros(bundle.num_layers, heads, dtype=torch.float64)
    for name, g in expected.items():
        layer = int(name.split(".")[3])
        scores[layer] += g.view(heads, d, -1).pow(2).sum((1, 2))
    assert torch.allclose(method.head_scores.double(), scores, rtol=1e-4, atol=0)
    for layer, chosen in enumerate(method.selected):
        assert chosen == sorted(scores[layer].topk(2).indices.tolist())


READS = ("item", "tolist", "__float__", "__int__", "__bool__", "numpy")


@pytest.mark.parametrize("name", ["lorsu", "spu"])
def test_the_pass_reads_nothing_back_to_the_host(bundle, train_set, monkeypatch, name):
    """Inside the pass no tensor value is read by the host (`item`, `float`, `bool`, ...):
    on CUDA each such read waits for every batch queued before it. The logit scale, a
    frozen float, is read once per session, when the context is made."""
    method = make_method(name, batch_size=4)
    reads = []
    scale = Bundle.logit_scale.fget
    monkeypatch.setattr(Bundle, "logit_scale", property(lambda b: reads.append(1) or scale(b)))
    ctx = context(bundle, method, train_set)
    assert len(reads) == 1
    names = names_of(bundle)

    def refuse(what):
        def read(self, *args, **kwargs):
            raise AssertionError(f"the importance pass read a tensor back ({what})")

        return read

    with monkeypatch.context() as patch:
        for what in READS:
            patch.setattr(torch.Tensor, what, refuse(what))
        grads = ctx.importance_gradient(names, method.objective)
    assert len(reads) == 1
    assert all(float(g.abs().sum()) > 0 for g in grads.values())
