"""Benchmarks at the real scale: `python -m lorsu_demo bench flops|session`.

`bench flops` counts, with `torch.utils.flop_counter.FlopCounterMode` on the meta device (no
weights, no GPU), the FLOPs of one few-shot session the size of a CL-5 GTSRB session in the paper
(45 images at 336 px, 5 epochs, batch 16, plus the importance pass) for each method, and for a
full update of the whole VLM with the perplexity loss (`full-vlm`, SPEC section 7).

`bench session` builds the real architecture with random weights on a GPU and times one such
session per method (seconds per phase, peak GPU memory) through the real session loop.
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from .arch import ARCHS, build_bundle, parameter_counts
from .data import Item, LabelledImages, normalise
from .evaluate import EvalSet
from .methods import make_method
from .methods.base import Method, count_masked
from .session import SessionContext, run_session
from .vqa import PPL_ANSWER, PPL_PROMPT, answer_batch, display_name

# The first nine GTSRB classes: a CL-5 session of the paper's 9/9/9/8/8 split.
GTSRB_CLASSES = [
    "speed limit 20",
    "speed limit 30",
    "speed limit 50",
    "speed limit 60",
    "speed limit 70",
    "speed limit 80",
    "end of speed limit 80",
    "speed limit 100",
    "speed limit 120",
]
GTSRB_TEMPLATES = [
    'a zoomed in photo of a "{label}" traffic sign.',
    'a centered photo of a "{label}" traffic sign.',
    'a close up photo of a "{label}" traffic sign.',
]
FLOPS_METHODS = ["lorsu", "lorsu-ppl", "lora", "spu", "full", "full-vlm"]
SESSION_METHODS = ["lorsu", "lorsu-ppl", "lora", "spu", "full"]
PAPER_RATIO = 25.0


class FullVLM(Method):
    """Every parameter of the VLM (encoder, projector, LLM) with the answer loss: the paper's
    reference point for its compute claim. Only for counting; never offered in the app."""

    name = "full-vlm"
    summary = "every VLM parameter, perplexity loss (the compute reference)"
    objective = "ppl"
    defaults = {"question": None}

    def footprint(self, ctx):
        return {}

    def install(self, ctx):
        return self.unfreeze(ctx.bundle.vlm.parameters())


def bench_method(name: str, **settings) -> Method:
    if name == FullVLM.name:
        return FullVLM(**settings)
    return make_method(name, **settings)


def synthetic_images(classes: list[str], per_class: int, size: int, seed: int) -> LabelledImages:
    """Seeded noise images (timings and FLOPs do not depend on what the pixels show)."""
    rng = np.random.default_rng(seed)
    items = [
        Item(Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)), label)
        for label in classes
        for _ in range(per_class)
    ]
    return LabelledImages(f"synthetic-{seed}", items)


def delta_nbytes(footprint, state) -> int:
    """What `Delta.read(state, footprint).nbytes` will be, computed from shapes alone."""
    return sum(
        region.size * state[name].element_size() + region.index_bytes
        for name, region in footprint.items()
    )


# ---- FLOPs on the meta device ---------------------------------------------------------------


class StepFlops:
    """FLOPs of repeated steps. FLOPs depend only on shapes, so each (phase, shape) is counted
    once, by running it under FlopCounterMode, and added again whenever it recurs."""

    def __init__(self):
        self.memo: dict = {}
        self.phases: dict[str, int] = defaultdict(int)
        self.steps: dict[str, int] = defaultdict(int)

    def run(self, phase: str, key, step) -> None:
        if (phase, key) not in self.memo:
            with FlopCounterMode(display=False) as counter:
                step()
            self.memo[(phase, key)] = counter.get_total_flops()
        self.phases[phase] += self.memo[(phase, key)]
        self.steps[phase] += 1


class CountingContext(SessionContext):
    """The session's context on a meta bundle: its importance pass is counted (every batch,
    like `SessionContext.importance_gradient`), and seeded random gradients stand in for the
    gradients a meta tensor cannot hold, so scores, masks and footprints are real."""

    flops: StepFlops

    def importance_gradient(self, names, objective="clip"):
        state = self.bundle.vision_state()
        params = [state[n] for n in names]
        limit = min(len(self.train), int(self.method.hp["max_importance_images"]))
        pixels = normalise(self.unit_pixels[:limit], self.bundle.clip_image_processor)
        labels = self.label_ids[:limit]
        texts = self.text_bank[torch.arange(limit) % len(self.templates), labels]
        for p in params:
            p.requires_grad_(True)
        try:
            for start in range(0, limit, self.batch_size):
                part = slice(start, start + self.batch_size)

                def step(part=part):
                    loss = self.loss(pixels[part], labels[part], texts[part], objective)
                    (loss * len(labels[part]) / limit).backward()

                self.flops.run("importance", step_key(self, labels[part], objective), step)
        finally:
            for p in params:
                p.requires_grad_(False)
                p.grad = None
        generator = torch.Generator().manual_seed(self.seed)
        return {n: torch.randn(p.shape, generator=generator) * 1e-3 for n, p in zip(names, params)}

    def epoch_batches(self):
        """The session's batches (same shuffle, same sizes) without the augmentation, which
        changes no shape and so no FLOP count."""
        order = torch.randperm(len(self.train), generator=self.generator)
        for start in range(0, len(order), self.batch_size):
            index = order[start : start + self.batch_size]
            pixels = normalise(self.unit_pixels[index], self.bundle.clip_image_processor)
            labels = self.label_ids[index]
            yield pixels, labels, self.text_bank[torch.zeros_like(labels), labels]


def step_key(ctx, labels, objective: str):
    """Everything the FLOPs of one step depend on: the batch size and, for the answer loss,
    the token sequence length and where the answers start."""
    if objective != "ppl":
        return (len(labels),)
    answers = [PPL_ANSWER.format(label=display_name(ctx.classes[int(i)])) for i in labels]
    prompts = [PPL_PROMPT.format(question="q")] * len(answers)
    batch = answer_batch(ctx.bundle, prompts, answers)
    return (len(labels), tuple(batch["input_ids"].shape), batch["start"])


def session_layout(images: int, classes: int) -> tuple[list[str], int]:
    names = (GTSRB_CLASSES + [f"class {i}" for i in range(len(GTSRB_CLASSES), classes)])[:classes]
    return names, max(1, images // classes)


def count_session_flops(
    bundle,
    method_name: str,
    *,
    images: int = 45,
    classes: int = 9,
    epochs: int = 5,
    batch_size: int = 16,
    seed: int = 0,
    **settings,
) -> dict:
    """Count one session of `method_name` on a meta bundle; the model is left as it was."""
    names, per_class = session_layout(images, classes)
    train = synthetic_images(names, per_class, 32, seed)
    method = bench_method(method_name, epochs=epochs, batch_size=batch_size, **settings)
    flops = StepFlops()
    with FlopCounterMode(display=False) as captions:
        ctx = CountingContext(bundle, train, sorted(names), GTSRB_TEMPLATES, seed, method)
    ctx.flops = flops
    method.prepare(ctx)
    report = method.report(ctx)
    footprint = method.footprint(ctx)
    trainable = method.install(ctx)
    try:
        for _epoch in range(epochs):
            for pixels, labels, texts in ctx.epoch_batches():

                def step(pixels=pixels, labels=labels, texts=texts):
                    loss = ctx.loss(pixels, labels, texts, method.objective)
                    extra = method.extra_loss(ctx)
                    if extra is not None:
                        loss = loss + extra
                    loss.backward()
                    method.shape_gradients()
                    for p in trainable:
                        p.grad = None

                flops.run("training", step_key(ctx, labels, method.objective), step)
    finally:
        method.remove(ctx)
        for p in trainable:
            p.requires_grad_(False)
            p.grad = None
    phases = {"captions": captions.get_total_flops(), **flops.phases}
    state = bundle.vision_state()
    if method_name == FullVLM.name:
        delta = sum(p.numel() * p.element_size() for p in bundle.vlm.parameters())
    else:
        delta = delta_nbytes(footprint, state)
    return {
        "tflops": sum(phases.values()) / 1e12,
        "tflops_by_phase": {k: v / 1e12 for k, v in phases.items()},
        "steps": dict(flops.steps),
        "trainable_params": trainable_params(method, report, footprint, trainable),
        "optimizer_params": sum(p.numel() for p in trainable),
        "delta_bytes": delta,
        "objective": method.objective,
    }


def trainable_params(method, report, footprint, trainable) -> int:
    """The entries a session learns. LoRSU: SPEC section 2's count (`paper_params`). A method
    with gradient masks trains exactly its footprint; others, every entry they unfreeze."""
    if report.get("paper_params") is not None:
        return int(report["paper_params"])
    if not method.masks:
        return sum(p.numel() for p in trainable)
    if all(not m.is_meta for m in method.masks.values()):
        return count_masked(trainable, method.masks)
    return sum(region.size for region in footprint.values())


def count_flops(arch: str, methods: list[str], **session) -> dict:
    bundle = build_bundle(arch, "meta", torch.bfloat16, words=_words())
    from .model import keep_encoder_fp32

    keep_encoder_fp32(bundle)  # the GPU precision policy: encoder deltas are fp32
    out = {name: count_session_flops(bundle, name, **session) for name in methods}
    names, per_class = session_layout(session.get("images", 45), session.get("classes", 9))
    probe = answer_batch(
        bundle,
        [PPL_PROMPT.format(question="What is in the image?")],
        [PPL_ANSWER.format(label=names[0])],
    )
    result = {
        "arch": arch,
        "device": "meta",
        "counter": "torch.utils.flop_counter.FlopCounterMode (matmul, conv and attention FLOPs)",
        "session": {
            "images": per_class * len(names),
            "classes": len(names),
            "epochs": session.get("epochs", 5),
            "batch_size": session.get("batch_size", 16),
            "image_size": bundle.image_size,
            "answer_sequence_tokens": int(probe["input_ids"].shape[1]),
        },
        "params": parameter_counts(bundle),
        "methods": out,
    }
    if "lorsu" in out and "full-vlm" in out:
        ratio = out["full-vlm"]["tflops"] / out["lorsu"]["tflops"]
        result["ratio_full_vlm_to_lorsu"] = ratio
        result["paper_claim"] = f"more than {PAPER_RATIO:.0f}x"
    return result


def _words() -> list[str]:
    return sorted({w for name in GTSRB_CLASSES for w in name.split()} | {"traffic", "sign"})


# ---- timings on a GPU -----------------------------------------------------------------------


def real_bundle(arch: str, device: str, memory: str = "bf16", encoder_fp32: bool = True):
    """The real architecture with random weights on `device`, under a memory mode."""
    from .arch import quantize_llm_4bit
    from .model import keep_encoder_fp32

    torch.manual_seed(0)
    bundle = build_bundle(arch, device, torch.bfloat16, words=_words())
    bundle.clip.logit_scale.data = bundle.clip.logit_scale.data.float()
    if encoder_fp32:
        keep_encoder_fp32(bundle)
    if memory == "4bit":
        quantize_llm_4bit(bundle, device)
    return bundle


def _sync(bundle) -> None:
    if bundle.device.type == "cuda":
        torch.cuda.synchronize()


# Dense bf16 tensor-core peaks (TFLOP/s) for the fraction of the ideal; others: --peak-tflops.
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4}


def _digits(value: float) -> float:
    """Four significant digits (a tiny model's rate is far below a thousandth of a TFLOP/s)."""
    return float(f"{value:.4g}")


def peak_tflops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_TFLOPS.items() if k in device_name), None)


