"""The rank-1 expert pool in a single LoRA, "DAC" (SPEC section 6).

Each adapted linear gets one LoRA of rank r whose rank-1 terms B[:, i] A[i, :] are experts.
A router per encoder layer reads the layer's [CLS] token; each image votes for its top experts
and the most-voted experts serve the whole batch. An Activation-Guided Orthogonal (AGO) loss
keeps this session's most-activated up-factor columns away from those of earlier sessions, and
only the most-activated experts are merged.

peft has no routed experts, so the adapter is a small module here. Our choice, documented: the
authors' router gets no gradient as coded; ours is trained straight-through (the forward pass
uses gate 1 for the selected experts, exactly as theirs, and the gradient flows through the
softmax of the router's scores).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..delta import Region
from .base import Method, state_name

LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
    "mlp.fc1",
    "mlp.fc2",
)


class Router(nn.Module):
    """Scores the experts from the [CLS] token; keeps the batch's gate and running vote counts."""

    def __init__(self, width: int, experts: int, per_image: int, per_batch: int):
        super().__init__()
        self.score = nn.Linear(width, experts)
        self.per_image, self.per_batch = per_image, per_batch
        self.register_buffer("votes", torch.zeros(experts))
        self.gate: torch.Tensor | None = None

    def route(self, cls: torch.Tensor) -> None:
        scores = self.score(cls.float())
        ballots = torch.zeros_like(scores).scatter_(
            1, scores.topk(self.per_image, dim=1).indices, 1.0
        )
        counts = ballots.sum(0)
        # Ties between equally voted experts go to the larger total score.
        rank_key = counts * 1e4 + scores.detach().sum(0).sigmoid()
        chosen = torch.zeros_like(counts).scatter_(0, rank_key.topk(self.per_batch).indices, 1.0)
        if self.training:
            self.votes += counts.detach()
        soft = scores.softmax(1)
        self.gate = chosen * (1 + soft - soft.detach())


class RankOneExperts(nn.Module):
    def __init__(self, base: nn.Linear, router: Router, rank: int, scale: float, dropout: float):
        super().__init__()
        self.base, self.router, self.scale = base, router, scale
        self.down = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))
        self.up = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        hidden = self.dropout(x).to(self.down.dtype) @ self.down.T
        hidden = hidden * self.router.gate.view(hidden.shape[0], *([1] * (hidden.dim() - 2)), -1)
        return self.base(x) + (self.scale * hidden @ self.up.T).to(x.dtype)


class DAC(Method):
    name = "dac"
    summary = "DAC: a routed pool of rank-1 experts in one LoRA, orthogonal across sessions"
    # The authors' few-shot setting (SPEC section 6): 500 iterations of batch 32, lr 2e-3,
    # AdamW at their weight decay 0 (which is Adam), warm-up 100 of the 500 steps, and their
    # LoRA scale alpha / r = 1 / 12.
    defaults = {
        "iterations": 500,
        "batch_size": 32,
        "warmup": 0.2,
        "rank": 12,
        "alpha": 1,
        "lr": 2e-3,
        "dropout": 0.2,
        "experts_per_image": 8,
        "experts_per_batch": 8,
        "experts_merged": 4,
        "ago_weight": 0.1,
        "ago_columns": 4,
    }

    def footprint(self, ctx):
        state = ctx.bundle.vision_state()
        return {
            state_name(l, f"{m}.weight"): Region.dense(state[state_name(l, f"{m}.weight")].shape)
            for l in range(ctx.bundle.num_layers)
            for m in LINEARS
        }

    def install(self, ctx):
        bundle, hp = ctx.bundle, self.hp
        rank = int(hp["rank"])
        if not 1 <= hp["experts_merged"] <= hp["experts_per_batch"] <= rank:
            raise ValueError("need 1 <= experts_merged <= experts_per_batch <= rank")
        self.routers, self.experts, self.hooks = [], {}, []
        for l, layer in enumerate(bundle.layers):
            router = Router(
                layer.self_attn.q_proj.in_features,
                rank,
                int(hp["experts_per_image"]),
                int(hp["experts_per_batch"]),
            )
            router.to(bundle.device)
            self.routers.append(router)
            self.hooks.append(
                layer.register_forward_pre_hook(
                    lambda _m, args, kwargs, router=router: router.route(
                        _hidden(args, kwargs)[:, 0]
                    ),
                    with_kwargs=True,
                )
            )
            for m in LINEARS:
                parent_name, child = m.rsplit(".", 1)
                parent = layer.get_submodule(parent_name)
                module = RankOneExperts(
                    getattr(parent, child), router, rank, hp["alpha"] / rank, hp["dropout"]
                )
                setattr(parent, child, module)
                self.experts[state_name(l, f"{m}.weight")] = module
                self.unfreeze([module.down, module.up])
            self.unfreeze(router.score.parameters())
        return self.trainable

    def extra_loss(self, ctx):
        stored = ctx.carry
        if not stored or not self.hp["ago_weight"]:
            return None
        terms = []
        for name, module in self.experts.items():
            previous = stored.get(f"up/{name}")
            if previous is None:
                continue
            columns = self._most_active(module, int(self.hp["ago_columns"]))
            terms.append((module.up[:, columns].T @ previous.to(module.up)).abs().sum())
        if not terms:
            return None
        # Averaged over the module pairs, as the authors divide by their count: a sum would
        # grow with the encoder's depth (144x at ViT-L's 24 layers x 6 linears).
        return self.hp["ago_weight"] * torch.stack(terms).mean()

    def _most_active(self, module: RankOneExperts, k: int) -> torch.Tensor:
        return module.router.votes.topk(k).indices

    @torch.no_grad()
    def merge(self, ctx, footprint):
        self.carried = dict(ctx.carry)
        k = int(self.hp["experts_merged"])
        for name, module in self.experts.items():
            chosen = self._most_active(module, k)
            up, down = module.up[:, chosen].float(), module.down[chosen].float()
            weight = module.base.weight
            weight.data.copy_((weight.float() + module.scale * up @ down).to(weight.dtype))
            previous = self.carried.get(f"up/{name}")
            merged = up.cpu() if previous is None else torch.cat([previous, up.cpu()], 1)
            self.carried[f"up/{name}"] = merged
        self.remove(ctx)

    def remove(self, ctx):
        for handle in getattr(self, "hooks", []):
            handle.remove()
        self.hooks = []
        for layer in ctx.bundle.layers:
            for m in LINEARS:
                parent_name, child = m.rsplit(".", 1)
                parent = layer.get_submodule(parent_name)
                module = getattr(parent, child)
                if isinstance(module, RankOneExperts):
                    setattr(parent, child, module.base)

    def carry(self):
        return getattr(self, "carried", {})

    def report(self, ctx):
        report = super().report(ctx)
        report["expert_votes"] = [r.votes.tolist() for r in getattr(self, "routers", [])]
        return report


def _hidden(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]
