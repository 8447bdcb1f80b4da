"""The toy world recipe: train a tiny CLIP and a tiny LLaVA from nothing, on CPU, and write assets.

    python -m lorsu_demo.toyworld.train --out assets [--seed 0] [--train-seed N]

`--seed` draws every image; `--train-seed` (default: `--seed`) draws only what training does with
them (initial weights, batches, augmentation, simulated sessions), so that several builds of one
recipe on the same data can be compared.

1. Generate the base world (printed digits and filled shapes, plus letters in many looks) and
   train a `CLIPModel` (both towers and projections) with a symmetric, multi-positive InfoNCE
   loss on image-caption pairs, on the final embedding and on the mean of the layer -2 patch
   tokens that LLaVA reads, so that what a session teaches the encoder reaches the chat.
2. Build a `LlavaForConditionalGeneration` whose vision tower is the CLIP vision encoder (same
   weights), freeze it, and train the projector and a small Llama on image-question-answer text in
   LLaVA-1.5's prompt format: "What is in this image?" -> "a {label}", "Is this a {label}?" ->
   yes/no, the 5-way multiple-choice prompt -> the letter, and the perplexity-variant prompt ->
   "this is a {label}". The stage goes on in further rounds while a kind of question is not yet
   learnt (the matching questions are learnt suddenly, after a plateau of seed-dependent length).
3. Teach the LLM to answer what CLIP says: more steps in which half of the samples are letters
   and the features of simulated sessions (copies of the encoder taught with the CLIP loss that
   some letters are base classes), labelled with CLIP's own guess instead of a true label.
4. Write `assets/toy/` (bundle.json, vlm/, clip/), `assets/control/`, `assets/domains/` and
   `assets/LICENSES.md`, then check the written world: its chat on the control set (at least
   90%), and its chat's share of CLIP's gain after one default session on each example domain
   (at least half); below either, exit status 1.

Everything is seeded; on 2 CPU cores the whole recipe takes about 34 minutes (docs/toyworld.md).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import pre_tokenizers
from transformers import CLIPModel, LlavaForConditionalGeneration

from lorsu_demo.chat import prompt_for
from lorsu_demo.data import normalise
from lorsu_demo.tiny import (
    BASE_WORDS,
    IMAGE_TOKEN,
    build_image_processor,
    build_llava_processor,
    build_word_tokenizer,
    tiny_configs,
)
from lorsu_demo.toyworld.data import (
    BASE_CLASSES,
    BASE_FIGURES,
    BASE_LOOKS,
    CAPTION_TEMPLATE,
    DIGITS,
    DOMAINS,
    IMAGE_SIZE,
    LETTER_CLASSES,
    LETTER_TEMPLATES,
    SHAPES,
    TRAIN_CAPTION_TEMPLATES,
    base_dataset,
    base_looks_dataset,
    control_dataset,
    letters_dataset,
    write_data,
)
from lorsu_demo.vqa import (
    DEFAULT_QUESTION,
    LETTERS,
    MC_INSTRUCTION,
    PPL_ANSWER,
    PPL_PROMPT,
    mc_prompt,
)

PATCH_SIZE = 8
SIZES = dict(
    image_size=IMAGE_SIZE,
    patch_size=PATCH_SIZE,
    vision_hidden=128,
    vision_layers=4,
    vision_heads=8,
    text_hidden=64,
    text_layers=2,
    llm_hidden=128,
    llm_layers=4,
    projection_dim=64,
    max_text_positions=32,
)
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2
READ_LAYER = -2  # LLaVA-1.5's vision_feature_layer
IMAGE_PROCESSOR = build_image_processor(IMAGE_SIZE)  # the one both saved models use

# The engine's own prompts (lorsu_demo.vqa) come first, so the readers ask what was trained.
OPEN_QUESTIONS = [
    DEFAULT_QUESTION,
    "What is in this image?",
    "What is shown in the image?",
    "What is this?",
    "What do you see in the image?",
]
YES_NO_QUESTIONS = ["Is this a {label}?", "Is there a {label} in the image?"]

# Session settings that suit this tiny encoder (LLaVA scale uses lr 1e-5 and 5 epochs): a
# 4-layer, 128-wide encoder needs larger and more steps for the same change. Chosen on the
# example domains with `lorsu` only; docs/toyworld.md gives the sweep.
# DAC trains by steps, as its authors: their 500 steps of batch 32 are 32 passes over their
# first few-shot set (Aircraft, 5 shots x 100 classes); a toy session (5 shots x 8-10 classes)
# gets the same 32 passes in 50 steps (docs/methods.md).
DEFAULTS = {"lr": 7e-4, "epochs": 20, "batch_size": 16, "methods": {"dac": {"iterations": 50}}}


def vocabulary() -> list[str]:
    """Every word the prompts, captions and answers use (BASE_WORDS first)."""
    texts = list(TRAIN_CAPTION_TEMPLATES) + LETTER_TEMPLATES + OPEN_QUESTIONS + YES_NO_QUESTIONS
    texts += [PPL_PROMPT, MC_INSTRUCTION, PPL_ANSWER, "yes no", "do you see", "an image of"]
    words = list(BASE_WORDS)
    split = pre_tokenizers.Whitespace()
    for text in texts:
        for word, _ in split.pre_tokenize_str(
            text.replace("{label}", "").replace("{question}", "")
        ):
            words.append(word.lower())
    words += BASE_CLASSES + LETTER_CLASSES
    seen: dict[str, None] = {}
    for w in words:
        seen.setdefault(w, None)
    return list(seen)


def build_models(seed: int, **size_overrides):
    sizes = {**SIZES, **size_overrides}
    words = vocabulary()
    tokenizer = build_word_tokenizer(words)
    clip_tokenizer = build_word_tokenizer(
        words, model_max_length=sizes["max_text_positions"], add_eos=True
    )
    assert tokenizer.get_vocab() == clip_tokenizer.get_vocab()
    clip_config, llava_config = tiny_configs(
        vocab_size=len(tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **sizes,
    )
    # Tied input/output embeddings: the word the LLM would say for an image and the same word in the
    # prompt share one vector, which makes the matching tasks (yes/no, multiple choice) learnable
    # in a few thousand steps.
    llava_config.tie_word_embeddings = True
    llava_config.text_config.tie_word_embeddings = True
    torch.manual_seed(seed)
    clip = CLIPModel(clip_config)
    vlm = LlavaForConditionalGeneration(llava_config)
    # Eager attention is the faster kernel on CPU at these sequence lengths (about 17-70 tokens).
    clip.set_attn_implementation("eager")
    vlm.set_attn_implementation("eager")
    processor = build_llava_processor(tokenizer, IMAGE_SIZE, PATCH_SIZE)
    return clip, vlm, clip_tokenizer, tokenizer, processor


# ---------------------------------------------------------------------------------------------
# Images


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [0, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] pixels -> pixel_values, as the engine normalises them (`lorsu_demo.data`)."""
    return normalise(x, IMAGE_PROCESSOR)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random resized crop (scale 0.8-1, small shift), colour jitter (p=0.8), greyscale (p=0.2)."""
    n = x.shape[0]

    def u(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(*(shape or (n,)), generator=gen)

    s = u(0.8, 1.0).sqrt()
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = s
    theta[:, 1, 1] = s
    theta[:, :, 2] = (torch.rand(n, 2, generator=gen) * 2 - 1) * (1 - s[:, None] + 0.06)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    jitter = (torch.rand(n, generator=gen) < 0.8).float().view(n, 1, 1, 1)
    grey = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    b = u(0.7, 1.3).view(n, 1, 1, 1)
    c = u(0.7, 1.3).view(n, 1, 1, 1)
    sat = u(0.6, 1.4).view(n, 1, 1, 1)
    y = x * b
    mean = y.mean(dim=(1, 2, 3), keepdim=True)
    y = (y - mean) * c + mean
    g = (y * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    y = g + (y - g) * sat
    x = jitter * y + (1 - jitter) * x
    to_grey = (torch.rand(n, generator=gen) < 0.2).float().view(n, 1, 1, 1)
    grey = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    x = to_grey * grey.expand_as(x) + (1 - to_grey) * x
    return x.clamp(0, 1)


# ---------------------------------------------------------------------------------------------
# CLIP


def clip_features(clip: CLIPModel, pixel_values=None, input_ids=None, attention_mask=None):
    out = []
    if pixel_values is not None:
        v = clip.visual_projection(clip.vision_model(pixel_values=pixel_values).pooler_output)
        out.append(F.normalize(v, dim=-1))
    if input_ids is not None:
        t = clip.text_projection(
            clip.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        )
        out.append(F.normalize(t, dim=-1))
    return out[0] if len(out) == 1 else tuple(out)


def multi_positive_clip_loss(img, txt, labels, scale: float) -> torch.Tensor:
    logits = scale * img @ txt.T
    pos = (labels[:, None] == labels[None, :]).float()
    target = pos / pos.sum(1, keepdim=True)
    li = -(target * logits.log_softmax(1)).sum(1).mean()
    lt = -(target * logits.T.log_softmax(1)).sum(1).mean()
    return (li + lt) / 2


def cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def clip_training_set(n_base: int, n_letters: int, seed: int):
    """Base images of the 18 classes and letters in many looks, with each class's captions."""
    images, labels = base_dataset(n_base, seed, split="clip")
    captions = [[t.format(label=c) for t in TRAIN_CAPTION_TEMPLATES] for c in BASE_CLASSES]
    if n_letters:
        letter_images, letter_labels = letters_dataset(n_letters, seed, split="clip")
        images = np.concatenate([images, letter_images])
        labels = np.concatenate([labels, letter_labels + len(BASE_CLASSES)])
        captions += [[t.format(label=c) for t in LETTER_TEMPLATES] for c in LETTER_CLASSES]
    return images, labels, captions


