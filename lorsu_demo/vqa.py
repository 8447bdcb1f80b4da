"""Reading accuracy through the VLM's answers (SPEC section 4), and the answer loss of LoRSU-Ppl.

Two readers, registered in `evaluate.READERS`:
- "mc": 5-way multiple choice. The prompt is SPEC section 4's, the 4 distractors are drawn from
  the set's other classes and the options shuffled with a seed fixed per (set, image), so every
  evaluation of a set asks exactly the same questions. Greedy decoding; an answer is right when,
  stripped of spaces and a final period, it is the right letter (case-insensitive).
- "open": the question of LoRSU-Ppl's prompt, greedy; right when the answer names the class
  (the class name, lower-cased, appears as whole words in the lower-cased answer).

`answer_loss` is the "ppl" objective (registered in `session.OBJECTIVES`): the cross-entropy of
the answer "This is a {class}" after SPEC section 3's prompt, on the answer tokens only, computed
through the frozen LLM and projector so that its gradient reaches the vision encoder.
"""

from __future__ import annotations

import random
import re

import torch
import torch.nn.functional as F

from .chat import decode_answers, generate_answers, generate_tokens, prompt_for, vlm_inputs
from .evaluate import READERS, EvalSet, evaluation_workers, map_batches, percent

LETTERS = "ABCDE"
DEFAULT_QUESTION = "What is in the image?"
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
PPL_PROMPT = "Based on the image, respond to this question with a short answer: {question}"
PPL_ANSWER = "This is a {label}"
MC_SEED = 0
MC_MAX_NEW_TOKENS = 4
OPEN_MAX_NEW_TOKENS = 16
# Answers are left-padded and masked, so a batch's size does not change them (the toy's mc and
# open answers on every test set were checked equal at 8 and 32); 32 is a third faster on CPU.
BATCH_SIZE = 32
IGNORE = -100


def question_for(eval_set: EvalSet) -> str:
    """The set's question (an EvalSet may carry one as `question`), else the default."""
    return getattr(eval_set, "question", None) or DEFAULT_QUESTION


def display_name(label: str) -> str:
    return label.replace("_", " ")


# ---- multiple choice ------------------------------------------------------------------------


def choices_for(
    label: str, classes: list[str], key: str, seed: int = MC_SEED
) -> tuple[list[str], str]:
    """Up to 5 options (the label and up to 4 distractors from the other classes), shuffled,
    and the right letter. Deterministic in (seed, key)."""
    rng = random.Random(f"{seed}:{key}")
    others = sorted(c for c in set(classes) if c != label)
    options = rng.sample(others, min(len(LETTERS) - 1, len(others))) + [label]
    rng.shuffle(options)
    return options, LETTERS[options.index(label)]


def mc_prompt(question: str, options: list[str]) -> str:
    lines = [question]
    lines += [f"{letter}. {display_name(o)}" for letter, o in zip(LETTERS, options)]
    lines.append(MC_INSTRUCTION)
    return "\n".join(lines)


def mc_options(eval_set: EvalSet, seed: int = MC_SEED) -> list[tuple[list[str], str]]:
    """(options, right letter) for every image of the set: the choices its question offers."""
    return [
        choices_for(item.label, eval_set.classes, f"{eval_set.name}:{index}", seed)
        for index, item in enumerate(eval_set.images.items)
    ]


def mc_questions(eval_set: EvalSet, seed: int = MC_SEED) -> list[tuple[str, str]]:
    """(prompt, right letter) for every image of the set."""
    question = question_for(eval_set)
    return [
        (mc_prompt(question, options), letter) for options, letter in mc_options(eval_set, seed)
    ]


def read_letter(answer: str) -> str:
    """The answer as a letter: stripped of spaces and a final period, upper-cased."""
    return answer.strip().rstrip(".").strip().upper()


