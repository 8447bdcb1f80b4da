"""Precision under a 16-bit LLM: the encoder stays fp32 so that lr = 1e-5 updates survive."""

import pytest
import torch
from conftest import COLOURS

from lorsu_demo import vqa
from lorsu_demo.chat import answer
from lorsu_demo.evaluate import accuracy
from lorsu_demo.history import History
from lorsu_demo.methods import make_method
from lorsu_demo.model import DEFAULT_TEMPLATES, Bundle, _finish, _tie, keep_encoder_fp32
from lorsu_demo.session import run_session
from lorsu_demo.tiny import build_image_processor, build_tiny_random


def bf16_bundle(encoder_fp32: bool) -> Bundle:
    clip, vlm, clip_tokenizer, processor = build_tiny_random(seed=0, words=list(COLOURS))
    _tie(clip, vlm)
    bundle = Bundle(
        "tiny-bf16",
        vlm,
        processor,
        clip,
        clip_tokenizer,
        build_image_processor(vlm.config.vision_config.image_size),
        torch.device("cpu"),
        torch.bfloat16,
        list(DEFAULT_TEMPLATES),
    )
    if encoder_fp32:
        return _finish(bundle)  # what load_bundle does for a bf16 model
    for module in (vlm, clip):
        module.to(torch.bfloat16).eval().requires_grad_(False)
    clip.logit_scale.data = clip.logit_scale.data.float()
    return bundle


def moved_fraction(bundle, train, target) -> float:
    """The share of a lorsu session's footprint values (lr 1e-5) that the session changed."""
    state = bundle.vision_state()
    method = make_method("lorsu", lr=1e-5, epochs=2, batch_size=4)
    record = list(run_session(bundle, History(), method, train, target=target))[-1].record
    moved = total = 0
    for name, patch in record.delta.items():
        before = patch.region.read(state[name])
        moved += int((patch.values != before).sum())
        total += before.numel()
    return moved / total


@pytest.fixture(scope="module")
def mixed():
    torch.set_num_threads(1)
    return bf16_bundle(encoder_fp32=True)


def test_the_encoder_is_fp32_and_the_llm_bf16(mixed):
    assert all(p.dtype == torch.float32 for p in mixed.vision_state().values())
    assert mixed.vlm.model.language_model.embed_tokens.weight.dtype == torch.bfloat16
    assert mixed.vlm.model.multi_modal_projector.linear_1.weight.dtype == torch.bfloat16
    assert mixed.clip.text_model.embeddings.token_embedding.weight.dtype == torch.bfloat16


def test_every_path_runs_with_mixed_precision(mixed, train_set, eval_sets):
    target, _ = eval_sets
    image = target.images.items[0].image
    assert isinstance(answer(mixed, image, "What is in the image?"), str)
    for reader in ("clip", "mc", "open"):
        assert 0 <= accuracy(mixed, target, reader) <= 100
    loss = vqa.vlm_answer_loss(mixed, torch.zeros(2, 3, 32, 32), ["q", "q"], ["a red", "a"])
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_small_updates_survive_only_in_an_fp32_encoder(mixed, train_set, eval_sets):
    target, _ = eval_sets
    kept = moved_fraction(mixed, train_set, target)
    lost = moved_fraction(bf16_bundle(encoder_fp32=False), train_set, target)
    assert kept > 0.95
    assert lost < 0.5 * kept  # in bf16 weights most lr-1e-5 steps round away


def test_policy_is_applied_once_per_bundle(mixed):
    hooks = len(mixed.vlm.model.multi_modal_projector._forward_pre_hooks)
    assert hooks == 1
    bundle = bf16_bundle(encoder_fp32=False)
    keep_encoder_fp32(bundle)
    assert all(p.dtype == torch.float32 for p in bundle.vision_state().values())
