"""LoRSU (SPEC section 2) and its head-selection ablations."""

from __future__ import annotations

import random

import torch

from ..delta import Region
from .base import (
    PROJECTION,
    LoraAdapters,
    Method,
    clip_module_name,
    count_masked,
    state_name,
    top_fraction_mask,
)

QKV = ("q_proj", "k_proj", "v_proj")


class LoRSU(Method):
    name = "lorsu"
    summary = "LoRA on the top-k attention heads per layer + sparse fc1 (gradient scores)"
    defaults = {"heads": 2, "rank": 64, "alpha": 64, "sparsity": 0.1}
    head_selection = "scores"  # "scores" | "random" | "all"
    train_biases = True
    train_projection = True

    def adapted_layers(self, bundle) -> list[int]:
        return list(range(bundle.num_layers))

    def prepare(self, ctx) -> None:
        bundle = ctx.bundle
        layers = self.adapted_layers(bundle)
        heads = bundle.num_heads
        k = self.hp["heads"]
        if not 1 <= k <= heads:
            raise ValueError(f"heads must be between 1 and {heads} for this encoder, not {k}")
        names = [state_name(l, f"self_attn.{p}.weight") for l in layers for p in QKV]
        names += [state_name(l, "mlp.fc1.weight") for l in layers]
        grads = ctx.importance_gradient(names, self.objective)
        # Summed on the gradients' device and read back once (not once per tensor).
        per_layer = {}
        for l in layers:
            total = torch.zeros(heads, device=grads[names[0]].device)
            for p in QKV:
                rows = grads[state_name(l, f"self_attn.{p}.weight")].float()
                total += rows.view(heads, -1).pow(2).sum(1)
            per_layer[l] = total
        self.head_scores = torch.zeros(bundle.num_layers, heads)
        if per_layer:
            self.head_scores[layers] = torch.stack([per_layer[l] for l in layers]).cpu()
        rng = random.Random(ctx.seed)
        self.selected: list[list[int]] = [[] for _ in range(bundle.num_layers)]
        for l in layers:
            if self.head_selection == "all":
                chosen = list(range(heads))
            elif self.head_selection == "random":
                chosen = rng.sample(range(heads), k)
            else:
                chosen = self.head_scores[l].topk(k).indices.tolist()
            self.selected[l] = sorted(chosen)
        self.fc1_masks = {
            l: top_fraction_mask(grads[state_name(l, "mlp.fc1.weight")].abs(), self.hp["sparsity"])
            for l in layers
        }

    def head_rows(self, bundle, layer: int) -> list[int]:
        d = bundle.head_dim
        return [r for h in self.selected[layer] for r in range(h * d, (h + 1) * d)]

    def footprint(self, ctx):
        bundle = ctx.bundle
        state = bundle.vision_state()
        footprint = {}
        for l in self.adapted_layers(bundle):
            for p in QKV:
                name = state_name(l, f"self_attn.{p}.weight")
                footprint[name] = Region.of_rows(state[name].shape, self.head_rows(bundle, l))
                if self.train_biases:
                    bias = state_name(l, f"self_attn.{p}.bias")
                    footprint[bias] = Region.dense(state[bias].shape)
            footprint[state_name(l, "mlp.fc1.weight")] = Region.of_mask(self.fc1_masks[l])
            bias = state_name(l, "mlp.fc1.bias")
            footprint[bias] = Region.dense(state[bias].shape)
        if self.train_projection:
            footprint[PROJECTION] = Region.dense(state[PROJECTION].shape)
        return footprint

    def install(self, ctx):
        bundle = ctx.bundle
        state = bundle.vision_state()
        layers = self.adapted_layers(bundle)
        targets = [clip_module_name(bundle, l, f"self_attn.{p}") for l in layers for p in QKV]
        if self.train_projection:
            targets.append("visual_projection")
        self.adapters = LoraAdapters(bundle, targets, self.hp["rank"], self.hp["alpha"])
        for l in layers:
            # The LoRA product is confined to the selected heads' rows: B starts at zero and
            # only those rows of B ever receive gradient.
            row_mask = torch.zeros(
                state[state_name(l, "self_attn.q_proj.weight")].shape[0], 1, device=bundle.device
            )
            row_mask[self.head_rows(bundle, l)] = 1
            for p in QKV:
                a, b = self.adapters.factors(clip_module_name(bundle, l, f"self_attn.{p}"))
                self.unfreeze([a, b])
                self.masks[b] = row_mask.to(b.dtype)
                if self.train_biases:
                    self.unfreeze([state[state_name(l, f"self_attn.{p}.bias")]])
            fc1 = state[state_name(l, "mlp.fc1.weight")]
            self.unfreeze([fc1, state[state_name(l, "mlp.fc1.bias")]])
            self.masks[fc1] = self.fc1_masks[l].to(fc1.device, fc1.dtype)
        if self.train_projection:
            self.unfreeze(self.adapters.factors("visual_projection"))
        return self.trainable

    def merge(self, ctx, footprint):
        bundle = ctx.bundle
        regions = {}
        for l in self.adapted_layers(bundle):
            for p in QKV:
                regions[clip_module_name(bundle, l, f"self_attn.{p}")] = footprint[
                    state_name(l, f"self_attn.{p}.weight")
                ]
        if self.train_projection:
            regions["visual_projection"] = footprint[PROJECTION]
        self.adapters.merge(regions)

    def remove(self, ctx):
        if getattr(self, "adapters", None) is not None:
            self.adapters.unload()

    def report(self, ctx):
        bundle = ctx.bundle
        layers = self.adapted_layers(bundle)
        density = [
            float(self.fc1_masks[l].float().mean()) if l in self.fc1_masks else 0.0
            for l in range(bundle.num_layers)
        ]
        return {
            "head_scores": self.head_scores.tolist(),
            "selected_heads": self.selected,
            "fc1_density": density,
            "trainable_params": count_masked(self.trainable, self.masks),
            "paper_params": self.paper_param_count(bundle, layers),
        }

    def paper_param_count(self, bundle, layers) -> int:
        """The "learned" parameters as the authors' code counts them (SPEC section 2): per
        layer, the attention (`attention_count`), plus the fc1 mask and the projection's LoRA."""
        state = bundle.vision_state()
        out_rows, width = state[state_name(0, "self_attn.q_proj.weight")].shape
        attention = sum(
            self.attention_count(len(self.selected[l]) * bundle.head_dim, width, out_rows)
            for l in layers
        )
        fc1 = sum(int(self.fc1_masks[l].sum()) for l in layers)
        projection = self.hp["rank"] * sum(state[PROJECTION].shape) if self.train_projection else 0
        return attention + fc1 + projection

    def attention_count(self, rows: int, width: int, out_rows: int) -> int:
        """One layer's attention count from its selected rows (per q, k or v): their CLIP code
        counts one LoRA on the fused D -> 3D in-projection, capped by the mask's size."""
        return min(3 * rows * width, self.hp["rank"] * (width + 3 * out_rows))


class LoRSURandom(LoRSU):
    name = "lorsu-rand"
    summary = "LoRSU ablation: k heads per layer chosen at random"
    head_selection = "random"


class LoRSUAllHeads(LoRSU):
    name = "lorsu-aah"
    summary = "LoRSU ablation: every head of every layer"
    head_selection = "all"