def read_layer_embedding(clip: CLIPModel, hidden_states) -> torch.Tensor:
    """The CLIP embedding of the tokens LLaVA reads: layer -2's patch tokens, mean-pooled, through
    the encoder's own final norm and projection."""
    return F.normalize(
        clip.visual_projection(read_layer_pooled(clip.vision_model, hidden_states)), dim=-1
    )


def read_layer_pooled(vision, hidden_states) -> torch.Tensor:
    """Layer -2's patch tokens, mean-pooled, through the encoder's final norm: the read layer's
    counterpart of `pooler_output`."""
    return vision.post_layernorm(hidden_states[READ_LAYER][:, 1:].mean(1))


def train_clip(
    clip,
    clip_tokenizer,
    images,
    labels,
    captions,
    *,
    steps,
    batch,
    lr,
    seed,
    read_weight=0.0,
    skip_last=0.0,
    log=print,
):
    """`captions[c]` lists class c's captions (the same number for every class).

    `read_weight` adds the same contrastive loss on the mean of the patch tokens LLaVA reads
    (layer -2): it makes what the chat model sees mean the class in every look, as a real CLIP's
    late patch tokens do, so that what a session teaches the encoder reaches the chat.
    `skip_last` is the fraction of images whose embedding skips the last encoder layer (the one
    LLaVA does not read): the layers below learn to carry the whole embedding, so a session's
    change cannot live in the last layer alone."""
    gen = torch.Generator().manual_seed(seed)
    pixels = to_pixels(images)
    labels_t = torch.from_numpy(labels)
    n_t = len(captions[0])
    enc = clip_tokenizer(
        sum(captions, []), padding="max_length", max_length=16, return_tensors="pt"
    )
    ids = enc.input_ids.view(len(captions), n_t, -1)
    mask = enc.attention_mask.view(len(captions), n_t, -1)
    clip.logit_scale.requires_grad_(False)  # fixed at 100, OpenAI CLIP's trained value
    scale = clip.logit_scale.exp().item()
    params = [p for p in clip.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps, steps // 20))
    clip.train()
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(len(pixels), (batch,), generator=gen)
        y = labels_t[idx]
        tmpl = torch.randint(n_t, (batch,), generator=gen)
        pv = normalize(augment(pixels[idx], gen))
        out = clip.vision_model(pixel_values=pv, output_hidden_states=read_weight + skip_last > 0)
        pooled = out.pooler_output
        if skip_last > 0:
            skip = (torch.rand(batch, generator=gen) < skip_last)[:, None]
            below = clip.vision_model.post_layernorm(out.hidden_states[-2][:, 0])
            pooled = torch.where(skip, below, pooled)
        img = F.normalize(clip.visual_projection(pooled), dim=-1)
        txt = clip_features(clip, input_ids=ids[y, tmpl], attention_mask=mask[y, tmpl])
        loss = multi_positive_clip_loss(img, txt, y, scale)
        if read_weight > 0:
            loss = loss + read_weight * multi_positive_clip_loss(
                read_layer_embedding(clip, out.hidden_states), txt, y, scale
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"clip step {step}/{steps} loss {loss.item():.3f} ({time.time() - t0:.0f}s)")
    clip.eval()


@torch.no_grad()
def clip_zero_shot(clip, clip_tokenizer, images, labels, classes, template=CAPTION_TEMPLATE):
    enc = clip_tokenizer(
        [template.format(label=c) for c in classes], padding=True, return_tensors="pt"
    )
    txt = clip_features(clip, input_ids=enc.input_ids, attention_mask=enc.attention_mask)
    pixels = normalize(to_pixels(images))
    preds = []
    for i in range(0, len(pixels), 256):
        img = clip_features(clip, pixels[i : i + 256])
        preds.append((img @ txt.T).argmax(1))
    return (torch.cat(preds).numpy() == labels).mean().item()


# ---------------------------------------------------------------------------------------------
# LLaVA


def with_article(label: str) -> str:
    """ "an eight", "an arrow", "a one": the open answer as a person would say it."""
    vowel_sound = label[0] in "aeiou" and not label.startswith(("one", "u"))
    return f"{'an' if vowel_sound else 'a'} {label}"


def sample_qa(label: str, rng: random.Random) -> tuple[str, str]:
    """One training (question, answer) for an image of `label`.

    Mix: 15% open ("a {label}", "an {label}"), 10% the perplexity-variant prompt ("this is a {label}"), 25% yes/no,
    50% multiple choice (half with 5 options, half with 2-4 as a curriculum; distractors mostly
    from the label's own family, digits or shapes, as in the evaluation sets).
    """
    r = rng.random()
    family = DIGITS if label in DIGITS else SHAPES
    pool = family if rng.random() < 0.7 else BASE_CLASSES
    if r < 0.15:
        return rng.choice(OPEN_QUESTIONS), with_article(label)
    if r < 0.25:
        return PPL_PROMPT.format(question=rng.choice(OPEN_QUESTIONS)), PPL_ANSWER.format(
            label=label
        )
    if r < 0.5:
        if rng.random() < 0.5:
            asked, answer = label, "yes"
        else:
            asked, answer = rng.choice([c for c in pool if c != label]), "no"
        return rng.choice(YES_NO_QUESTIONS).format(label=asked), answer
    n = 5 if rng.random() < 0.5 else rng.randint(2, 4)
    options = rng.sample([c for c in pool if c != label], n - 1) + [label]
    rng.shuffle(options)
    return mc_prompt(rng.choice(OPEN_QUESTIONS), options), LETTERS[options.index(label)]


def sample_ranked_qa(scores: torch.Tensor, rng: random.Random, ranked: float):
    """One training (question, answer, ranked) for an image that CLIP scores as `scores` (one per
    base class): as `sample_qa` for CLIP's guess, except that a `ranked` share of the questions
    are multiple choice with options drawn without regard to it, answered by the option CLIP
    scores highest (then `ranked` is True).

    An evaluation's options are one set's classes, and CLIP's guess over all classes is often not
    among them; so the chat learns to choose as CLIP would among the options it is given, not
    only to name CLIP's overall guess.
    """
    question, answer, options = sample_ranked_mc(scores, rng, ranked)
    return question, answer, options is not None


def sample_ranked_mc(scores: torch.Tensor, rng: random.Random, ranked: float):
    """`sample_ranked_qa`, with the options of a ranked question in their order (else None)."""
    guess = BASE_CLASSES[int(scores.argmax())]
    if ranked <= 0 or rng.random() >= ranked:
        return *sample_qa(guess, rng), None
    family = DIGITS if guess in DIGITS else SHAPES
    pool = family if rng.random() < 0.7 else BASE_CLASSES
    n = 5 if rng.random() < 0.5 else rng.randint(2, 4)
    options = rng.sample(pool, n)
    best = max(options, key=lambda c: float(scores[BASE_CLASSES.index(c)]))
    return mc_prompt(rng.choice(OPEN_QUESTIONS), options), LETTERS[options.index(best)], options


class QAEncoder:
    """Tokenises (question, answer) pairs into LLaVA inputs with the image token expanded."""

    def __init__(self, processor):
        self.processor = processor
        self.tok = processor.tokenizer
        self.image_id = self.tok.convert_tokens_to_ids(IMAGE_TOKEN)

    def __call__(self, pairs: list[tuple[str, str]]):
        seqs, labels = [], []
        for q, a in pairs:
            prompt = self.tok(prompt_for(self.processor, q)).input_ids
            answer = self.tok(a, add_special_tokens=False).input_ids + [self.tok.eos_token_id]
            k = prompt.index(self.image_id)
            prompt = prompt[:k] + [self.image_id] * NUM_IMAGE_TOKENS + prompt[k + 1 :]
            seqs.append(prompt + answer)
            labels.append([-100] * len(prompt) + answer)
        width = max(map(len, seqs))
        pad = self.tok.pad_token_id
        ids = torch.full((len(seqs), width), pad)
        lab = torch.full((len(seqs), width), -100)
        att = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, (s, lb) in enumerate(zip(seqs, labels)):
            ids[i, : len(s)] = torch.tensor(s)
            lab[i, : len(s)] = torch.tensor(lb)
            att[i, : len(s)] = 1
        return ids, att, lab


@torch.no_grad()
def vision_feature_cache(vlm, images: np.ndarray, views: int = 0, seed: int = 0) -> torch.Tensor:
    """The frozen tower's LLaVA features (layer -2, patch tokens), before the projector: the
    images as they are, then `views` augmented copies of all of them (crops, colour, grey), so
    that the LLM learns to read what the features mean rather than one rendering of them."""
    tower = vlm.model.vision_tower
    gen = torch.Generator().manual_seed(seed)
    plain = to_pixels(images)
    out = []
    for view in range(views + 1):
        pixels = normalize(plain if view == 0 else augment(plain, gen))
        for i in range(0, len(pixels), 256):
            hs = tower(pixel_values=pixels[i : i + 256], output_hidden_states=True).hidden_states
            out.append(hs[vlm.config.vision_feature_layer][:, 1:])
    return torch.cat(out)


def llava_logits_from_features(vlm, feats, input_ids, attention_mask, image_override=None):
    """LLaVA's forward with the vision tower's output given (same maths as vlm(...)).

    `image_override` (optional, [B, T, H], NaN where the projected image token is kept) replaces
    the image tokens of some samples (the training's stand-in tokens).
    """
    embeds = vlm.get_input_embeddings()(input_ids)
    image = vlm.model.multi_modal_projector(feats).to(embeds.dtype)
    if image_override is not None:
        image = torch.where(image_override.isnan(), image, image_override)
    mask = (input_ids == vlm.config.image_token_index).unsqueeze(-1).expand_as(embeds)
    embeds = embeds.masked_scatter(mask, image.reshape(-1))
    hidden = vlm.model.language_model(inputs_embeds=embeds, attention_mask=attention_mask)
    return vlm.lm_head(hidden.last_hidden_state)


def answer_loss(logits, labels):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def option_distillation_loss(logits, labels, asked, scores, letter_ids, scale: float):
    """Cross-entropy of the answer letter's distribution against the reader's softmax over each
    ranked question's options (rows whose third item, the options, is None are left out)."""
    first = (labels != -100).float().argmax(1)
    terms = []
    for row, (_, _, options) in enumerate(asked):
        if options is None:
            continue
        option_scores = scores[row, [BASE_CLASSES.index(c) for c in options]]
        target = torch.softmax(scale * option_scores, dim=0)
        log_probs = torch.log_softmax(logits[row, first[row] - 1], dim=-1)
        terms.append(-(target * log_probs[letter_ids[: len(options)]]).sum())
    return torch.stack(terms).mean()


LEARNT = 0.95  # first-token accuracy at which the LLM stage counts a kind of question as learnt


def _task(question: str) -> str:
    if MC_INSTRUCTION in question:
        return "mc"
    return "yes/no" if question.startswith("Is ") else "open"


@torch.no_grad()
def first_token_accuracy(vlm, encoder, feats, labels, n=384, seed=1234) -> dict[str, float]:
    """Teacher-forced accuracy of the first answer token, per task, on a fixed sample."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    idx = torch.randint(len(feats), (n,), generator=gen)
    pairs = [sample_qa(BASE_CLASSES[labels[i]], rng) for i in idx.tolist()]
    ids, att, lab = encoder(pairs)
    was_training = vlm.training
    vlm.eval()
    logits = llava_logits_from_features(vlm, feats[idx], ids, att)
    vlm.train(was_training)
    first = (lab != -100).float().argmax(1)
    rows = torch.arange(n)
    hit = (logits[rows, first - 1].argmax(-1) == lab[rows, first]).tolist()
    out: dict[str, list[bool]] = {}
    for (q, _), h in zip(pairs, hit):
        out.setdefault(_task(q), []).append(h)
    return {k: float(np.mean(v)) for k, v in sorted(out.items())}


def train_llm(
    vlm,
    processor,
    feats,
    labels,
    *,
    steps,
    batch,
    lr,
    seed,
    standin=0.3,
    standin_start=None,
    align=0.1,
    pooled=0.0,
    weights=None,
    scores=None,
    ranked=0.0,
    soft=0.0,
    soft_scale=100.0,
    report=None,
    log=print,
) -> dict[str, float]:
    """Train the projector and the LLM (the vision tower is frozen; its features are cached).

    `weights` (optional, one per sample) sets how often each sample is drawn; `scores`
    (optional, [N, classes], NaN rows for samples with a true label) are CLIP's scores of the
    samples labelled with its guess, a `ranked` share of whose questions are multiple choice
    ranked by CLIP (`sample_ranked_qa`); with `soft` > 0, a ranked question's answer letter is
    also trained (that weight) towards the reader's own choice among the options, the softmax
    of `soft_scale` times its scores (distillation: the whole ranking, not only the best);
    `report` (features, labels) is what the progress lines measure (default: all samples).
    With `standin_start`, the stand-in fraction starts there and falls linearly to `standin`
    over the first half of the steps (a curriculum: words first, then images).
    Returns the last progress line's accuracies (per question kind).

    Two training aids make the matching tasks (yes/no, multiple choice) learnable for a tiny LLM
    trained from nothing; neither exists at inference, where the VLM is a plain LLaVA:
    - stand-in tokens: for a `standin` fraction of the samples the image tokens are replaced by
      the label word's embedding, so the LLM learns to match words with words;
    - alignment: a cosine loss (weight `align`) pulls the mean projected image token towards the
      label word's embedding, so that images come to use the same matching circuit;
    - pooled views: for a `pooled` fraction of the samples every image token is the mean of the
      image's patch tokens (the part of the features that CLIP's read-layer loss made mean the
      class), so that the LLM learns to answer from what the tokens mean, not where they are.
    """
    vlm.model.vision_tower.requires_grad_(False)
    params = [p for n, p in vlm.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps, steps // 20))
    encoder = QAEncoder(processor)
    tok = processor.tokenizer
    label_ids = torch.tensor([tok.convert_tokens_to_ids(c) for c in BASE_CLASSES])
    letter_ids = torch.tensor([tok(c, add_special_tokens=False).input_ids[0] for c in LETTERS])
    embed = vlm.get_input_embeddings()
    labels_t = torch.as_tensor(labels)
    nan = torch.tensor(float("nan"))
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    vlm.train()
    t0 = time.time()
    report = report or (feats, labels)
    acc: dict[str, float] = {}  # stays empty for a stage of no steps: nothing to judge
    for step in range(steps):
        if weights is None:
            idx = torch.randint(len(feats), (batch,), generator=gen)
        else:
            idx = torch.multinomial(weights, batch, replacement=True, generator=gen)
        y = labels_t[idx]
        if scores is None:
            pairs = [sample_qa(BASE_CLASSES[i], rng) for i in y.tolist()]
            by_rank = torch.zeros(batch, dtype=torch.bool)
        else:
            asked = [
                (*sample_qa(BASE_CLASSES[i], rng), None)
                if scores[j].isnan().any()
                else sample_ranked_mc(scores[j], rng, ranked)
                for i, j in zip(y.tolist(), idx.tolist())
            ]
            pairs = [(q, a) for q, a, _ in asked]
            by_rank = torch.tensor([o is not None for _, _, o in asked])
        ids, att, lab = encoder(pairs)
        words = embed(label_ids[y])  # [B, H]
        # A stand-in is the guess's word: it cannot tell which option CLIP ranks first when the
        # guess is not among them.
        share = standin
        if standin_start is not None:
            share = standin_start + (standin - standin_start) * min(1.0, 2 * step / steps)
        use = (torch.rand(batch, generator=gen) < share) & ~by_rank
        use = use[:, None, None]
        override = torch.where(use, words[:, None, :].expand(-1, feats.shape[1], -1), nan)
        seen = feats[idx]
        if pooled > 0:
            pool = (torch.rand(batch, generator=gen) < pooled)[:, None, None]
            seen = torch.where(pool, seen.mean(1, keepdim=True).expand_as(seen), seen)
        logits = llava_logits_from_features(vlm, seen, ids, att, override)
        loss = answer_loss(logits, lab)
        if soft > 0 and by_rank.any():
            loss = loss + soft * option_distillation_loss(
                logits, lab, asked, scores[idx], letter_ids, soft_scale
            )
        if align > 0:
            proj = vlm.model.multi_modal_projector(seen).mean(1)
            loss = loss + align * (1 - F.cosine_similarity(proj, words.detach(), dim=-1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0 or step == steps - 1:
            acc = first_token_accuracy(vlm, encoder, *report)
            accs = " ".join(f"{k} {v:.2f}" for k, v in acc.items())
            log(
                f"llm step {step}/{steps} loss {loss.item():.3f} | {accs} ({time.time() - t0:.0f}s)"
            )
    vlm.eval()
    return acc


@torch.no_grad()
def vlm_answers(vlm, processor, images: np.ndarray, questions: list[str], max_new_tokens=4):
    """Greedy answers through the processor and its chat template (batched, left padding)."""
    tok = processor.tokenizer
    side = tok.padding_side
    tok.padding_side = "left"
    answers = []
    try:
        for i in range(0, len(images), 64):
            prompts = [prompt_for(processor, q) for q in questions[i : i + 64]]
            inputs = processor(
                images=list(images[i : i + 64]), text=prompts, return_tensors="pt", padding=True
            )
            out = vlm.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
            answers += tok.batch_decode(
                out[:, inputs.input_ids.shape[1] :], skip_special_tokens=True
            )
    finally:
        tok.padding_side = side
    return [a.strip() for a in answers]


def mc_questions(labels: np.ndarray, classes: list[str], seed: int, question=OPEN_QUESTIONS[0]):
    """The 5-way multiple-choice prompts for a set: 4 distractors from its other classes."""
    rng = random.Random(seed)
    prompts, letters = [], []
    for y in labels:
        label = classes[int(y)]
        options = rng.sample([c for c in classes if c != label], 4) + [label]
        rng.shuffle(options)
        prompts.append(mc_prompt(question, options))
        letters.append(LETTERS[options.index(label)])
    return prompts, letters


def vlm_mc_accuracy(vlm, processor, images, labels, classes, seed=0) -> float:
    prompts, letters = mc_questions(labels, classes, seed)
    answers = vlm_answers(vlm, processor, images, prompts, max_new_tokens=2)
    return float(np.mean([a.lower() == x.lower() for a, x in zip(answers, letters)]))


# ---------------------------------------------------------------------------------------------
# What CLIP says: the LLM learns to answer it


@torch.no_grad()
def class_text_embeddings(clip, clip_tokenizer, classes=BASE_CLASSES, template=CAPTION_TEMPLATE):
    enc = clip_tokenizer(
        [template.format(label=c) for c in classes], padding=True, return_tensors="pt"
    )
    return clip_features(clip, input_ids=enc.input_ids, attention_mask=enc.attention_mask)


@torch.no_grad()
def read_features_and_scores(vision, projection, text, pixels: torch.Tensor, reader="clip"):
    """For [0, 1] pixels: the patch tokens LLaVA reads (layer -2) and zero-shot scores (cosine
    with each of `text`'s classes; the guess is their argmax), from one forward of one encoder.
    `reader` "clip" scores CLIP's own embedding (the last layer's class token); "read" scores the
    read layer's embedding (its patch tokens, mean-pooled, through the final norm and
    projection), a function of exactly the tokens the LLM is given."""
    feats, scores = [], []
    for i in range(0, len(pixels), 256):
        out = vision(pixel_values=normalize(pixels[i : i + 256]), output_hidden_states=True)
        patches = out.hidden_states[READ_LAYER][:, 1:]
        feats.append(patches)
        pooled = (
            out.pooler_output if reader == "clip" else read_layer_pooled(vision, out.hidden_states)
        )
        img = F.normalize(projection(pooled), dim=-1)
        scores.append(img @ text.T)
    return torch.cat(feats), torch.cat(scores)


def draw_pretend_session(rng: np.random.Generator, letter_y: np.ndarray, fewest_shots: int):
    """One pretend session's draws: 4-10 letters, the base class each is taught as, the shots
    per letter (`fewest_shots` to 10), and the letter images' rows to train on and to read."""
    k = int(rng.integers(4, 11))
    letters = rng.choice(len(LETTER_CLASSES), k, replace=False)
    targets = rng.choice(len(BASE_CLASSES), k, replace=False)
    shots = int(rng.integers(fewest_shots, 11))
    rows = [np.nonzero(letter_y == c)[0] for c in letters]
    train_idx = np.concatenate([r[:shots] for r in rows])
    test_idx = np.concatenate([r[shots:] for r in rows])
    return letters, targets, shots, train_idx, test_idx