def time_session(
    bundle, method_name: str, train, target, reader="clip", seed=0, autocast=None, **settings
):
    """One session through the real loop: seconds per phase, peak memory, what changed."""
    cuda = bundle.device.type == "cuda"
    _sync(bundle)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    state = bundle.vision_state()
    start = time.perf_counter()
    events = list(
        run_session(
            bundle,
            _history(),
            make_method(method_name, **settings),
            train,
            target=target,
            seed=seed,
            eval_points=0,
            reader=reader,
            autocast=autocast,
        )
    )
    _sync(bundle)
    wall = time.perf_counter() - start
    record = events[-1].record
    total = moved = 0
    for name, patch in record.delta.items():
        before = patch.region.read(state[name]).cpu()
        moved += int((patch.values != before).sum())
        total += before.numel()
    return {
        "seconds": round(wall, 3),
        "seconds_by_phase": {k: round(v, 3) for k, v in record.seconds.items()},
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "trainable_params": record.extra.get("paper_params") or record.trainable_params,
        "delta_bytes": record.delta_bytes,
        # Share of the footprint's values the session actually moved (16-bit weights lose
        # updates of lr = 1e-5 to rounding).
        "footprint_values_moved": round(moved / max(1, total), 4),
        "loss_first_last": [round(record.curve[0]["loss"], 4), round(record.curve[-1]["loss"], 4)],
    }


