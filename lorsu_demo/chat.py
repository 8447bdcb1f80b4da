"""Asking the VLM about an image, with any session's deltas applied only for the call."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from .data import open_image
from .delta import applied

MAX_NEW_TOKENS = 48


def prompt_for(processor, question: str) -> str:
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
    ]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def vlm_inputs(bundle, images, questions: list[str]):
    processor = bundle.processor
    prompts = [prompt_for(processor, q) for q in questions]
    images = [open_image(i) for i in images]
    padding_side = processor.tokenizer.padding_side
    processor.tokenizer.padding_side = "left"  # generation continues every row at its end
    try:
        inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    finally:
        processor.tokenizer.padding_side = padding_side
    inputs = inputs.to(bundle.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(bundle.dtype)
    return inputs


@torch.no_grad()
def generate_answers(
    bundle, images, questions: list[str], max_new_tokens: int = MAX_NEW_TOKENS
) -> list[str]:
    """Greedy answers for a batch, on the model as it is now (the caller applies deltas)."""
    inputs = vlm_inputs(bundle, images, questions)
    return decode_answers(bundle, inputs, generate_tokens(bundle, inputs, max_new_tokens))


def generate_tokens(bundle, inputs, max_new_tokens: int) -> torch.Tensor:
    """The VLM's greedy output for prepared inputs (no tokenizer: safe beside another call)."""
    return bundle.vlm.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=bundle.processor.tokenizer.pad_token_id,
    )


def decode_answers(bundle, inputs, output: torch.Tensor) -> list[str]:
    new = output[:, inputs["input_ids"].shape[1] :]
    return [
        t.strip() for t in bundle.processor.tokenizer.batch_decode(new, skip_special_tokens=True)
    ]


def answer(bundle, image, question: str, deltas=(), max_new_tokens: int = MAX_NEW_TOKENS) -> str:
    with bundle.lock, applied(bundle.vision_state(), deltas):
        return generate_answers(bundle, [image], [question], max_new_tokens)[0]


class _Flag(StoppingCriteria):
    def __init__(self):
        self.stop = threading.Event()

    def __call__(self, input_ids, scores, **kwargs):
        return self.stop.is_set()


def stream_answer(
    bundle, image, question: str, deltas=(), max_new_tokens: int = MAX_NEW_TOKENS
) -> Iterator[str]:
    """Yield the answer as it grows. The deltas stay applied until generation has ended, even
    when the consumer stops early."""
    inputs = vlm_inputs(bundle, [image], [question])
    streamer = TextIteratorStreamer(
        bundle.processor.tokenizer, skip_prompt=True, skip_special_tokens=True
    )
    flag = _Flag()
    errors: list[BaseException] = []

    def work():
        try:
            with torch.no_grad():
                bundle.vlm.generate(
                    **inputs,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([flag]),
                    pad_token_id=bundle.processor.tokenizer.pad_token_id,
                )
        except BaseException as err:  # reported in the consumer's thread
            errors.append(err)
            streamer.end()

    with bundle.lock, applied(bundle.vision_state(), deltas):
        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        text, shown = "", None
        try:
            for piece in streamer:
                text += piece
                if text.strip() != shown:
                    shown = text.strip()
                    yield shown
        finally:
            flag.stop.set()
            thread.join()
        if errors:
            raise errors[0]
