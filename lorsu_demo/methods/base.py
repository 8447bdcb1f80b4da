"""The method interface. A method says which parameters train, how their gradients are shaped
and which positions its session may change (its footprint, from which the loop reads the delta).
The session loop, losses, evaluation and history are shared by all methods."""

from __future__ import annotations

from typing import ClassVar

import torch

from ..delta import Footprint, Region

COMMON_DEFAULTS = {
    "lr": 1e-5,
    "epochs": 5,
    # Steps of training; 0 trains `epochs` passes instead. A method that trains by steps, as
    # its authors do (DAC: 500), declares it in its own defaults.
    "iterations": 0,
    "batch_size": 16,
    "weight_decay": 0.0,
    "warmup": 0.1,  # fraction of the steps
    "multi_positive": False,  # the paper's loss by default
    "max_importance_images": 1000,
}


class MethodError(ValueError):
    pass


class Method:
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    defaults: ClassVar[dict] = {}
    objective: ClassVar[str] = "clip"  # the training loss: "clip" or "ppl"

    def __init__(self, **overrides):
        allowed = {**COMMON_DEFAULTS, **self.defaults}
        unknown = sorted(set(overrides) - set(allowed))
        if unknown:
            raise MethodError(
                f"{self.name} has no setting {', '.join(unknown)}; its settings are "
                f"{', '.join(sorted(allowed))}."
            )
        self.hp = {**allowed, **{k: v for k, v in overrides.items() if v is not None}}
        self.masks: dict[torch.Tensor, torch.Tensor] = {}
        self.trainable: list[torch.nn.Parameter] = []

    # ---- the session's life cycle, called in this order by the loop --------------------------
    def prepare(self, ctx) -> None:
        """Look at the session's data before anything changes (importance scores, bases)."""

    def footprint(self, ctx) -> Footprint:
        raise NotImplementedError

    def install(self, ctx) -> list[torch.nn.Parameter]:
        """Make the trainable parameters (adapters, unfrozen weights); return them."""
        raise NotImplementedError

    def shape_gradients(self) -> None:
        for param, mask in self.masks.items():
            if param.grad is not None:
                param.grad.mul_(mask)

    def extra_loss(self, ctx) -> torch.Tensor | None:
        return None

    def after_step(self, lr: float) -> None:
        """Decoupled weight decay, confined to the entries the method may change."""
        decay = self.hp["weight_decay"]
        if decay:
            with torch.no_grad():
                for param in self.trainable:
                    mask = self.masks.get(param)
                    shrink = lr * decay * (param if mask is None else param * mask)
                    param.sub_(shrink)

    def merge(self, ctx, footprint: Footprint) -> None:
        """Fold what was learnt into the model's weights (inside `footprint`); drop adapters."""

    def remove(self, ctx) -> None:
        """Take the adapters away without merging (a stopped session)."""

    def report(self, ctx) -> dict:
        """head_scores, selected_heads, fc1_density, trainable_params for the record."""
        return {
            "head_scores": None,
            "selected_heads": [[] for _ in range(ctx.bundle.num_layers)],
            "fc1_density": [0.0] * ctx.bundle.num_layers,
            "trainable_params": count_masked(self.trainable, self.masks),
        }

    def carry(self) -> dict[str, torch.Tensor]:
        """Method state handed to the next session of the same method (CPU tensors)."""
        return {}

    def unfreeze(self, params) -> list[torch.nn.Parameter]:
        params = list(params)
        for param in params:
            param.requires_grad_(True)
        self.trainable += params
        return params


def count_masked(params, masks) -> int:
    total = 0
    for param in params:
        mask = masks.get(param)
        total += param.numel() if mask is None else int(mask.expand_as(param).count_nonzero())
    return total


def top_fraction_mask(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Boolean mask of the `fraction` largest entries of one tensor (per tensor, never global)."""
    keep = max(1, int(round(fraction * scores.numel())))
    flat = scores.flatten().float()
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[flat.topk(keep).indices] = True
    return mask.view_as(scores)


class LoraAdapters:
    """peft LoRA layers injected in place into the bundle's CLIP model (whose vision encoder is
    the VLM's), so both losses and the VLM see them. Merging is ours: only a region is written."""

    ADAPTER = "default"

    def __init__(
        self,
        bundle,
        module_names: list[str],
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        **extra,
    ):
        # peft is imported here, at the first session, not with the app: it is 3.6 s of the
        # app's start on the toy machine (docs/benchmarks.md)
        from peft import LoraConfig
        from peft.tuners.lora import LoraModel

        self.bundle = bundle
        self.module_names = list(module_names)
        config = LoraConfig(
            r=rank,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=self.module_names,
            init_lora_weights=True,
            **extra,
        )
        self.model = LoraModel(bundle.clip, config, self.ADAPTER)

    def layer(self, name: str):
        return self.bundle.clip.get_submodule(name)

    def factors(self, name: str) -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
        layer = self.layer(name)
        return layer.lora_A[self.ADAPTER].weight, layer.lora_B[self.ADAPTER].weight

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for name in self.module_names for p in self.factors(name)]

    @torch.no_grad()
    def merge(self, regions: dict[str, Region]) -> None:
        """Add each adapter's product to its base weight, inside the given region only."""
        for name in self.module_names:
            layer = self.layer(name)
            weight = layer.base_layer.weight
            update = layer.get_delta_weight(self.ADAPTER).float()
            mask = regions[name].mask(weight.device)
            merged = weight.float() + update
            weight.data[mask] = merged[mask].to(weight.dtype)
        self.unload()

    def unload(self) -> None:
        self.model.unload()


def clip_module_name(bundle, layer: int, suffix: str) -> str:
    """Name of an encoder submodule relative to the CLIP model (where peft injects)."""
    return f"vision_model.encoder.layers.{layer}.{suffix}"


def state_name(layer: int, suffix: str) -> str:
    """Name of an encoder parameter in `Bundle.vision_state`."""
    return f"vision.encoder.layers.{layer}.{suffix}"


PROJECTION = "projection.weight"