def _history():
    from .history import History

    return History()


def augmentation_seconds(bundle, train, epochs: int, batch_size: int, seed: int = 0) -> float:
    """CPU time of the session's augmented batches alone (part of the training phase)."""
    method = make_method("lorsu", epochs=epochs, batch_size=batch_size)
    ctx = SessionContext(bundle, train, sorted(set(train.classes)), GTSRB_TEMPLATES, seed, method)
    start = time.perf_counter()
    for _ in range(epochs):
        for _batch in ctx.epoch_batches():
            pass
    return round(time.perf_counter() - start, 3)


def reader_seconds(bundle, target, reader: str) -> dict:
    from .evaluate import accuracy

    _sync(bundle)
    start = time.perf_counter()
    value = accuracy(bundle, target, reader)
    _sync(bundle)
    return {"seconds": round(time.perf_counter() - start, 3), "accuracy": value}


def time_sessions(
    arch: str,
    device: str,
    methods: list[str],
    *,
    images: int = 45,
    classes: int = 9,
    epochs: int = 5,
    batch_size: int = 16,
    reader: str = "clip",
    memory: str = "bf16",
    precision_check: bool = True,
    factory=None,
    autocast: str | None = None,
    count: bool = True,
    peak: float | None = None,
) -> dict:
    """Time one session per method. `factory(encoder_fp32=...)` builds the bundle (default:
    the real architecture with random weights on `device`)."""
    factory = factory or (lambda **kw: real_bundle(arch, device, memory, **kw))
    clock = time.perf_counter()
    bundle = factory(encoder_fp32=True)
    _sync(bundle)
    build_seconds = time.perf_counter() - clock
    cuda = bundle.device.type == "cuda"
    names, per_class = session_layout(images, classes)
    size = bundle.image_size
    train = synthetic_images(names, per_class, size, seed=1)
    target = EvalSet("target", synthetic_images(names, per_class, size, seed=2), names)
    target.templates = GTSRB_TEMPLATES
    settings = {"epochs": epochs, "batch_size": batch_size}
    # A short warm-up (CUDA context, kernels, allocator) that is not reported.
    time_session(bundle, "lorsu", train, target, reader, epochs=1, batch_size=batch_size)
    result = {
        "arch": arch,
        "device": torch.cuda.get_device_name() if cuda else str(bundle.device),
        "torch": torch.__version__,
        "memory": memory,
        "precision": "LLM and projector bf16"
        + (" (LLM linears 4-bit NF4)" if memory == "4bit" else "")
        + ", vision tower fp32 (TF32 matmuls)",
        "build_seconds": round(build_seconds, 1),
        "weights_gib": round(torch.cuda.memory_allocated() / 2**30, 2) if cuda else None,
        "session": {"images": per_class * len(names), "classes": len(names), **settings},
        "reader": reader,
        "augmentation_seconds": augmentation_seconds(bundle, train, epochs, batch_size),
        "methods": {},
    }
    result["autocast"] = autocast
    peak = peak or (peak_tflops(result["device"]) if cuda else None)
    result["peak_tflops"] = peak
    for name in methods:
        try:
            row = time_session(bundle, name, train, target, reader, autocast=autocast, **settings)
            if count:
                # The session's FLOP count (importance pass, training, captions; what `bench
                # flops` counts), measured on this bundle, over the whole session's seconds.
                counted = count_session_flops(
                    bundle, name, images=images, classes=classes, **settings
                )["tflops"]
                achieved = counted / row["seconds"]
                row["counted_tflops"] = _digits(counted)
                row["achieved_tflops_per_s"] = _digits(achieved)
                if peak:
                    row["ideal_fraction"] = _digits(achieved / peak)
            result["methods"][name] = row
        except torch.cuda.OutOfMemoryError as err:
            result["methods"][name] = {"error": f"out of memory: {str(err)[:200]}"}
            torch.cuda.empty_cache()
    result["readers"] = {r: reader_seconds(bundle, target, r) for r in ("clip", "mc", "open")}
    if precision_check:
        # The same lorsu session with the vision tower left in bf16.
        del bundle
        if cuda:
            torch.cuda.empty_cache()
        bf16 = factory(encoder_fp32=False)
        result["lorsu_with_bf16_encoder"] = time_session(
            bf16, "lorsu", train, target, reader, **settings
        )
    return result


