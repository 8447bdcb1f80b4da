"""Per-class confidence for one image, from both readers, for a version of a history and the base.

- CLIP: the softmax of CLIP's zero-shot logits (`logit_scale` times the cosine between the image
  and each class's caption embedding, the same captions and templates as the "clip" reader).
- The chat model: the multiple-choice prompt of the "mc" reader (`vqa.mc_prompt`), and the
  probability of each option's letter as the first token of the answer, a softmax over the
  option letters' next-token logits only. The reader takes the greedy answer; its letter is the
  letter with the highest probability here whenever the greedy first token is a letter.

The mc prompt has at most five options. With more classes, the options are the five classes
with the highest CLIP probability (averaged over the versions read), so that the adapted and
the base model answer the very same question and their bars compare.

`confidence` applies the deltas for its call only, under the model's lock, and restores the
weights bit for bit (`delta.applied`), like `chat.answer`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from .chat import vlm_inputs
from .data import normalise, open_image, to_unit_pixels
from .delta import applied
from .evaluate import class_text_features
from .vqa import DEFAULT_QUESTION, LETTERS, mc_prompt


class ConfidenceError(ValueError):
    """Bad input for a confidence reading (no classes, repeated classes, ...)."""


@dataclass
class Reading:
    """One model version's confidence for one image."""

    classes: list[str]  # CLIP's classes, in the order given
    clip: list[float]  # CLIP's probability of each class (sums to 1)
    options: list[str]  # the multiple-choice options; option i has the letter LETTERS[i]
    mc: list[float]  # the chat model's probability of each option's letter (sums to 1)
    prompt: str  # the multiple-choice question as asked

    def to_dict(self) -> dict:
        return asdict(self)


def check_classes(classes: Sequence[str]) -> list[str]:
    classes = [str(c) for c in classes]
    if len(classes) < 2:
        raise ConfidenceError("Confidence needs at least two class names to choose between.")
    if len(set(classes)) != len(classes):
        raise ConfidenceError("Each class name may appear only once.")
    return classes


@torch.no_grad()
def clip_probabilities(
    bundle, images, classes: Sequence[str], templates: Sequence[str] | None = None
) -> torch.Tensor:
    """(images, classes): CLIP's softmax over `classes` with the model as it is now."""
    classes = check_classes(classes)
    texts = class_text_features(bundle, classes, list(templates or bundle.caption_templates))
    pictures = [open_image(i) for i in images]
    pixels = normalise(
        to_unit_pixels(pictures, bundle.clip_image_processor), bundle.clip_image_processor
    )
    features = bundle.image_features(pixels)
    logits = bundle.logit_scale * features @ texts.to(features.device).T
    return logits.softmax(-1).cpu()


def letter_token_ids(tokenizer, letters: str = LETTERS) -> list[list[int]]:
    """For each letter, the token ids that spell it alone as the first token of an answer
    (with and without a leading space: tokenizers differ on which one an answer starts with).
    Refuses letters that have no single-token spelling or share one with another letter."""
    ids = []
    for letter in letters:
        spellings = {
            tuple(tokenizer(text, add_special_tokens=False).input_ids)
            for text in (letter, " " + letter)
        }
        single = sorted({s[0] for s in spellings if len(s) == 1})
        if not single:
            raise ConfidenceError(f"This tokenizer has no single token for the letter {letter!r}.")
        ids.append(single)
    seen = [i for group in ids for i in group]
    if len(seen) != len(set(seen)):
        raise ConfidenceError("This tokenizer spells two option letters with the same token.")
    return ids


@torch.no_grad()
def letter_probabilities(bundle, images, prompts: Sequence[str], options: int) -> torch.Tensor:
    """(images, options): the chat model's probability of each of the first `options` letters
    as the next token after its prompt, with the model as it is now."""
    if not 1 < options <= len(LETTERS):
        raise ConfidenceError(f"A multiple-choice question has 2 to {len(LETTERS)} options.")
    inputs = vlm_inputs(bundle, list(images), list(prompts))
    # Left padding, as generation does: the position ids generation would use, so the first
    # token's logits are the ones the greedy reader picks from.
    mask = inputs["attention_mask"]
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    out = bundle.vlm(**inputs, position_ids=positions, logits_to_keep=1)
    logits = out.logits[:, -1].float()
    groups = letter_token_ids(bundle.processor.tokenizer, LETTERS[:options])
    # A letter's score: all its spellings together (log-sum-exp of their logits).
    scores = torch.stack(
        [logits[:, torch.tensor(g, device=logits.device)].logsumexp(-1) for g in groups], -1
    )
    return scores.softmax(-1).cpu()


def pick_options(
    classes: list[str], clip_rows: Sequence[Sequence[float]], limit: int = len(LETTERS)
) -> list[str]:
    """All classes when they fit in one question; else the `limit` classes with the highest
    mean CLIP probability over `clip_rows`, in the order of `classes`."""
    if len(classes) <= limit:
        return list(classes)
    mean = torch.tensor([list(r) for r in clip_rows], dtype=torch.float64).mean(0)
    top = set(mean.topk(limit).indices.tolist())
    return [c for i, c in enumerate(classes) if i in top]


def confidence(
    bundle,
    image,
    classes: Sequence[str],
    deltas=(),
    *,
    templates: Sequence[str] | None = None,
    question: str = DEFAULT_QUESTION,
    with_base: bool = True,
) -> dict[str, Reading]:
    """{"adapted": Reading, "base": Reading} (no "base" without `with_base`) for one image.
    "adapted" is the model with `deltas` applied (none: the base model itself). Takes the
    model's lock; the weights are exactly as before when it returns or raises."""
    classes = check_classes(classes)
    image = open_image(image)
    versions = {"adapted": list(deltas)}
    if with_base:
        versions["base"] = []
    state = bundle.vision_state()
    with bundle.lock:
        # Every version's CLIP row first: they choose the options the chat model is asked.
        clip = {}
        for name, version in versions.items():
            with applied(state, version):
                clip[name] = clip_probabilities(bundle, [image], classes, templates)[0]
        options = pick_options(classes, [row.tolist() for row in clip.values()])
        prompt = mc_prompt(question, options)
        out = {}
        for name, version in versions.items():
            with applied(state, version):
                mc = letter_probabilities(bundle, [image], [prompt], len(options))[0]
            out[name] = Reading(classes, clip[name].tolist(), options, mc.tolist(), prompt)
    return out
