"""Measure the toy world's figures from the written assets (a development check, not the engine).

    python -m lorsu_demo.toyworld.check --assets assets [--learn] [--lr 3e-4 --epochs 5]

Reloads `assets/toy` the way a user would (`from_pretrained`), then reports:
- CLIP zero-shot accuracy ("a photo of a {label}." against the set's classes) on the control set
  and on every domain's test set;
- the VLM's 5-way multiple-choice accuracy (greedy, through the chat template), and on the
  control set also its open-ended ("does the answer name the class") and yes/no accuracy;
- with `--learn`, whether each domain is learnable: the vision encoder is fine-tuned with the CLIP
  loss on `--shots` images per class, and domain and control accuracy are measured again. Two
  stand-ins for LoRSU's trainable set are tried (this is a check of the world, not the method):
  `qkv+fc1` (every q/k/v/fc1 weight and bias of the encoder and the visual projection) and
  `lorsu-like` (the rows of the top-2 heads of q/k/v per layer chosen by the mean CLIP-loss
  gradient, the top 10% of fc1 entries per layer, q/k/v/fc1 biases and the visual projection;
  dense updates instead of LoRA).
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer, CLIPModel, LlavaForConditionalGeneration

from lorsu_demo.toyworld.data import BASE_CLASSES, DOMAINS
from lorsu_demo.toyworld.train import (
    augment,
    clip_features,
    clip_zero_shot,
    multi_positive_clip_loss,
    normalize,
    to_pixels,
    vlm_answers,
    vlm_mc_accuracy,
)


def load_folder(root: Path, classes: list[str], per_class: int | None = None):
    images, labels = [], []
    for c, name in enumerate(classes):
        files = sorted((root / name).glob("*.png"))[:per_class]
        images += [np.asarray(Image.open(f).convert("RGB")) for f in files]
        labels += [c] * len(files)
    return np.stack(images), np.asarray(labels)


def load_bundle(toy: Path):
    bundle = json.loads((toy / "bundle.json").read_text())
    clip = CLIPModel.from_pretrained(toy / bundle["clip"]).float().eval()
    clip_tok = AutoTokenizer.from_pretrained(toy / bundle["clip"])
    vlm = LlavaForConditionalGeneration.from_pretrained(toy / bundle["vlm"]).float().eval()
    processor = AutoProcessor.from_pretrained(toy / bundle["vlm"])
    tower = vlm.model.vision_tower.state_dict()
    for k, v in clip.vision_model.state_dict().items():
        assert torch.equal(tower[k], v), f"vision tower differs from CLIP at {k}"
    return bundle, clip, clip_tok, vlm, processor


def open_and_yes_no(vlm, processor, images, labels, classes, seed=0):
    answers = vlm_answers(vlm, processor, images, ["What is in this image?"] * len(images))
    open_acc = np.mean([classes[y] in a.split() for a, y in zip(answers, labels)])
    rng = random.Random(seed)
    asked, truth = [], []
    for y in labels:
        same = rng.random() < 0.5
        asked.append(classes[y] if same else rng.choice([c for c in classes if c != classes[y]]))
        truth.append("yes" if same else "no")
    answers = vlm_answers(vlm, processor, images, [f"Is this a {a}?" for a in asked])
    yn_acc = np.mean([a.strip() == t for a, t in zip(answers, truth)])
    return float(open_acc), float(yn_acc)


# ---------------------------------------------------------------------------------------------
# Learnability


def _layers(clip):
    return clip.vision_model.encoder.layers


def _caption_ids(clip_tok, classes, template):
    enc = clip_tok([template.format(label=c) for c in classes], padding=True, return_tensors="pt")
    return enc.input_ids, enc.attention_mask


def _clip_loss(clip, pv, y, ids, mask, scale):
    img, txt = clip_features(clip, pv, ids[y], mask[y])
    return multi_positive_clip_loss(img, txt, y, scale)


def trainable_masks(clip, method, images, labels, ids, mask, scale, k=2, sparsity=0.1):
    """{param: mask or None (dense)} for the stand-in trainable sets."""
    sets: dict[torch.nn.Parameter, torch.Tensor | None] = {}
    for layer in _layers(clip):
        att, mlp = layer.self_attn, layer.mlp
        for lin in (att.q_proj, att.k_proj, att.v_proj, mlp.fc1):
            sets[lin.weight] = None
            sets[lin.bias] = None
    sets[clip.visual_projection.weight] = None
    if method == "qkv+fc1":
        return sets
    # importance pass: the mean gradient over the training images, no augmentation
    clip.zero_grad(set_to_none=True)
    pixels = normalize(to_pixels(images))
    y_all = torch.from_numpy(labels)
    n = 0
    for i in range(0, len(pixels), 16):
        loss = _clip_loss(clip, pixels[i : i + 16], y_all[i : i + 16], ids, mask, scale)
        (loss * len(pixels[i : i + 16])).backward()
        n += len(pixels[i : i + 16])
    for layer in _layers(clip):
        att, mlp = layer.self_attn, layer.mlp
        heads, dh = att.num_heads, att.head_dim
        score = torch.zeros(heads)
        for lin in (att.q_proj, att.k_proj, att.v_proj):
            g = (lin.weight.grad / n).view(heads, dh, -1)
            score += g.pow(2).sum(dim=(1, 2))
        rows = torch.zeros(heads * dh, 1)
        for h in score.topk(k).indices:
            rows[h * dh : (h + 1) * dh] = 1
        for lin in (att.q_proj, att.k_proj, att.v_proj):
            sets[lin.weight] = rows.expand_as(lin.weight).clone()
        g = mlp.fc1.weight.grad.abs().flatten()
        keep = torch.zeros_like(g)
        keep[g.topk(max(1, int(sparsity * g.numel()))).indices] = 1
        sets[mlp.fc1.weight] = keep.view_as(mlp.fc1.weight)
    clip.zero_grad(set_to_none=True)
    return sets


def finetune(clip, clip_tok, method, images, labels, classes, template, *, lr, epochs, batch, seed):
    clip = copy.deepcopy(clip)
    clip.requires_grad_(True)
    ids, mask = _caption_ids(clip_tok, classes, template)
    scale = clip.logit_scale.exp().item()
    sets = trainable_masks(clip, method, images, labels, ids, mask, scale)
    clip.requires_grad_(False)
    for p in sets:
        p.requires_grad_(True)
    params = list(sets)
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    pixels = to_pixels(images)
    y_all = torch.from_numpy(labels)
    steps = epochs * ((len(pixels) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / max(1, steps // 10)) * 0.5 * (1 + np.cos(np.pi * s / steps)),
    )
    clip.train()
    for _ in range(epochs):
        order = torch.randperm(len(pixels), generator=gen)
        for i in range(0, len(order), batch):
            idx = order[i : i + batch]
            loss = _clip_loss(
                clip, normalize(augment(pixels[idx], gen)), y_all[idx], ids, mask, scale
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for p, m in sets.items():
                if m is not None and p.grad is not None:
                    p.grad.mul_(m)
            opt.step()
            sched.step()
    clip.eval()
    return clip


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--assets", default="assets", type=Path)
    ap.add_argument("--learn", action="store_true")
    ap.add_argument("--methods", default="qkv+fc1,lorsu-like")
    ap.add_argument("--lr", type=float, default=None, help="default: the bundle's defaults.lr")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-vlm", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    t0 = time.time()
    bundle, clip, clip_tok, vlm, processor = load_bundle(args.assets / "toy")
    template = bundle["caption_templates"][0]
    ctrl_x, ctrl_y = load_folder(args.assets / "control", BASE_CLASSES)
    sets = {"control": (ctrl_x, ctrl_y, BASE_CLASSES)}
    for name, d in DOMAINS.items():
        x, y = load_folder(args.assets / "domains" / name / "test", d.classes)
        sets[name] = (x, y, d.classes)
    print(f"{'set':<14} {'n':>4} {'clip0':>6} {'mc':>6}")
    for name, (x, y, classes) in sets.items():
        zs = clip_zero_shot(clip, clip_tok, x, y, classes, template)
        mc = float("nan") if args.no_vlm else vlm_mc_accuracy(vlm, processor, x, y, classes)
        print(f"{name:<14} {len(x):>4} {zs:6.3f} {mc:6.3f}", flush=True)
    if not args.no_vlm:
        o, yn = open_and_yes_no(vlm, processor, ctrl_x, ctrl_y, BASE_CLASSES)
        print(f"control open-ended {o:.3f}  yes/no {yn:.3f}")
    if args.learn:
        d = bundle["defaults"]
        lr, epochs, batch = (
            args.lr or d["lr"],
            args.epochs or d["epochs"],
            args.batch or d["batch_size"],
        )
        print(f"\nlearnability: {args.shots} shots/class, lr {lr}, {epochs} epochs, batch {batch}")
        base_ctrl = clip_zero_shot(clip, clip_tok, ctrl_x, ctrl_y, BASE_CLASSES, template)
        for name, d in DOMAINS.items():
            tx, ty = load_folder(args.assets / "domains" / name / "train", d.classes, args.shots)
            x, y, classes = sets[name]
            base_dom = clip_zero_shot(clip, clip_tok, x, y, classes, template)
            for method in args.methods.split(","):
                tuned = finetune(
                    clip,
                    clip_tok,
                    method,
                    tx,
                    ty,
                    classes,
                    template,
                    lr=lr,
                    epochs=epochs,
                    batch=batch,
                    seed=args.seed,
                )
                dom = clip_zero_shot(tuned, clip_tok, x, y, classes, template)
                ctl = clip_zero_shot(tuned, clip_tok, ctrl_x, ctrl_y, BASE_CLASSES, template)
                line = (
                    f"{name:<14} {method:<11} domain {base_dom:.3f} -> {dom:.3f} ({100 * (dom - base_dom):+.1f}) "
                    f"control {base_ctrl:.3f} -> {ctl:.3f} ({100 * (ctl - base_ctrl):+.1f})"
                )
                if not args.no_vlm:
                    tuned_vlm = copy.deepcopy(vlm)
                    tuned_vlm.model.vision_tower.load_state_dict(tuned.vision_model.state_dict())
                    mc_d = vlm_mc_accuracy(tuned_vlm, processor, x, y, classes)
                    mc_c = vlm_mc_accuracy(tuned_vlm, processor, ctrl_x, ctrl_y, BASE_CLASSES)
                    line += f" | vlm mc domain {mc_d:.3f} control {mc_c:.3f}"
                print(line, flush=True)
    print(f"({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()