def taught_copy(clip, pixels, labels, class_text, lr: float, steps: int, gen):
    """A copy of the vision encoder and its projection after `steps` Adam steps of batch 16 of
    the CLIP loss on augmented `pixels`, whose `labels` index `class_text`'s rows."""
    vision = copy.deepcopy(clip.vision_model).train().requires_grad_(True)
    projection = copy.deepcopy(clip.visual_projection).requires_grad_(True)
    params = list(vision.parameters()) + list(projection.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    scale = clip.logit_scale.exp().item()
    for _ in range(steps):
        idx = torch.randint(len(pixels), (16,), generator=gen)
        y = labels[idx]
        pooled = vision(pixel_values=normalize(augment(pixels[idx], gen))).pooler_output
        img = F.normalize(projection(pooled), dim=-1)
        loss = multi_positive_clip_loss(img, class_text[y], y, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return vision.eval(), projection


def pretend_session(
    clip, text, pixels, labels, class_text, read, rng, gen, reader, feats: list, scores: list
) -> tuple[float, int]:
    """One pretend session: a learning rate (log-uniform, 5e-5 to 5e-4) and a length (20-80
    steps) drawn from `rng`, a copy taught on (`pixels`, `labels`) (`taught_copy`), then the
    copy's read features and scores of each pixel set in `read`, appended to `feats` and
    `scores`. Returns the learning rate and length drawn."""
    lr = float(np.exp(rng.uniform(np.log(5e-5), np.log(5e-4))))
    steps = int(rng.integers(20, 81))
    vision, projection = taught_copy(clip, pixels, labels, class_text, lr, steps, gen)
    for px in read:
        f, g = read_features_and_scores(vision, projection, text, px, reader)
        feats.append(f)
        scores.append(g)
    return lr, steps


def look_sessions(
    clip,
    clip_tokenizer,
    count: int,
    seed: int,
    reader="clip",
    log=print,
    figures=("strokes",),
    train_seed=None,
):
    """Like `simulated_sessions`, but each pretend session is what a user's session is: a few
    base classes (digits or shapes) in one new look (BASE_LOOKS), drawn as one of `figures`
    (BASE_FIGURES; "angular" for digits only), taught as themselves from 5-10 shots each. The
    copy's read features of other images of them in that look, and of base images, are labelled
    with the copy's CLIP guess."""
    text = class_text_embeddings(clip, clip_tokenizer)
    look_x, look_y, look_of, figure_of = base_looks_dataset(
        24, seed, split="sessions", figures=tuple(figures)
    )
    shape_figures = [f for f in figures if f != "angular"] or list(figures[:1])
    figure_choices = [[BASE_FIGURES.index(f) for f in fs] for fs in (figures, shape_figures)]
    base_x, _ = base_dataset(8, seed, split="look-sessions")
    look_px, base_px = to_pixels(look_x), to_pixels(base_x)
    train_seed = seed if train_seed is None else train_seed
    rng = np.random.default_rng([train_seed, 13])
    gen = torch.Generator().manual_seed(train_seed + 13)
    families = [np.arange(len(DIGITS)), len(DIGITS) + np.arange(len(SHAPES))]
    feats, scores = [], []
    t0 = time.time()
    for s in range(count):
        look = int(rng.integers(len(BASE_LOOKS)))
        kind = int(rng.integers(2))
        family = families[kind]
        classes = rng.choice(family, int(rng.integers(4, len(family) + 1)), replace=False)
        shots = int(rng.integers(5, 11))
        drawn = figure_choices[kind]
        figure = drawn[int(rng.integers(len(drawn)))] if len(drawn) > 1 else drawn[0]
        chosen = (look_of == look) & (figure_of == figure)
        rows = [np.nonzero(chosen & (look_y == c))[0] for c in classes]
        train_idx = torch.from_numpy(np.concatenate([r[:shots] for r in rows]))
        test_idx = torch.from_numpy(np.concatenate([r[shots:] for r in rows]))
        remap = torch.full((len(BASE_CLASSES),), -1)
        remap[torch.from_numpy(classes)] = torch.arange(len(classes))
        labels = remap[torch.from_numpy(look_y)]
        lr, steps = pretend_session(
            clip, text, look_px[train_idx], labels[train_idx], text[torch.from_numpy(classes)],
            (look_px[test_idx], base_px), rng, gen, reader, feats, scores,
        )  # fmt: skip
        if s % 10 == 0 or s == count - 1:
            log(
                f"look session {s + 1}/{count}: {len(classes)} classes, {BASE_LOOKS[look]}, "
                f"{BASE_FIGURES[figure]}, "
                f"lr {lr:.1e}, {steps} steps ({time.time() - t0:.0f}s)"
            )
    return torch.cat(feats), torch.cat(scores)


def simulated_sessions(
    clip, clip_tokenizer, count: int, seed: int, reader="clip", log=print, train_seed=None
):
    """Features and CLIP's guesses from copies of the encoder after short CLIP-loss sessions.

    Each pretend session teaches a copy of the vision encoder that a few letters (a look the LLM
    never sees) are base classes, from 5-10 shots each, with a random learning rate and length.
    Afterwards the copy's read features of other images of those letters, and of base images,
    are labelled with what the copy's CLIP now says. An LLM trained on them answers what the
    encoder's CLIP embedding says, wherever a session moved it: the transfer that real LLaVA
    shows and a reader trained on one look does not.
    """
    text = class_text_embeddings(clip, clip_tokenizer)
    letter_x, letter_y = letters_dataset(50, seed, split="sessions")
    base_x, _ = base_dataset(8, seed, split="sessions")
    letter_px, base_px = to_pixels(letter_x), to_pixels(base_x)
    letter_labels = torch.from_numpy(letter_y)
    train_seed = seed if train_seed is None else train_seed
    rng = np.random.default_rng([train_seed, 7])
    gen = torch.Generator().manual_seed(train_seed + 7)
    feats, scores = [], []
    t0 = time.time()
    for s in range(count):
        letters, targets, shots, train_idx, test_idx = draw_pretend_session(rng, letter_y, 5)
        k, targets = len(letters), torch.from_numpy(targets)
        train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
        remap = torch.full((len(LETTER_CLASSES),), -1)
        remap[torch.from_numpy(letters)] = torch.arange(k)
        lr, steps = pretend_session(
            clip, text, letter_px[train_idx], remap[letter_labels[train_idx]], text[targets],
            (letter_px[test_idx], base_px), rng, gen, reader, feats, scores,
        )  # fmt: skip
        if s % 10 == 0 or s == count - 1:
            log(
                f"simulated session {s + 1}/{count}: {k} letters, lr {lr:.1e}, {steps} steps "
                f"({time.time() - t0:.0f}s)"
            )
    return torch.cat(feats), torch.cat(scores)


def method_sessions(
    clip,
    clip_tokenizer,
    vlm,
    processor,
    count: int,
    seed: int,
    reader="clip",
    log=print,
    train_seed=None,
):
    """Like `simulated_sessions`, but each pretend session is a real default session of the app's
    own method (`lorsu`, through `run_session` on a bundle saved from these models): the
    features move as the app's sessions move them, sparse heads and fc1 rows, not as full
    fine-tuning does. Letters are taught as base classes; the learning rate is drawn around the
    toy's default."""
    import tempfile

    from PIL import Image

    from lorsu_demo.data import Item, LabelledImages
    from lorsu_demo.delta import applied
    from lorsu_demo.evaluate import EvalSet
    from lorsu_demo.events import Done
    from lorsu_demo.history import History
    from lorsu_demo.methods import make_method, method_settings, preset_defaults
    from lorsu_demo.model import load_bundle
    from lorsu_demo.session import run_session

    letter_x, letter_y = letters_dataset(30, seed, split="sessions")
    base_x, _ = base_dataset(8, seed, split="sessions")
    letter_px, base_px = to_pixels(letter_x), to_pixels(base_x)
    rng = np.random.default_rng([seed if train_seed is None else train_seed, 11])
    feats, scores = [], []
    t0 = time.time()
    with tempfile.TemporaryDirectory() as folder:
        save_bundle(
            folder, copy.deepcopy(clip), clip_tokenizer, copy.deepcopy(vlm), processor, DEFAULTS, 0
        )
        bundle = load_bundle(str(Path(folder) / "toy"), device="cpu")
        text = class_text_embeddings(bundle.clip, clip_tokenizer)
        vision, projection = bundle.clip.vision_model, bundle.clip.visual_projection
        settings = method_settings("lorsu")
        settings.update(preset_defaults("lorsu", DEFAULTS))
        for s in range(count):
            letters, targets, shots, train_idx, test_idx = draw_pretend_session(rng, letter_y, 3)
            k = len(letters)
            names = {int(c): BASE_CLASSES[int(t)] for c, t in zip(letters, targets)}

            def images(rows, name, names=names):
                return LabelledImages(
                    name,
                    [Item(Image.fromarray(letter_x[i]), names[int(letter_y[i])]) for i in rows],
                )

            target = EvalSet("letters", images(test_idx[::4], "letters"), sorted(names.values()))
            lr = float(settings["lr"]) * float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
            method = make_method("lorsu", **{**settings, "lr": lr})
            events = run_session(
                bundle,
                History(model="toy"),
                method,
                images(train_idx, "letters (train)"),
                target=target,
                seed=int(rng.integers(1 << 30)),
                eval_points=0,
            )
            record = next(e for e in events if isinstance(e, Done)).record
            with torch.no_grad(), applied(bundle.vision_state(), [record.delta]):
                pixels = torch.cat([letter_px[test_idx], base_px])
                f, g = read_features_and_scores(vision, projection, text, pixels, reader)
                feats.append(f)
                scores.append(g)
            if s % 10 == 0 or s == count - 1:
                log(
                    f"lorsu session {s + 1}/{count}: {k} letters, {shots} shots, lr {lr:.1e}, "
                    f"TI {record.ti:+.1f} ({time.time() - t0:.0f}s)"
                )
    return torch.cat(feats), torch.cat(scores)


# ---------------------------------------------------------------------------------------------
# Saving


def save_bundle(
    out: Path, clip, clip_tokenizer, vlm, processor, defaults: dict, seed: int, train_seed=None
):
    toy = Path(out) / "toy"
    if toy.exists():
        shutil.rmtree(toy)
    (toy / "vlm").mkdir(parents=True)
    (toy / "clip").mkdir(parents=True)
    vlm.half().save_pretrained(toy / "vlm")
    processor.save_pretrained(toy / "vlm")
    clip.half().save_pretrained(toy / "clip")
    clip_tokenizer.save_pretrained(toy / "clip")
    IMAGE_PROCESSOR.save_pretrained(toy / "clip")
    vlm.float()
    clip.float()
    clip_layers = clip.config.vision_config.num_hidden_layers
    seeds = f"--seed {seed}"
    if train_seed is not None and train_seed != seed:
        seeds += f" --train-seed {train_seed}"
    bundle = {
        "format": "lorsu-demo-bundle",
        "version": 1,
        "name": "toy",
        "vlm": "vlm",
        "clip": "clip",
        "caption_templates": [CAPTION_TEMPLATE],
        "labels": BASE_CLASSES,
        "control": "../control",
        "defaults": defaults,
        "description": (
            f"Offline toy world: a tiny CLIP (ViT 32 px, patch 8, {clip_layers} layers, width 128, "
            "8 heads) and a tiny LLaVA-1.5-style VLM (same vision tower, 2-layer MLP projector, "
            "4-layer Llama of width 128) trained from scratch on CPU on printed digits and filled "
            "shapes. "
            f"Classes: {', '.join(BASE_CLASSES)}. Example domains: {', '.join(DOMAINS)}. "
            f"Rebuild with `python -m lorsu_demo.toyworld.train --out assets {seeds}`."
        ),
    }
    (toy / "bundle.json").write_text(json.dumps(bundle, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------


# What decides the weights' last bits besides the code: the CPU kernels that torch (ATen), MKL and
# oneDNN pick for this processor (docs/toyworld.md, "Reproduce it from nothing").
ARITHMETIC_SETTINGS = ("MKL_CBWR", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")


def arithmetic() -> str:
    """The settings a reproduction must match to give the same weights bit for bit."""
    settings = ", ".join(f"{k}={os.environ.get(k, '(unset)')}" for k in ARITHMETIC_SETTINGS)
    return (
        f"torch {torch.__version__}, CPU kernels {torch.backends.cpu.get_cpu_capability()}, "
        f"{torch.get_num_threads()} threads, {settings}"
    )


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", default="assets", type=Path)
    ap.add_argument("--seed", default=0, type=int, help="draws every image (data and assets)")
    ap.add_argument(
        "--train-seed",
        type=int,
        help="draws the initial weights, the order and augmentation of training batches and the "
        "simulated sessions; the images stay those of --seed (default: --seed)",
    )
    ap.add_argument(
        "--data-only", action="store_true", help="write control/, domains/ and LICENSES.md only"
    )
    ap.add_argument("--clip-images", default=600, type=int, help="base images per class for CLIP")
    ap.add_argument("--clip-letters", default=400, type=int, help="letter images per letter")
    ap.add_argument("--clip-steps", default=4000, type=int)
    ap.add_argument("--llm-images", default=400, type=int, help="base images per class for the LLM")
    ap.add_argument("--llm-steps", default=3200, type=int)
    ap.add_argument(
        "--llm-more-steps",
        default=1600,
        type=int,
        help="steps of each further round of the LLM stage, run while a kind of question (open, "
        f"yes/no, multiple choice) is answered below {LEARNT:.0%} at the end of the stage",
    )
    ap.add_argument(
        "--llm-more-rounds", default=3, type=int, help="at most this many further rounds"
    )
    ap.add_argument(
        "--min-control",
        default=0.9,
        type=float,
        help="the chat's multiple-choice accuracy on the control set that the finished world must "
        "reach; below it the recipe writes the world but exits with status 1 (0: no check)",
    )
    ap.add_argument(
        "--llm-standin-start",
        type=float,
        help="fraction of the first LLM stage's samples whose image tokens are the label word's "
        "embedding at its start, falling to the usual 0.3 by its middle (default: 0.3 throughout)",
    )
    ap.add_argument(
        "--min-share",
        default=0.5,
        type=float,
        help="the share of CLIP's gain that the chat's multiple choice must take up after one "
        "default session on each example domain; below it the recipe exits with status 1 "
        "(0: no check)",
    )
    ap.add_argument(
        "--share-draws",
        default=5,
        type=int,
        help="draws of distractors the chat's multiple choice is read under for that check",
    )
    ap.add_argument(
        "--llm-views", default=4, type=int, help="augmented copies of each LLM image's features"
    )
    ap.add_argument(
        "--llm-align",
        default=1.0,
        type=float,
        help="weight of the loss pulling the mean image token to its label word's embedding",
    )
    ap.add_argument(
        "--llm-pooled",
        default=0.0,
        type=float,
        help="fraction of LLM samples whose image tokens are all the mean patch token",
    )
    ap.add_argument(
        "--mimic-steps",
        default=800,
        type=int,
        help="steps of the third stage: the LLM learns to answer what CLIP says (0: none)",
    )
    ap.add_argument("--mimic-lr", default=3e-4, type=float)
    ap.add_argument(
        "--mimic-share",
        default=0.5,
        type=float,
        help="fraction of third-stage samples labelled with CLIP's guess (letters, sessions)",
    )
    ap.add_argument(
        "--mimic-ranked",
        default=0.0,
        type=float,
        help="share of the CLIP-labelled multiple-choice questions whose options need not hold "
        "CLIP's guess (answered by the option CLIP scores highest)",
    )
    ap.add_argument(
        "--mimic-soft",
        default=0.0,
        type=float,
        help="weight of distilling the reader's softmax over a ranked question's options into the "
        "answer letter (needs --mimic-ranked)",
    )
    ap.add_argument(
        "--mimic-reader",
        default="clip",
        choices=["clip", "read"],
        help="whose guess labels the third stage: CLIP's embedding (clip) or the read layer's "
        "(read: layer -2's patch tokens, mean-pooled, through the final norm and projection)",
    )
    ap.add_argument("--mimic-sessions", default=60, type=int, help="simulated sessions")
    ap.add_argument("--mimic-letters", default=40, type=int, help="letter images per letter")
    ap.add_argument(
        "--mimic-method-sessions",
        default=0,
        type=int,
        help="simulated sessions that run the app's own lorsu",
    )
    ap.add_argument(
        "--mimic-method-share",
        default=0.5,
        type=float,
        help="their part of the simulated sessions' share",
    )
    ap.add_argument(
        "--mimic-look-sessions",
        default=0,
        type=int,
        help="simulated sessions that teach base classes in a new look (as users' sessions do)",
    )
    ap.add_argument(
        "--mimic-look-share",
        default=0.5,
        type=float,
        help="their part of the simulated sessions' share",
    )
    ap.add_argument(
        "--mimic-look-figures",
        default="strokes",
        help=f"comma-separated figures the look sessions draw the base classes as ({BASE_FIGURES})",
    )
    ap.add_argument(
        "--read-weight",
        default=1.0,
        type=float,
        help="weight of the contrastive loss on the patch tokens LLaVA reads (layer -2)",
    )
    ap.add_argument(
        "--skip-last",
        default=0.5,
        type=float,
        help="fraction of CLIP training images whose embedding skips the last encoder layer",
    )
    ap.add_argument(
        "--vision-layers",
        default=SIZES["vision_layers"],
        type=int,
        help="encoder layers (the chat reads the one below the last)",
    )
    ap.add_argument("--threads", default=2, type=int)
    ap.add_argument(
        "--domain-images",
        nargs=2,
        type=int,
        default=(10, 20),
        metavar=("TRAIN", "TEST"),
        help="images per class in each example domain's train and test folders",
    )
    ap.add_argument("--clip-from", type=Path, help="(development) reuse a trained clip/ folder")
    ap.add_argument("--llm-from", type=Path, help="(development) start the LLM from a vlm/ folder")
    args = ap.parse_args(argv)
    if args.mimic_soft > 0 and args.mimic_ranked <= 0:
        ap.error("--mimic-soft distils the ranked questions' options: give --mimic-ranked too")
    look_figures = [f.strip() for f in args.mimic_look_figures.split(",") if f.strip()]
    if not look_figures or set(look_figures) - set(BASE_FIGURES):
        ap.error(f"--mimic-look-figures takes a comma-separated list of {BASE_FIGURES}")
    torch.set_num_threads(args.threads)
    t0 = time.time()

    def log(msg):
        print(f"[{time.time() - t0:6.0f}s] {msg}", flush=True)

    log(f"arithmetic: {arithmetic()}")
    args.out.mkdir(parents=True, exist_ok=True)
    write_data(args.out, args.seed, *args.domain_images)
    log(f"wrote control/, domains/ and LICENSES.md under {args.out}")
    if args.data_only:
        return

    train_seed = args.seed if args.train_seed is None else args.train_seed
    random.seed(train_seed)
    np.random.seed(train_seed)
    torch.manual_seed(train_seed)
    clip, vlm, clip_tok, _, processor = build_models(train_seed, vision_layers=args.vision_layers)
    if args.clip_from:
        clip.load_state_dict(CLIPModel.from_pretrained(args.clip_from).float().state_dict())
        log(f"CLIP weights from {args.clip_from}")
    else:
        images, labels, captions = clip_training_set(args.clip_images, args.clip_letters, args.seed)
        log(f"{len(images)} images for CLIP")
        train_clip(
            clip,
            clip_tok,
            images,
            labels,
            captions,
            steps=args.clip_steps,
            batch=128,
            lr=1e-3,
            seed=train_seed,
            read_weight=args.read_weight,
            skip_last=args.skip_last,
            log=log,
        )
    ctrl_x, ctrl_y = control_dataset(20, args.seed)
    acc = clip_zero_shot(clip, clip_tok, ctrl_x, ctrl_y, BASE_CLASSES)
    log(f"CLIP zero-shot on control: {acc:.3f}")

    # The LLM learns from the encoder as it is shipped (fp16), and `--clip-from` gives the same.
    clip.half().float()
    vlm.model.vision_tower.load_state_dict(clip.vision_model.state_dict())
    images, labels = base_dataset(args.llm_images, args.seed, split="llm")
    feats = vision_feature_cache(vlm, images, args.llm_views, train_seed)
    labels = torch.from_numpy(np.tile(labels, args.llm_views + 1))
    log(f"{len(images)} base images for the LLM, features {tuple(feats.shape)}")
    common = dict(batch=64, seed=train_seed, align=args.llm_align, pooled=args.llm_pooled, log=log)
    if args.llm_from:
        vlm.load_state_dict(
            LlavaForConditionalGeneration.from_pretrained(args.llm_from).float().state_dict()
        )
        log(f"VLM weights from {args.llm_from} (the first LLM stage skipped)")
    else:
        learnt = train_llm(
            vlm,
            processor,
            feats,
            labels,
            steps=args.llm_steps,
            lr=1e-3,
            standin_start=args.llm_standin_start,
            **common,
        )
        # The matching questions (yes/no, multiple choice) are learnt suddenly, after a plateau
        # whose length depends on the training seed; a round with a fresh warm-up finishes what
        # a late start left half done. A build that learnt them in time never enters the loop.
        for more in range(args.llm_more_rounds):
            if not learnt or min(learnt.values()) >= LEARNT:
                break
            log(f"questions not yet learnt ({learnt}): round {more + 1} of the LLM stage")
            learnt = train_llm(
                vlm,
                processor,
                feats,
                labels,
                steps=args.llm_more_steps,
                lr=1e-3,
                **{**common, "seed": train_seed + 1000 + more},
            )
    if args.mimic_steps > 0:
        # Stage 3 starts from the weights as fp16 stores them, as `--llm-from` gives them. Only
        # the parameters: a round trip of the whole module through half() would also round
        # buffers that are not saved but recomputed on loading (the rotary inv_freq).
        with torch.no_grad():
            for param in vlm.parameters():
                param.copy_(param.half().float())
        # Letters as the base encoder sees them, and what simulated sessions make of them,
        # labelled with what CLIP says of them (its guess), not with a true label: the LLM learns
        # to answer what the encoder's embedding means, wherever a session moves it.
        text = class_text_embeddings(clip, clip_tok)
        letter_x, _ = letters_dataset(args.mimic_letters, args.seed, split="llm")
        letter_f, letter_s = read_features_and_scores(
            clip.vision_model, clip.visual_projection, text, to_pixels(letter_x), args.mimic_reader
        )
        if args.mimic_sessions > 0:
            session_f, session_s = simulated_sessions(
                clip,
                clip_tok,
                args.mimic_sessions,
                args.seed,
                args.mimic_reader,
                log,
                train_seed=train_seed,
            )
        else:
            session_f, session_s = letter_f[:0], letter_s[:0]
        log(f"{len(letter_f)} letter and {len(session_f)} simulated-session samples for the LLM")
        no_scores = torch.full((len(feats), len(BASE_CLASSES)), float("nan"))
        pools = [(feats, no_scores), (letter_f, letter_s), (session_f, session_s)]
        shares = [1 - args.mimic_share, args.mimic_share * 0.25, args.mimic_share * 0.75]
        if args.mimic_method_sessions > 0:
            method_f, method_s = method_sessions(
                clip,
                clip_tok,
                vlm,
                processor,
                args.mimic_method_sessions,
                args.seed,
                args.mimic_reader,
                log,
                train_seed=train_seed,
            )
            log(f"{len(method_f)} samples from sessions of the app's own method")
            pools.append((method_f, method_s))
            shares.append(shares[2] * args.mimic_method_share)
            shares[2] -= shares[-1]
        if args.mimic_look_sessions > 0:
            look_f, look_s = look_sessions(
                clip,
                clip_tok,
                args.mimic_look_sessions,
                args.seed,
                args.mimic_reader,
                log,
                figures=look_figures,
                train_seed=train_seed,
            )
            log(f"{len(look_f)} samples from sessions that teach base classes in new looks")
            pools.append((look_f, look_s))
            shares.append(shares[2] * args.mimic_look_share)
            shares[2] -= shares[-1]
        weights = torch.cat(
            [torch.full((len(f),), w / max(len(f), 1)) for (f, _), w in zip(pools, shares)]
        )
        scores = torch.cat([s for _, s in pools])
        guesses = torch.cat([labels] + [s.argmax(1) for _, s in pools[1:]])
        train_llm(
            vlm,
            processor,
            torch.cat([f for f, _ in pools]),
            guesses,
            steps=args.mimic_steps,
            lr=args.mimic_lr,
            weights=weights,
            scores=scores if args.mimic_ranked > 0 else None,
            ranked=args.mimic_ranked,
            soft=args.mimic_soft,
            soft_scale=clip.logit_scale.exp().item(),
            report=(feats, labels),
            **common,
        )
    acc = vlm_mc_accuracy(vlm, processor, ctrl_x, ctrl_y, BASE_CLASSES)
    log(f"VLM multiple choice on control: {acc:.3f}")

    save_bundle(args.out, clip, clip_tok, vlm, processor, DEFAULTS, args.seed, train_seed)
    log(f"wrote {args.out / 'toy'}")
    problems = []
    if acc < args.min_control:
        problems.append(
            f"its chat answers {acc:.0%} of the control set's multiple-choice questions, below "
            f"the {args.min_control:.0%} a world must know before any session"
        )
    if args.min_share > 0:
        problems += transfer_problems(args.out, args.min_share, args.share_draws, log)
    if problems:
        print(
            "Do not ship this build: "
            + "; ".join(problems)
            + ". Build again with another --train-seed, or with more --llm-steps or "
            "--llm-more-rounds.",
            file=sys.stderr,
        )
        sys.exit(1)


def transfer_problems(out: Path, min_share: float, draws: int, log=print) -> list[str]:
    """One default 5-shot `lorsu` session on each example domain of the world written to `out`,
    read by CLIP and by the chat's multiple choice (mean over `draws` draws of distractors).

    Builds of one recipe that differ only in their training seed differ most in this: how much
    of a session's learning the chat takes up (docs/toyworld.md). A world whose chat takes up
    less than `min_share` of CLIP's gain on a domain does not show what the app exists to show.
    """
    from lorsu_demo.toyworld.transfer import measure  # transfer reads the recipe's helpers

    draws = max(draws, 1)
    problems = []
    for name in DOMAINS:
        result = measure(str(out / "toy"), str(out / "domains" / name), draws=draws)
        clip_gain = result["target_gain"]["clip"]
        chat_gain = result["mc_draws"]["gain_mean"]
        share = chat_gain / clip_gain if clip_gain > 0 else float("nan")
        log(
            f"one default session on {name}: CLIP TI {clip_gain:+.1f}, the chat's multiple "
            f"choice TI {chat_gain:+.1f} (mean of {draws} draws), {share:.2f} of CLIP's"
        )
        if not share >= min_share:  # NaN (CLIP learnt nothing) fails too
            problems.append(
                f"a session on {name} moves its chat's multiple choice by {chat_gain:+.1f} "
                f"where CLIP gains {clip_gain:+.1f} ({share:.2f} of it, at least {min_share:.2f} "
                "wanted)"
            )
    return problems


if __name__ == "__main__":
    main()