# ---- command line ---------------------------------------------------------------------------


def cmd_flops(args) -> int:
    result = count_flops(
        args.arch,
        args.methods or FLOPS_METHODS,
        images=args.images,
        classes=args.classes,
        epochs=args.epochs,
        batch_size=args.batch_size,
    )
    print(json.dumps(result, indent=None if args.json else 2))
    if not args.json:
        _print_flops_table(result)
    return 0


def _print_flops_table(result) -> None:
    print(f"\n{'method':<10}{'TFLOPs':>10}{'trainable':>14}{'delta MB':>11}", file=sys.stderr)
    for name, row in result["methods"].items():
        print(
            f"{name:<10}{row['tflops']:>10.1f}{row['trainable_params']:>14,}"
            f"{row['delta_bytes'] / 1e6:>11.1f}",
            file=sys.stderr,
        )


def cmd_session(args) -> int:
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA device here; `bench session` needs a GPU", file=sys.stderr)
        return 2
    result = time_sessions(
        args.arch,
        args.device,
        args.methods or SESSION_METHODS,
        images=args.images,
        classes=args.classes,
        epochs=args.epochs,
        batch_size=args.batch_size,
        reader=args.eval,
        memory=args.memory,
        precision_check=not args.no_precision_check,
        autocast=None if args.autocast == "off" else args.autocast,
        peak=args.peak_tflops,
    )
    for name, row in result["methods"].items():
        if "seconds" in row:
            ideal = row.get("ideal_fraction")
            print(
                f"{name}: {row['seconds']:.2f} s, {row.get('achieved_tflops_per_s', 0):.1f} "
                f"TFLOP/s achieved"
                + (f", {100 * ideal:.1f}% of the ideal" if ideal is not None else ""),
                file=sys.stderr,
            )
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


