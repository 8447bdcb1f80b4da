"""Training losses. The CLIP loss is the default; the perplexity loss reaches the encoder through
the frozen LLM (LoRSU-Ppl)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    labels: torch.Tensor,
    logit_scale: float,
    multi_positive: bool = False,
) -> torch.Tensor:
    """Symmetric in-batch InfoNCE between images and their captions (features L2-normalised).

    The paper's loss treats two images of one class in a batch as each other's negatives.
    `multi_positive=True` makes every same-class pair a positive (targets normalised per row).
    """
    logits = logit_scale * image_features @ text_features.T
    if not multi_positive:
        targets = torch.arange(len(logits), device=logits.device)
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
    same = (labels[:, None] == labels[None, :]).float()
    targets = same / same.sum(1, keepdim=True)
    image_to_text = -(targets * logits.log_softmax(1)).sum(1).mean()
    text_to_image = -(targets * logits.T.log_softmax(1)).sum(1).mean()
    return (image_to_text + text_to_image) / 2


def logit_norm_surrogate(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: float
):
    """SPU's label-free importance objective: each image's squared logit-row norm vs the batch's texts."""
    logits = logit_scale * image_features @ text_features.T
    return logits.pow(2).sum(1).mean()