def mc_correct(
    bundle, eval_set: EvalSet, batch_size: int = BATCH_SIZE, seed: int = MC_SEED
) -> torch.Tensor:
    questions = mc_questions(eval_set, seed)
    images = [item.image for item in eval_set.images.items]
    answers = _generate(bundle, images, [q for q, _ in questions], MC_MAX_NEW_TOKENS, batch_size)
    return torch.tensor(
        [read_letter(a) == letter for a, (_, letter) in zip(answers, questions)], dtype=torch.bool
    )


def mc_accuracy(bundle, eval_set: EvalSet, seed: int = MC_SEED) -> float:
    """`seed` draws other distractors: the app and the CLI read with MC_SEED, and one draw moves
    a session's TI by a few points (docs/toyworld.md, "How much one draw of distractors
    moves the chat's figures")."""
    return percent(mc_correct(bundle, eval_set, seed=seed))


# ---- open-ended -----------------------------------------------------------------------------


def _words(text: str) -> str:
    return " ".join(re.sub(r"[^0-9a-z]+", " ", text.lower()).split())


def names_class(answer: str, label: str) -> bool:
    name = _words(display_name(label))
    return bool(name) and f" {name} " in f" {_words(answer)} "


def open_correct(bundle, eval_set: EvalSet, batch_size: int = BATCH_SIZE) -> torch.Tensor:
    prompt = PPL_PROMPT.format(question=question_for(eval_set))
    items = eval_set.images.items
    answers = _generate(
        bundle, [i.image for i in items], [prompt] * len(items), OPEN_MAX_NEW_TOKENS, batch_size
    )
    return torch.tensor([names_class(a, i.label) for a, i in zip(answers, items)], dtype=torch.bool)


def open_accuracy(bundle, eval_set: EvalSet) -> float:
    return percent(open_correct(bundle, eval_set))


def _generate(bundle, images, questions, max_new_tokens, batch_size) -> list[str]:
    parts = [slice(start, start + batch_size) for start in range(0, len(images), batch_size)]
    workers = evaluation_workers(bundle)
    if workers < 2 or len(parts) < 2:
        answers = []
        for part in parts:
            answers += generate_answers(bundle, images[part], questions[part], max_new_tokens)
        return answers
    # The batches shared between threads, as `evaluate.clip_predictions_many` shares CLIP's:
    # each is generated as it would be alone. The tokenizer runs here, on this thread (a fast
    # tokenizer refuses to be used by two threads at once).
    inputs = [vlm_inputs(bundle, images[part], questions[part]) for part in parts]
    outputs = map_batches(
        lambda prepared: generate_tokens(bundle, prepared, max_new_tokens), inputs, workers
    )
    return [a for i, o in zip(inputs, outputs) for a in decode_answers(bundle, i, o)]


# ---- the answer loss (LoRSU-Ppl) ------------------------------------------------------------


def image_token_count(bundle) -> int:
    """How many positions LLaVA gives one image (576 for ViT-L/14 at 336 px)."""
    config = bundle.vlm.config
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    return patches + (0 if config.vision_feature_select_strategy == "default" else 1)