def add_commands(commands) -> None:
    bench = commands.add_parser("bench", help="FLOPs (meta device) and GPU timings at full scale")
    kinds = bench.add_subparsers(dest="bench", required=True)
    for kind, func, help_text in (
        ("flops", cmd_flops, "count one session's FLOPs per method on the meta device"),
        ("session", cmd_session, "time one session per method on a GPU, random weights"),
    ):
        sub = kinds.add_parser(kind, help=help_text)
        sub.add_argument("--arch", default="llava-1.5-7b", choices=list(ARCHS))
        sub.add_argument("--methods", nargs="+", help="default: all of the benchmark's methods")
        sub.add_argument("--images", type=int, default=45)
        sub.add_argument("--classes", type=int, default=9)
        sub.add_argument("--epochs", type=int, default=5)
        sub.add_argument("--batch-size", type=int, default=16)
        sub.add_argument("--json", action="store_true", help="one line of JSON")
        if kind == "session":
            sub.add_argument("--device", default="cuda")
            sub.add_argument("--eval", default="clip", choices=["clip", "mc", "open"])
            sub.add_argument("--memory", default="bf16", choices=["bf16", "4bit"])
            sub.add_argument(
                "--no-precision-check",
                action="store_true",
                help="skip the extra lorsu session with a bf16 vision tower",
            )
            sub.add_argument(
                "--autocast",
                default="bf16",
                choices=["bf16", "off"],
                help="bf16 autocast over fp32 master weights for the training steps",
            )
            sub.add_argument(
                "--peak-tflops",
                type=float,
                default=None,
                help="the device's dense bf16 peak (default: known for H100/H200)",
            )
        sub.set_defaults(func=func)
    history = kinds.add_parser(
        "history", help="per-call cost of shipping a LoRSU history at ViT-L scale (CPU)"
    )
    history.add_argument("--sessions", type=int, default=5)
    history.add_argument("--arch", default="llava-1.5-7b", choices=list(ARCHS))
    history.add_argument("--json", action="store_true", help="one line of JSON")
    history.set_defaults(func=cmd_history)
    from .bench_classroom import add_classroom_command, add_start_command

    add_classroom_command(kinds)
    add_start_command(kinds)


def cmd_history(args) -> int:
    from .bench_history import history_cost

    result = history_cost(args.sessions, args.arch)
    print(json.dumps(result, indent=None if args.json else 2))
    return 0
