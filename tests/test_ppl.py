"""LoRSU-Ppl: the VLM's answer loss, through the frozen LLM, into the encoder (tiny models)."""

import pytest
import torch
from conftest import COLOURS, changed_keys, colour_set, snapshot_model

from lorsu_demo import vqa
from lorsu_demo.delta import applied
from lorsu_demo.evaluate import EvalSet
from lorsu_demo.history import History
from lorsu_demo.methods import METHODS, make_method
from lorsu_demo.model import build_tiny_random
from lorsu_demo.session import OBJECTIVES, run_session

QUESTIONS = [vqa.PPL_PROMPT.format(question="What is in the image?")] * 4
ANSWERS = ["This is a red", "This is a green", "This is a blue yellow", "This is a"]


@pytest.fixture(scope="module")
def words_bundle():
    """tiny-random whose LLM vocabulary knows the class names."""
    torch.set_num_threads(1)
    return build_tiny_random(seed=3, words=list(COLOURS))


def fc1_weights(bundle):
    return [layer.mlp.fc1.weight for layer in bundle.layers]


def answer_gradients(bundle, pixels, chunk):
    params = fc1_weights(bundle)
    for p in params:
        p.requires_grad_(True)
        p.grad = None
    try:
        loss = vqa.vlm_answer_loss(bundle, pixels, QUESTIONS, ANSWERS, chunk=chunk)
        (0.5 * loss).backward()
        return loss.detach(), [None if p.grad is None else p.grad.clone() for p in params]
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None


def test_registered():
    assert METHODS["lorsu-ppl"].objective == "ppl"
    assert OBJECTIVES["ppl"] is vqa.answer_loss


def test_prompt_and_labels_cover_only_the_answer(words_bundle):
    batch = vqa.answer_batch(words_bundle, QUESTIONS[:2], ANSWERS[:2])
    tokenizer = words_bundle.processor.tokenizer
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert int((ids[0] == image_id).sum()) == vqa.image_token_count(words_bundle)
    answer = tokenizer(ANSWERS[0], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    assert labels[0][labels[0] != vqa.IGNORE].tolist() == answer
    first = int((labels[0] != vqa.IGNORE).nonzero()[0])
    prompt = tokenizer.decode(ids[0, :first]).replace(" :", ":").replace(" ,", ",")
    # (the tiny vocabulary lacks "to": it reads <unk>)
    assert "based on the image, respond" in prompt and "with a short answer:" in prompt
    assert prompt.endswith("what is in the image ? assistant:")
    assert batch["start"] == first
    assert (labels[mask == 0] == vqa.IGNORE).all()


def test_loss_equals_the_vlms_own_loss(words_bundle):
    torch.manual_seed(0)
    pixels = torch.randn(4, 3, 32, 32)
    batch = vqa.answer_batch(words_bundle, QUESTIONS, ANSWERS)
    with torch.no_grad():
        ours = vqa.vlm_answer_loss(words_bundle, pixels, QUESTIONS, ANSWERS)
        reference = words_bundle.vlm(
            input_ids=batch["input_ids"],
            pixel_values=pixels,
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
        ).loss
    assert float(ours) == pytest.approx(float(reference), rel=1e-5)


def test_gradient_reaches_the_layers_llava_reads_and_chunks_do_not_change_it(words_bundle):
    torch.manual_seed(1)
    pixels = torch.randn(4, 3, 32, 32)
    loss, grads = answer_gradients(words_bundle, pixels, chunk=None)
    read = words_bundle.layers_read_by_vlm
    assert read == words_bundle.num_layers - 1
    assert all(g is not None and g.abs().sum() > 0 for g in grads[:read])
    assert grads[read] is None  # the last layer never changes an answer
    for chunk in (1, 3):
        chunked_loss, chunked = answer_gradients(words_bundle, pixels, chunk=chunk)
        assert float(chunked_loss) == pytest.approx(float(loss), rel=1e-6)
        for a, b in zip(chunked[:read], grads[:read]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
        assert chunked[read] is None
    # Nothing of the LLM or projector received a gradient.
    assert all(p.grad is None for p in words_bundle.vlm.model.language_model.parameters())


def test_a_lorsu_ppl_session_end_to_end(words_bundle, train_set):
    bundle = words_bundle
    test = colour_set("test", 2, seed=2)
    target = EvalSet("target", test, list(COLOURS))
    before = snapshot_model(bundle)
    method = make_method("lorsu-ppl", lr=1e-2, epochs=2, batch_size=4)
    events = list(run_session(bundle, History(), method, train_set, target=target, reader="mc"))
    record = events[-1].record
    assert changed_keys(before, bundle) == set()
    read = bundle.layers_read_by_vlm
    assert record.layers_read == read
    assert [len(h) for h in record.selected_heads] == [2] * read + [0]
    scores = torch.tensor(record.head_scores)
    assert (scores[:read].sum(1) > 0).all() and scores[read].abs().sum() == 0
    assert record.extra["reader"] == "mc"
    assert 0 <= record.accuracies["target"] <= 100
    assert record.extra["paper_params"] == method.paper_param_count(bundle, range(read))
    # The delta touches q/k/v rows and fc1 of layers 0..L-2 only: no biases, no projection.
    assert sorted({name.split(".")[3] for name in record.delta}) == [str(i) for i in range(read)]
    assert not [n for n in record.delta if "bias" in n and "self_attn" in n]
    assert "projection.weight" not in record.delta
    with applied(bundle.vision_state(), [record.delta]):
        moved = changed_keys(before, bundle)
    assert moved and all(f"layers.{read}." not in k for k in moved)
    losses = [e.loss for e in events if e.kind == "step"]
    assert len(losses) == 2 * 3 and all(torch.isfinite(torch.tensor(losses)))
