"""LLaVA-1.5 at its real sizes on the meta device: no weights, no memory, no GPU."""

import json
from types import SimpleNamespace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lorsu_demo import arch, bench
from lorsu_demo.cli import main
from lorsu_demo.delta import Delta
from lorsu_demo.methods import make_method
from lorsu_demo.methods.lorsu import QKV
from lorsu_demo.model import keep_encoder_fp32

LAYERS, HEADS, HEAD_DIM, WIDTH, MLP = 24, 16, 64, 1024, 4096


@pytest.fixture(scope="module")
def meta_bundle():
    bundle = arch.build_bundle("llava-1.5-7b", "meta", torch.bfloat16)
    keep_encoder_fp32(bundle)
    return bundle


@pytest.fixture(scope="module")
def gradients(meta_bundle):
    """Seeded random gradients (fp16 to halve their 350 MB) for every q/k/v and fc1 weight."""
    generator = torch.Generator().manual_seed(0)
    state = meta_bundle.vision_state()
    names = [bench_name(l, f"self_attn.{p}.weight") for l in range(LAYERS) for p in QKV]
    names += [bench_name(l, "mlp.fc1.weight") for l in range(LAYERS)]
    return {n: torch.randn(state[n].shape, generator=generator).half() for n in names}


def bench_name(layer, suffix):
    return f"vision.encoder.layers.{layer}.{suffix}"


def meta_context(bundle, method, gradients, seed=0):
    """What prepare/footprint/install read; the importance pass is replaced by `gradients`."""
    calls = []

    def importance_gradient(names, objective="clip"):
        calls.append(objective)
        return {n: gradients[n] for n in names}

    return SimpleNamespace(
        bundle=bundle,
        method=method,
        seed=seed,
        importance_gradient=importance_gradient,
        calls=calls,
    )


def test_published_configurations():
    clip = arch.clip_config("llava-1.5-7b")
    llava = arch.llava_config("llava-1.5-7b")
    vision, text, llm = llava.vision_config, clip.text_config, llava.text_config
    assert (vision.hidden_size, vision.intermediate_size) == (1024, 4096)
    assert (vision.num_hidden_layers, vision.num_attention_heads) == (24, 16)
    assert (vision.image_size, vision.patch_size, vision.hidden_act) == (336, 14, "quick_gelu")
    assert vision.projection_dim == 768
    assert (llm.hidden_size, llm.intermediate_size, llm.num_hidden_layers) == (4096, 11008, 32)
    assert (llm.num_attention_heads, llm.vocab_size) == (32, 32064)
    assert (llava.image_token_index, llava.vision_feature_layer) == (32000, -2)
    assert llava.projector_hidden_act == "gelu"
    assert (text.hidden_size, text.intermediate_size, text.num_hidden_layers) == (768, 3072, 12)
    assert (text.num_attention_heads, text.vocab_size, text.max_position_embeddings) == (
        12,
        49408,
        77,
    )
    assert clip.projection_dim == 768 and clip.vision_config.hidden_size == 1024
    big = arch.llava_config("llava-1.5-13b").text_config
    assert (big.hidden_size, big.intermediate_size, big.num_hidden_layers) == (5120, 13824, 40)
    assert big.num_attention_heads == 40
    assert arch.ARCHS["llava-1.5-7b"].preset.clip == "openai/clip-vit-large-patch14-336"


def test_bundle_at_real_size_shares_one_encoder(meta_bundle):
    bundle = meta_bundle
    assert bundle.clip.vision_model is bundle.vlm.model.vision_tower
    assert all(p.is_meta for p in bundle.vlm.parameters())
    assert (bundle.num_layers, bundle.num_heads, bundle.head_dim) == (LAYERS, HEADS, HEAD_DIM)
    assert bundle.image_size == 336
    assert bundle.layers_read_by_vlm == 23  # LLaVA reads layer -2: layer 23 never changes answers
    assert bundle.logit_scale == pytest.approx(100.0)
    counts = arch.parameter_counts(bundle)
    assert 7.0e9 < counts["vlm"] < 7.1e9
    assert 303e6 < counts["vision_encoder"] < 304e6
    state = bundle.vision_state()
    assert sum(p.numel() for p in state.values()) == counts["vision_encoder"] + 768 * 1024
    # The precision policy: the encoder (what sessions change) in fp32, the LLM in bf16.
    assert state["vision.encoder.layers.0.mlp.fc1.weight"].dtype == torch.float32
    assert bundle.vlm.model.language_model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    bundle_13b = arch.build_bundle("llava-1.5-13b")
    assert arch.parameter_counts(bundle_13b)["vlm"] > 13e9
    assert bundle_13b.layers_read_by_vlm == 23


