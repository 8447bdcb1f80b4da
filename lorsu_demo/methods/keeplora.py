"""KeepLoRA and KeepLoRA++ (SPEC section 5): LoRA confined to the residual subspace.

Each adapted weight has ONE protected basis (on its input side), grown as the authors grow it:
it starts, before the first session, as the principal subspace of the weight (85% of the
energy); after every session the dominant directions of that session's input features join it,
GPM style, their residual measured against the whole basis (principal plus earlier feature
directions) until 99% of the features' energy is covered. Each session fixes the LoRA
down-factor A to the top singular directions of the task gradient projected off the basis and
trains only B, at the authors' LoRA scale 1/16 (lora_alpha 1, rank 16) and lr 1e-3.

One choice is ours: KeepLoRA++'s layer scaling uses gamma_l = g_min + (1 - g_min) * l / (L - 1),
an assumption: the paper's formula is not public.
"""

from __future__ import annotations

import torch

from ..delta import Region
from .base import LoraAdapters, Method, clip_module_name, state_name

LINEARS = ("q_proj", "k_proj", "v_proj", "out_proj")
INPUTS = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "out_proj": "out"}


def energy_rank(values: torch.Tensor, fraction: float) -> int:
    """How many leading values (singular values squared, or eigenvalues) hold `fraction`."""
    cumulative = values.cumsum(0) / values.sum().clamp_min(1e-30)
    return int((cumulative < fraction).sum()) + 1


def principal_basis(weight: torch.Tensor, fraction: float) -> torch.Tensor:
    """Orthonormal columns (in x m) spanning the input-side principal subspace of a weight."""
    _, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
    return vh[: energy_rank(s.pow(2), fraction)].T


def extend_basis(
    basis: torch.Tensor | None, features: torch.Tensor, fraction: float
) -> torch.Tensor:
    """GPM: add leading directions of the features' residual until `fraction` of their energy
    is covered by the basis. `features` is (n, in)."""
    gram = features.T.double() @ features.double()
    total = gram.trace()
    if basis is None or basis.numel() == 0:
        basis = features.new_zeros(features.shape[1], 0).double()
    basis = basis.double()
    projector = torch.eye(gram.shape[0], dtype=torch.float64) - basis @ basis.T
    covered = total - (projector @ gram @ projector).trace()
    residual = projector @ gram @ projector
    values, vectors = torch.linalg.eigh(residual)
    values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)
    needed = fraction * total - covered
    if needed <= 0 or values.sum() <= 0:
        return basis.float()
    k = int((values.cumsum(0) < needed).sum()) + 1
    return torch.linalg.qr(torch.cat([basis, vectors[:, :k]], 1)).Q.float()


