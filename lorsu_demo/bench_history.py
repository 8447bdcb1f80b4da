"""`python -m lorsu_demo bench history`: what shipping a user's history costs per GPU call.

On ZeroGPU every call pickles its arguments into a forked worker; a chat or a session takes the
user's deltas with it and applies them for the call. This builds the real CLIP ViT-L/14-336
vision encoder (304 M parameters, real CPU tensors, zero weights: values do not change the
cost) and a history of LoRSU-shaped deltas (the footprint of `methods/lorsu.py` at its
defaults: 2 heads' rows of q, k, v and their biases, 10% of fc1 and its bias in every layer,
the visual projection), each session with other heads and another fc1 mask, and times one
call's history work: pickle, unpickle, apply, restore. Once as the stack of deltas, once
folded into one delta (`stack.fold`, done once per version outside the call), once as that
folded delta shared through a file (`FoldedDelta.share`, written once per version: the call
pickles a path and a token and the worker memory-maps the file), and checks that every way
gives bit-identical weights and restores exactly.
"""

from __future__ import annotations

import os
import pickle
import time
from pathlib import Path

import torch

from .arch import get_arch
from .delta import Delta, Patch, Region, apply_stack, restore

PROJECTION_DIM = 768


def vision_state(arch: str = "llava-1.5-7b") -> dict[str, torch.Tensor]:
    """The encoder's parameters under `Bundle.vision_state` names, allocated and zeroed."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(**get_arch(arch).vision)
    with torch.device("meta"):
        model = CLIPVisionModel(config)
    model.to_empty(device="cpu")
    state = {f"vision.{k.removeprefix('vision_model.')}": p.data.zero_() for k, p in model.named_parameters()}  # fmt: skip
    state["projection.weight"] = torch.zeros(PROJECTION_DIM, config.hidden_size)
    return state


def lorsu_shaped_delta(state, generator, heads=2, sparsity=0.1) -> Delta:
    """Random values over a footprint shaped like a LoRSU session's (see module doc)."""
    delta = Delta()
    layers = sorted({int(k.split(".")[3]) for k in state if k.startswith("vision.encoder.layers.")})
    for layer in layers:
        prefix = f"vision.encoder.layers.{layer}."
        width = state[prefix + "self_attn.q_proj.weight"].shape[0]
        head_dim = width // 16
        chosen = torch.randperm(16, generator=generator)[:heads].tolist()
        rows = [h * head_dim + i for h in chosen for i in range(head_dim)]
        for p in ("q_proj", "k_proj", "v_proj"):
            weight, bias = prefix + f"self_attn.{p}.weight", prefix + f"self_attn.{p}.bias"
            region = Region.of_rows(state[weight].shape, rows)
            delta[weight] = Patch(region, torch.randn(len(rows), width, generator=generator))
            delta[bias] = Patch(Region.dense(state[bias].shape), torch.randn(width, generator=generator))  # fmt: skip
        fc1, fc1_bias = prefix + "mlp.fc1.weight", prefix + "mlp.fc1.bias"
        mask = torch.rand(state[fc1].shape, generator=generator) < sparsity
        delta[fc1] = Patch(Region.of_mask(mask), torch.randn(int(mask.sum()), generator=generator))
        shape = state[fc1_bias].shape
        delta[fc1_bias] = Patch(Region.dense(shape), torch.randn(shape, generator=generator))
    shape = state["projection.weight"].shape
    delta["projection.weight"] = Patch(Region.dense(shape), torch.randn(shape, generator=generator))  # fmt: skip
    return delta


def time_call(state, deltas: list[Delta]) -> dict:
    """One call's history work, as a forked ZeroGPU worker does it: seconds per part, wall
    clock and CPU time (on a shared machine the CPU time is what an idle one would take)."""
    parts, row = {}, {}

    def timed(name, work):
        wall, cpu = time.perf_counter(), time.process_time()
        result = work()
        parts[name] = (time.perf_counter() - wall, time.process_time() - cpu)
        return result

    payload = timed("pickle", lambda: pickle.dumps(deltas, protocol=pickle.HIGHEST_PROTOCOL))
    received = timed("unpickle", lambda: pickle.loads(payload))
    undo = timed("apply", lambda: apply_stack(state, received))
    names = received[0] if received else {}
    weights = {k: v.clone() for k, v in state.items() if k in names}
    timed("restore", lambda: restore(state, undo))
    row["payload_mb"] = round(len(payload) / 1e6, 1)
    for name, (wall, cpu) in parts.items():
        row[f"{name}_s"], row[f"{name}_cpu_s"] = round(wall, 3), round(cpu, 3)
    row["total_s"] = round(sum(wall for wall, _ in parts.values()), 3)
    row["total_cpu_s"] = round(sum(cpu for _, cpu in parts.values()), 3)
    row["_weights"] = weights
    return row


def history_cost(sessions: int = 5, arch: str = "llava-1.5-7b", seed: int = 0) -> dict:
    from .stack import fold

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    state = vision_state(arch)
    params = sum(v.numel() for v in state.values())
    deltas = [lorsu_shaped_delta(state, generator) for _ in range(sessions)]
    before = {k: v.clone() for k, v in state.items() if k in deltas[0]}
    stacked = time_call(state, deltas)
    clock, cpu = time.perf_counter(), time.process_time()
    folded = fold(deltas)
    folding, folding_cpu = time.perf_counter() - clock, time.process_time() - cpu
    one = time_call(state, [folded])
    clock, cpu = time.perf_counter(), time.process_time()
    shared = folded.share()
    sharing, sharing_cpu = time.perf_counter() - clock, time.process_time() - cpu
    file_mb = os.path.getsize(shared.shared_path) / 1e6
    del folded  # the server keeps the shared (memory-mapped) copy only
    by_path = time_call(state, [shared])
    # Every way writes the stack's weights, and each restores exactly.
    same = all(
        torch.equal(stacked["_weights"][k], row["_weights"][k])
        for row in (one, by_path)
        for k in row["_weights"]
    )
    restored = all(torch.equal(before[k], state[k]) for k in before)
    for row in (stacked, one, by_path):
        del row["_weights"]
    return {
        "arch": arch,
        "encoder_params": params,
        "sessions": sessions,
        "delta_mb": round(sum(d.nbytes for d in deltas) / sessions / 1e6, 1),
        "stack": stacked,
        "folded": one,
        "shared": by_path,
        "fold_once_s": round(folding, 3),
        "fold_once_cpu_s": round(folding_cpu, 3),
        "share_once_s": round(sharing, 3),
        "share_once_cpu_s": round(sharing_cpu, 3),
        "folded_mb": round(shared.nbytes / 1e6, 1),
        "shared_file_mb": round(file_mb, 1),
        "shared_dir": str(Path(shared.shared_path).parent),
        "bit_identical": bool(same),
        "restored_exactly": bool(restored),
        "threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