def test_vision_forward_flops_match_the_architecture(meta_bundle):
    with FlopCounterMode(display=False) as counter:
        meta_bundle.image_features(torch.zeros(1, 3, 336, 336))
    tokens = (336 // 14) ** 2 + 1
    per_layer = 4 * 2 * tokens * WIDTH**2 + 2 * 2 * tokens * WIDTH * MLP + 2 * 2 * tokens**2 * WIDTH
    expected = 2 * (tokens - 1) * 3 * 14 * 14 * WIDTH + LAYERS * per_layer + 2 * WIDTH * 768
    assert counter.get_total_flops() == expected  # about 0.38 TFLOPs per image


def lorsu_formula(layers, k=2, rank=64, sparsity=0.1, projection=True):
    """SPEC section 2: attention LoRA counted as the authors do (their CLIP code: min(mask,
    r * (D + 3D)) per layer; their LLaVA code, without the projection: 3 x min(mask, r * 2D)),
    fc1 mask, projection LoRA."""
    rows = k * HEAD_DIM * WIDTH
    if projection:
        attention = layers * min(3 * rows, rank * 4 * WIDTH)
    else:
        attention = layers * 3 * min(rows, rank * 2 * WIDTH)
    fc1 = layers * round(sparsity * MLP * WIDTH)
    return attention + fc1 + (rank * (WIDTH + 768) if projection else 0)


def test_lorsu_at_real_size(meta_bundle, gradients):
    method = make_method("lorsu")
    ctx = meta_context(meta_bundle, method, gradients)
    method.prepare(ctx)
    report = method.report(ctx)
    scores = torch.tensor(report["head_scores"])
    assert scores.shape == (LAYERS, HEADS)
    assert all(len(h) == 2 for h in report["selected_heads"])  # exactly k per layer
    for layer, heads in enumerate(report["selected_heads"]):
        assert set(heads) == set(scores[layer].topk(2).indices.tolist())
    assert report["paper_params"] == lorsu_formula(LAYERS)
    assert 16.4e6 < report["paper_params"] < 16.6e6  # "about 16.5 M of 304 M"
    footprint = method.footprint(ctx)
    state = meta_bundle.vision_state()
    size = bench.delta_nbytes(footprint, state)
    rows = LAYERS * 3 * 2 * HEAD_DIM * WIDTH  # q, k, v rows of the selected heads
    fc1 = LAYERS * round(0.1 * MLP * WIDTH)
    values = rows + LAYERS * 3 * WIDTH + fc1 + LAYERS * MLP + 768 * WIDTH  # + biases, projection
    assert sum(r.size for r in footprint.values()) == values
    assert size > 4 * values  # fp32 values plus row indices and packed fc1 masks
    trainable = method.install(ctx)
    try:
        assert all(p.is_meta and p.requires_grad for p in trainable)
        lora_b = [p for p in trainable if p.shape == (WIDTH, 64)]
        assert len(lora_b) == LAYERS * 3
        assert method.masks[lora_b[0]].shape == (WIDTH, 1)
    finally:
        method.remove(ctx)
        for p in trainable:
            p.requires_grad_(False)
    assert type(meta_bundle.layers[0].self_attn.q_proj) is torch.nn.Linear  # adapters removed


def test_lorsu_ppl_adapts_only_the_layers_llava_reads(meta_bundle, gradients):
    method = make_method("lorsu-ppl")
    ctx = meta_context(meta_bundle, method, gradients)
    method.prepare(ctx)
    assert ctx.calls == ["ppl"]  # scored with its own loss
    report = method.report(ctx)
    assert [len(h) for h in report["selected_heads"]] == [2] * 23 + [0]
    assert torch.tensor(report["head_scores"])[23].abs().sum() == 0
    assert report["paper_params"] == lorsu_formula(23, projection=False)
    footprint = method.footprint(ctx)
    assert not [n for n in footprint if ".layers.23." in n or "bias" in n and "self_attn" in n]
    assert "projection.weight" not in footprint


@pytest.mark.parametrize(
    "name, heads", [("lorsu-rand", 2), ("lorsu-aah", HEADS), ("spu", 0), ("lora", 0), ("full", 0)]
)
def test_other_methods_at_real_size(meta_bundle, gradients, name, heads):
    method = make_method(name)
    ctx = meta_context(meta_bundle, method, gradients)
    method.prepare(ctx)
    report = method.report(ctx)
    assert [len(h) for h in report["selected_heads"]] == [heads] * LAYERS
    footprint = method.footprint(ctx)
    state = meta_bundle.vision_state()
    changed = sum(r.size for r in footprint.values())
    if name == "spu":
        assert changed == LAYERS * (round(0.1 * MLP * WIDTH) + MLP) + 768 * WIDTH
    if name in ("lora", "full"):
        assert changed == sum(state[n].numel() for n in footprint)
    assert bench.delta_nbytes(footprint, state) >= 4 * changed
    trainable = method.install(ctx)
    try:
        assert trainable and all(p.requires_grad for p in trainable)
        if name == "full":
            assert sum(p.numel() for p in trainable) == sum(p.numel() for p in state.values())
        if name == "lora":
            assert sum(p.numel() for p in trainable) == 8 * (
                LAYERS * (4 * 2 * WIDTH + 2 * (WIDTH + MLP)) + WIDTH + 768
            )
    finally:
        method.remove(ctx)
        for p in trainable:
            p.requires_grad_(False)


def test_delta_size_formula_matches_a_real_delta(bundle, train_set):
    from lorsu_demo.session import SessionContext

    method = make_method("lorsu", heads=1)
    ctx = SessionContext(bundle, train_set, sorted(train_set.classes), ["a {label}"], 0, method)
    method.prepare(ctx)
    footprint = method.footprint(ctx)
    state = bundle.vision_state()
    assert bench.delta_nbytes(footprint, state) == Delta.read(state, footprint).nbytes


def test_flops_of_a_session_and_the_compute_claim(capsys):
    """`bench flops` on the meta device, a shortened session: one importance batch and two
    training steps of 16 images (the full figure is in docs/benchmarks.md)."""
    argv = ["bench", "flops", "--methods", "lorsu", "full-vlm", "--json"]
    argv += ["--images", "16", "--classes", "8", "--epochs", "2"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    lorsu, full_vlm = result["methods"]["lorsu"], result["methods"]["full-vlm"]
    assert result["session"]["images"] == 16
    assert lorsu["steps"] == {"importance": 1, "training": 2}
    assert full_vlm["steps"] == {"training": 2}  # no importance pass
    assert lorsu["trainable_params"] == lorsu_formula(LAYERS)
    assert full_vlm["trainable_params"] == result["params"]["vlm"]
    forward = 16 * 0.3819e12  # the encoder's forward over 16 images, in FLOPs
    training = lorsu["tflops_by_phase"]["training"] * 1e12 / 2
    # A training step: the forward, the input gradients back to layer 0 and the weight
    # gradients of q/k/v LoRA and fc1: between two and three forwards.
    assert 2 * forward < training < 3 * forward
    assert sum(lorsu["tflops_by_phase"].values()) == pytest.approx(lorsu["tflops"])
    # The LLM (about 6.7 B parameters over about 600 tokens per image) dominates a full update.
    ratio = result["ratio_full_vlm_to_lorsu"]
    assert ratio == pytest.approx(full_vlm["tflops"] / lorsu["tflops"])
    assert 10 < ratio < 40
    assert result["session"]["answer_sequence_tokens"] > 576


def test_session_bench_runs_on_a_small_bundle(bundle):
    """`bench session`'s code path (the GPU command) on tiny-random, CPU."""
    from lorsu_demo.model import load_bundle

    def factory(encoder_fp32=True):
        return bundle if encoder_fp32 else load_bundle("tiny-random")

    result = bench.time_sessions(
        "tiny-random",
        "cpu",
        ["lorsu", "lorsu-ppl"],
        images=9,
        classes=3,
        epochs=1,
        batch_size=4,
        factory=factory,
    )
    for name in ("lorsu", "lorsu-ppl"):
        row = result["methods"][name]
        assert set(row["seconds_by_phase"]) >= {"scoring", "training", "merging", "evaluating"}
        assert row["delta_bytes"] > 0 and 0 < row["footprint_values_moved"] <= 1
    assert set(result["readers"]) == {"clip", "mc", "open"}
    assert "lorsu_with_bf16_encoder" in result


def test_four_bit_mode_says_what_it_needs(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as on a machine without it
    with pytest.raises(RuntimeError, match="pip install bitsandbytes"):
        arch.quantize_llm_4bit(arch.build_bundle("llava-1.5-7b"), "cuda")
    assert set(arch.MEMORY_MODES) == {"bf16", "4bit"}