class KeepLoRA(Method):
    name = "keeplora"
    summary = (
        "KeepLoRA: LoRA in the residual subspace of the weights and of past sessions' features"
    )
    defaults = {
        "rank": 16,
        "alpha": 1,  # the authors' lora_alpha: scale 1/16 at rank 16
        "lr": 1e-3,
        "principal_energy": 0.85,
        "feature_energy": 0.99,
        "min_scale": 0.1,
    }
    layer_scaling = False

    def targets(self, bundle) -> dict[str, str]:
        return {
            clip_module_name(bundle, l, f"self_attn.{m}"): state_name(l, f"self_attn.{m}.weight")
            for l in range(bundle.num_layers)
            for m in LINEARS
        }

    def prepare(self, ctx):
        bundle = ctx.bundle
        state = bundle.vision_state()
        names = list(self.targets(bundle).values())
        grads = ctx.importance_gradient(names)
        self.down: dict[str, torch.Tensor] = {}
        self.bases: dict[str, torch.Tensor] = {}
        rank = int(self.hp["rank"])
        for name in names:
            protected = ctx.carry.get(f"basis/{name}")
            if protected is None or protected.shape[0] != state[name].shape[1]:
                # The first session of this method: the pretrained principal subspace.
                protected = principal_basis(state[name].detach(), self.hp["principal_energy"])
            protected = protected.float().cpu()
            self.bases[name] = protected
            g = grads[name].float().cpu()
            residual = g - (g @ protected) @ protected.T
            _, s, vh = torch.linalg.svd(residual, full_matrices=False)
            # Directions of (numerically) zero singular value are arbitrary: drop them, so
            # that a fully protected weight gets no update rather than a random one.
            keep = min(rank, int((s > 1e-5 * g.norm()).sum()), g.shape[1] - protected.shape[1])
            down = torch.zeros(rank, g.shape[1])
            directions = vh[:keep] - (vh[:keep] @ protected) @ protected.T
            down[:keep] = directions
            self.down[name] = down
        self.carried = {f"basis/{n}": b for n, b in self.bases.items()}
        self.free_at_start = self.free_dims(bundle)

    def free_dims(self, bundle) -> list[dict[str, int]]:
        """Per layer, the input dimensions of each adapted weight outside its protected basis:
        what a KeepLoRA session may still change."""
        out = []
        for l in range(bundle.num_layers):
            row = {}
            for m in LINEARS:
                basis = self.carried[f"basis/{state_name(l, f'self_attn.{m}.weight')}"]
                row[m] = int(basis.shape[0] - basis.shape[1])
            out.append(row)
        return out

    def footprint(self, ctx):
        state = ctx.bundle.vision_state()
        return {n: Region.dense(state[n].shape) for n in self.targets(ctx.bundle).values()}

    def install(self, ctx):
        bundle = ctx.bundle
        targets = self.targets(bundle)
        self.adapters = LoraAdapters(bundle, list(targets), int(self.hp["rank"]), self.hp["alpha"])
        layers = bundle.num_layers
        for module, name in targets.items():
            a, b = self.adapters.factors(module)
            with torch.no_grad():
                a.copy_(self.down[name].to(a))
            a.requires_grad_(False)
            self.unfreeze([b])
            if self.layer_scaling:
                layer = int(module.split(".")[3])
                g_min = float(self.hp["min_scale"])
                gamma = g_min + (1 - g_min) * layer / max(1, layers - 1)
                self.adapters.layer(module).scaling[LoraAdapters.ADAPTER] *= gamma
        return self.trainable

    def merge(self, ctx, footprint):
        targets = self.targets(ctx.bundle)
        self.adapters.merge({m: footprint[n] for m, n in targets.items()})
        self.carried = self._grow_feature_bases(ctx)

    def remove(self, ctx):
        if getattr(self, "adapters", None) is not None:
            self.adapters.unload()

    @torch.no_grad()
    def _grow_feature_bases(self, ctx) -> dict[str, torch.Tensor]:
        """Add the dominant directions of this session's layer inputs to each weight's basis,
        measured against that whole basis (principal and earlier directions together)."""
        bundle = ctx.bundle
        captured: dict[str, list[torch.Tensor]] = {}
        hooks = []
        for l, layer in enumerate(bundle.layers):
            for key, module in (("qkv", layer.self_attn.q_proj), ("out", layer.self_attn.out_proj)):
                name = f"{l}/{key}"

                def hook(_module, inputs, _output, name=name):
                    captured.setdefault(name, []).append(
                        inputs[0].reshape(-1, inputs[0].shape[-1]).float().cpu()
                    )

                hooks.append(module.register_forward_hook(hook))
        try:
            from ..data import normalise

            pixels = normalise(ctx.unit_pixels, bundle.clip_image_processor)
            for start in range(0, len(pixels), ctx.batch_size):
                bundle.image_features(pixels[start : start + ctx.batch_size])
        finally:
            for handle in hooks:
                handle.remove()
        carried = dict(self.carried)
        for l in range(bundle.num_layers):
            for m in LINEARS:
                name = state_name(l, f"self_attn.{m}.weight")
                features = torch.cat(captured[f"{l}/{INPUTS[m]}"])
                carried[f"basis/{name}"] = extend_basis(
                    carried[f"basis/{name}"], features, self.hp["feature_energy"]
                )
        return carried

    def carry(self):
        return getattr(self, "carried", {})

    def report(self, ctx):
        report = super().report(ctx)
        if hasattr(self, "free_at_start"):
            report["free_dims"] = self.free_at_start
            # After the merge the bases hold this session's features: the next session's room.
            report["free_dims_after"] = self.free_dims(ctx.bundle)
        return report


class KeepLoRAPlus(KeepLoRA):
    name = "keeplora++"
    summary = "KeepLoRA++: KeepLoRA with smaller updates in shallow layers (our formula, see docs)"
    layer_scaling = True
