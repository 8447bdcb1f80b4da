"""The paper's baselines (SPEC section 3): plain LoRA, SPU and full fine-tuning."""

from __future__ import annotations

from ..delta import Region
from .base import PROJECTION, LoraAdapters, Method, clip_module_name, state_name, top_fraction_mask

ENCODER_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
    "mlp.fc1",
    "mlp.fc2",
)


class LoRA(Method):
    name = "lora"
    summary = "LoRA on every linear layer of the encoder and the projection, merged each session"
    defaults = {"rank": 8, "alpha": 8}

    def targets(self, bundle) -> dict[str, str]:
        """peft module name -> parameter name in the bundle's vision state."""
        pairs = {
            clip_module_name(bundle, l, m): state_name(l, f"{m}.weight")
            for l in range(bundle.num_layers)
            for m in ENCODER_LINEARS
        }
        pairs["visual_projection"] = PROJECTION
        return pairs

    def footprint(self, ctx):
        state = ctx.bundle.vision_state()
        return {name: Region.dense(state[name].shape) for name in self.targets(ctx.bundle).values()}

    def install(self, ctx):
        self.adapters = LoraAdapters(
            ctx.bundle, list(self.targets(ctx.bundle)), self.hp["rank"], self.hp["alpha"]
        )
        return self.unfreeze(self.adapters.parameters())

    def merge(self, ctx, footprint):
        self.adapters.merge(
            {module: footprint[param] for module, param in self.targets(ctx.bundle).items()}
        )

    def remove(self, ctx):
        if getattr(self, "adapters", None) is not None:
            self.adapters.unload()


class SPU(Method):
    name = "spu"
    summary = "SPU: the top 10% of fc1 entries per layer, scored by a label-free surrogate"
    defaults = {"sparsity": 0.1, "weight_decay": 0.2}

    def prepare(self, ctx):
        names = [state_name(l, "mlp.fc1.weight") for l in range(ctx.bundle.num_layers)]
        grads = ctx.importance_gradient(names, objective="spu")
        self.fc1_masks = {
            l: top_fraction_mask(grads[n].abs(), self.hp["sparsity"]) for l, n in enumerate(names)
        }

    def footprint(self, ctx):
        state = ctx.bundle.vision_state()
        footprint = {}
        for l in range(ctx.bundle.num_layers):
            footprint[state_name(l, "mlp.fc1.weight")] = Region.of_mask(self.fc1_masks[l])
            bias = state_name(l, "mlp.fc1.bias")
            footprint[bias] = Region.dense(state[bias].shape)
        footprint[PROJECTION] = Region.dense(state[PROJECTION].shape)
        return footprint

    def install(self, ctx):
        state = ctx.bundle.vision_state()
        for l in range(ctx.bundle.num_layers):
            fc1 = state[state_name(l, "mlp.fc1.weight")]
            self.unfreeze([fc1, state[state_name(l, "mlp.fc1.bias")]])
            self.masks[fc1] = self.fc1_masks[l].to(fc1.device, fc1.dtype)
        self.unfreeze([state[PROJECTION]])
        return self.trainable

    def report(self, ctx):
        report = super().report(ctx)
        report["fc1_density"] = [
            float(self.fc1_masks[l].float().mean()) for l in range(ctx.bundle.num_layers)
        ]
        return report


class FullFineTune(Method):
    name = "full"
    summary = "F-FT: every parameter of the encoder and the projection (forgets the most)"

    def footprint(self, ctx):
        return {name: Region.dense(p.shape) for name, p in ctx.bundle.vision_state().items()}

    def install(self, ctx):
        return self.unfreeze(ctx.bundle.vision_state().values())