def answer_batch(bundle, questions: list[str], answers: list[str]) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask` and `labels` (IGNORE except on the answer
    tokens and the end-of-sequence token after them), with the image tokens expanded.

    The prompt (chat template, generation prompt) and the answer are tokenized separately, so
    the labels cover exactly the answer whatever the tokenizer does at the boundary."""
    processor = bundle.processor
    tokenizer = processor.tokenizer
    image_id = tokenizer.convert_tokens_to_ids(processor.image_token)
    repeat = image_token_count(bundle)
    rows = []
    for question, answer in zip(questions, answers):
        prompt = tokenizer(prompt_for(processor, question), add_special_tokens=True).input_ids
        expanded = []
        for token in prompt:
            expanded += [token] * repeat if token == image_id else [token]
        reply = tokenizer(answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        rows.append((expanded, reply))
    length = max(len(p) + len(r) for p, r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)
    for i, (prompt, reply) in enumerate(rows):
        n = len(prompt) + len(reply)
        ids[i, :n] = torch.tensor(prompt + reply)
        mask[i, :n] = 1
        labels[i, len(prompt) : n] = torch.tensor(reply)
    answer_start = min(len(p) for p, _ in rows)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "start": answer_start}


def vlm_answer_loss(
    bundle,
    pixels: torch.Tensor,
    questions: list[str],
    answers: list[str],
    chunk: int | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of the answers' tokens given image and prompt, through the VLM.

    The same computation as `LlavaForConditionalGeneration(..., labels=...)`, written out so
    that nothing reads tensor values (it runs on the meta device for FLOP counts) and the LM
    head is applied only where answer tokens are predicted.

    `chunk`: when only the encoder (and projector) train, the LLM part runs `chunk` images at
    a time, each chunk's backward stopping at the image features; the returned loss then
    carries those feature gradients into the encoder. The gradients are the same as in one
    pass (up to summation order); the LLM's activations are held for one chunk only (a batch
    of 16 at 7B needs about 55 GB of them at once)."""
    vlm = bundle.vlm
    batch = answer_batch(bundle, questions, answers)
    pixels = pixels.to(bundle.device, bundle.dtype)
    features = vlm.model.get_image_features(pixel_values=pixels)
    features = torch.stack(list(features.pooler_output))  # (images, tokens, width)
    answer_tokens = int((batch["labels"] != IGNORE).sum())
    rows = len(answers)
    llm_trains = any(
        p.requires_grad for m in (vlm.model.language_model, vlm.lm_head) for p in m.parameters()
    )
    if (
        not chunk
        or chunk >= rows
        or llm_trains
        or not torch.is_grad_enabled()
        or not features.requires_grad
    ):
        return _answer_nll(bundle, batch, features, slice(None)) / answer_tokens
    leaf = features.detach().requires_grad_(True)
    total = torch.zeros((), device=features.device)
    for start in range(0, rows, chunk):
        part = slice(start, start + chunk)
        loss = _answer_nll(bundle, batch, leaf[part], part) / answer_tokens
        loss.backward()
        total = total + loss.detach()
    carry = (features * leaf.grad).sum()
    return carry - carry.detach() + total


def _answer_nll(bundle, batch, features, rows: slice) -> torch.Tensor:
    """Summed cross-entropy of the answer tokens of `rows` of the batch."""
    vlm = bundle.vlm
    device = bundle.device
    ids = batch["input_ids"][rows].to(device)
    attention = batch["attention_mask"][rows].to(device)
    labels = batch["labels"][rows].to(device)
    embeds = vlm.get_input_embeddings()(ids)
    image_id = bundle.processor.tokenizer.convert_tokens_to_ids(bundle.processor.image_token)
    where = (ids == image_id).unsqueeze(-1).expand_as(embeds)
    embeds = embeds.masked_scatter(where, features.reshape(-1, features.shape[-1]).to(embeds.dtype))
    hidden = vlm.model.language_model(inputs_embeds=embeds, attention_mask=attention)
    # Position t predicts token t + 1: only the positions that predict answer tokens.
    start = batch["start"] - 1
    logits = vlm.lm_head(hidden.last_hidden_state[:, start:-1]).float()
    targets = labels[:, start + 1 :]
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )


def answer_loss(ctx, pixels, labels, texts) -> torch.Tensor:
    """The "ppl" objective: `ctx.classes[labels[i]]` is image i's class."""
    question = ctx.method.hp.get("question") or DEFAULT_QUESTION
    prompt = PPL_PROMPT.format(question=question)
    answers = [PPL_ANSWER.format(label=display_name(ctx.classes[int(i)])) for i in labels]
    return vlm_answer_loss(
        ctx.bundle,
        pixels,
        [prompt] * len(answers),
        answers,
        chunk=ctx.method.hp.get("llm_chunk"),
    )


READERS["mc"] = mc_accuracy
READERS["open"] = open_accuracy
