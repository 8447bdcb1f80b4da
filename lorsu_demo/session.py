"""The session loop, shared by every method: a generator of events.

The loop applies the user's history to the shared model, lets the method score and install its
parameters, trains, merges, reads the delta at the method's footprint, evaluates, and always
puts the shared model back exactly as it found it. Closing the generator (or `should_stop`)
between events stops a session without leaving anything of it behind.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from torch.optim.adam import adam as _adam

from .data import Augment, LabelledImages, normalise, to_unit_pixels, validate
from .delta import Delta, DeltaError, apply_stack, restore, snapshot
from .evaluate import (
    EvalSet,
    accuracies,
    base_accuracies,
    class_text_features,
    count_session,
    evaluation_workers,
    other_sets_change,
    thread_pool,
    ti_cc,
    usable_cores,
)
from .events import Done, Metrics, Phase, Scores, Step, Stopped
from .history import History, HistoryError, SessionRecord
from .losses import clip_loss, logit_norm_surrogate
from .methods import Method


@dataclass
class SessionContext:
    """What a method may use during its session."""

    bundle: object
    train: LabelledImages
    classes: list[str]
    templates: list[str]
    seed: int
    method: Method
    carry: dict = field(default_factory=dict)

    def __post_init__(self):
        self.generator = torch.Generator().manual_seed(self.seed)
        processor = self.bundle.clip_image_processor
        self.unit_pixels = to_unit_pixels([i.image for i in self.train.items], processor)
        index = {c: i for i, c in enumerate(self.classes)}
        self.label_ids = torch.tensor([index[i.label] for i in self.train.items])
        self.text_bank = torch.stack(
            [
                self.bundle.text_features([t.format(label=c) for c in self.classes])
                for t in self.templates
            ]
        )
        self.augment = Augment()
        # The temperature is frozen (never in a footprint): read once per session. Reading it
        # per loss (`bundle.logit_scale` is a float) made every step and every batch of the
        # importance pass wait for the device on CUDA.
        self.logit_scale = self.bundle.logit_scale

    @property
    def batch_size(self) -> int:
        return int(self.method.hp["batch_size"])

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.train) / self.batch_size)

    def total_steps(self) -> int:
        return planned_steps(len(self.train), self.method.hp)

    def batches(self) -> Iterator[tuple[int, tuple]]:
        """(epoch, batch) for the session's `total_steps()` steps: whole shuffled passes over
        the images, the last one cut short when the method trains by iterations (DAC)."""
        total, step, epoch = self.total_steps(), 0, 0
        while step < total:
            epoch += 1
            for batch in self.epoch_batches():
                if step == total:
                    return
                step += 1
                yield epoch, batch

    def epoch_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(normalised augmented pixels, label ids, caption feature per image), shuffled."""
        order = torch.randperm(len(self.train), generator=self.generator)
        for start in range(0, len(order), self.batch_size):
            index = order[start : start + self.batch_size]
            pixels = normalise(
                self.augment(self.unit_pixels[index], self.generator),
                self.bundle.clip_image_processor,
            )
            template = torch.randint(
                0, len(self.templates), (len(index),), generator=self.generator
            )
            labels = self.label_ids[index]
            yield pixels, labels, self.text_bank[template, labels]

    def loss(self, pixels, labels, texts, objective: str = "clip") -> torch.Tensor:
        return OBJECTIVES[objective](self, pixels, labels, texts)

    def importance_gradient(
        self, names: list[str], objective: str = "clip"
    ) -> dict[str, torch.Tensor]:
        """Mean signed gradient of the objective over the session's images (no augmentation),
        weighted by batch size; squaring, if any, is the caller's business.

        One forward and one backward per batch of `batch_size` images (SPEC section 2: the
        in-batch loss depends on what a batch holds, so the batches are the definition's, not a
        speed choice), the gradients accumulating on the device. Nothing in the loop reads a
        value back to the host: on CUDA the images go to the device from pinned memory without
        waiting, and the batches queue one after the other."""
        state = self.bundle.vision_state()
        params = {n: state[n] for n in names}
        for p in params.values():
            p.requires_grad_(True)
            p.grad = None
        chosen = self.importance_order()
        limit = len(chosen)
        pixels = normalise(self.unit_pixels[chosen], self.bundle.clip_image_processor)
        device = self.bundle.device
        if device.type == "cuda":
            pixels = pixels.pin_memory()
        labels = self.label_ids[chosen]
        template = torch.arange(limit) % len(self.templates)
        texts = self.text_bank[template, labels]
        try:
            for start in range(0, limit, self.batch_size):
                part = slice(start, start + self.batch_size)
                images = pixels[part].to(device, non_blocking=True)
                loss = self.loss(images, labels[part], texts[part], objective)
                (loss * len(images) / limit).backward()
            return {n: p.grad.detach().clone() for n, p in params.items()}
        finally:
            for p in params.values():
                p.requires_grad_(False)
                p.grad = None

    def importance_order(self) -> torch.Tensor:
        """The images of the importance pass, in a seeded shuffled order, as the authors'
        shuffled loader feeds them: the in-batch loss depends on what a batch holds, and
        one-class batches give another gradient. Above `max_importance_images` the pass takes
        the first, then the second, ... image of every class, so no class is left out."""
        limit = min(len(self.train), int(self.method.hp["max_importance_images"]))
        # Its own generator: the scoring pass must not move the training batches' draws.
        generator = torch.Generator().manual_seed(self.seed + 7919)
        order = torch.randperm(len(self.train), generator=generator)
        if limit < len(order):
            seen: dict[int, int] = {}
            turn = []
            for i in order.tolist():
                label = int(self.label_ids[i])
                turn.append(seen.get(label, 0))
                seen[label] = turn[-1] + 1
            # A stable sort by "k-th image of its class" keeps the shuffle within each turn.
            by_turn = torch.tensor(turn).argsort(stable=True)
            order = order[by_turn[:limit]]
            order = order[torch.randperm(limit, generator=generator)]
        return order


class FlatAdam(torch.optim.Adam):
    """torch's foreach Adam over one flat buffer of all the trainable entries (CPU, one
    thread): one kernel per update operation for all of them, instead of one per tensor.

    A LoRSU step on the toy trains 46 tensors, and foreach Adam on the CPU loops over them:
    1,162 tensor operations a step, more than the forward's 1,002 (232 here). The parameters and
    gradients are gathered into one buffer each, the same `torch.optim.adam.adam` runs once on
    it, and the results are copied back. Entries a method's mask keeps at zero gradient
    (`masks`: 90% of fc1, the LoRA rows of unselected heads; 65% of the toy's 474,624) are
    left out: Adam would leave them exactly as they are (zero moments, a zero step).

    Adam works element by element, so every entry gets the same arithmetic as before as long
    as it is computed in a vector chunk both ways: only where every tensor's size is a
    multiple of 64 (the toy's all are), on one thread (`applies`), the buffer padded to a
    multiple of 64. A seeded toy session is bit-identical. A step where some tensor has no
    gradient (Adam skips it, its step count stays behind) runs per tensor on slices of the
    flat state, as torch's Adam would."""

    ALIGN = 64

    @classmethod
    def applies(cls, params: list[torch.Tensor]) -> bool:
        return (
            torch.get_num_threads() == 1
            and bool(params)
            and all(
                p.device.type == "cpu"
                and p.dtype == torch.float32
                and p.is_contiguous()
                and p.numel() % cls.ALIGN == 0
                for p in params
            )
        )

    def __init__(self, params, lr: float, masks: dict | None = None):
        super().__init__(params, lr=lr, weight_decay=0.0, foreach=True)
        self.members = list(self.param_groups[0]["params"])
        masks = masks or {}
        # Per member: its entries as a flat view, and which of them train (None: all).
        self.member_views = [p.detach().view(-1) for p in self.members]
        self.active = []
        for p in self.members:
            mask = masks.get(p)
            index = None
            if mask is not None:
                index = mask.expand_as(p).reshape(-1).nonzero().squeeze(1)
                if len(index) == p.numel():
                    index = None
            self.active.append(index)
        self.sizes = [p.numel() if i is None else len(i) for p, i in zip(self.members, self.active)]
        total = sum(self.sizes)
        self.pad = torch.zeros(-total % self.ALIGN, dtype=torch.float32)
        self.flat = torch.cat([*self._pieces(self.member_views), self.pad])
        self.flat_views = list(self.flat.split([*self.sizes, len(self.pad)]))[: len(self.members)]
        self.flat_grad = torch.zeros_like(self.flat)
        self.exp_avg = torch.zeros_like(self.flat)
        self.exp_avg_sq = torch.zeros_like(self.flat)
        self.steps = [0] * len(self.members)

    def _pieces(self, flats: list[torch.Tensor]) -> list[torch.Tensor]:
        return [f if i is None else f.index_select(0, i) for f, i in zip(flats, self.active)]

    def _put_back(self, chosen: list[int], values: list[torch.Tensor]) -> None:
        whole = [k for k in chosen if self.active[k] is None]
        if whole:
            torch._foreach_copy_([self.member_views[k] for k in whole], [values[k] for k in whole])
        for k in chosen:
            if self.active[k] is not None:
                self.member_views[k].index_copy_(0, self.active[k], values[k])

    @torch.no_grad()
    def step(self, closure=None):
        group = self.param_groups[0]
        beta1, beta2 = group["betas"]
        settings = dict(
            foreach=True,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=0.0,
            eps=group["eps"],
            maximize=False,
        )
        everyone = range(len(self.members))
        if all(p.grad is not None for p in self.members) and len(set(self.steps)) == 1:
            torch.cat([*self._pieces(self.member_views), self.pad], out=self.flat)
            grads = [p.grad.view(-1) for p in self.members]
            torch.cat([*self._pieces(grads), self.pad], out=self.flat_grad)
            step = torch.tensor(float(self.steps[0]))
            _adam(
                [self.flat], [self.flat_grad], [self.exp_avg], [self.exp_avg_sq], [], [step],
                **settings,
            )  # fmt: skip
            self._put_back(list(everyone), self.flat_views)
            self.steps = [n + 1 for n in self.steps]
            return None
        chosen = [k for k in everyone if self.members[k].grad is not None]
        if not chosen:
            return None
        sizes = [*self.sizes, len(self.pad)]
        avgs, squares = self.exp_avg.split(sizes), self.exp_avg_sq.split(sizes)
        values = self._pieces(self.member_views)
        values = [v.clone() if i is None else v for v, i in zip(values, self.active)]
        grads = self._pieces(
            [p.grad.view(-1) if p.grad is not None else p.detach().view(-1) for p in self.members]
        )
        _adam(
            [values[k] for k in chosen],
            [grads[k] for k in chosen],
            [avgs[k] for k in chosen],
            [squares[k] for k in chosen],
            [],
            [torch.tensor(float(self.steps[k])) for k in chosen],
            **settings,
        )
        self._put_back(chosen, values)
        for k in chosen:
            self.steps[k] += 1
        return None


def planned_steps(images: int, settings: dict) -> int:
    """Training steps of a session: `iterations` when a method trains by steps (DAC, as its
    authors), else `epochs` passes of ceil(images / batch_size) steps."""
    iterations = int(settings.get("iterations") or 0)
    if iterations > 0:
        return iterations
    batch = max(1, int(settings.get("batch_size", 16)))
    return int(settings.get("epochs", 5)) * math.ceil(images / batch)


def _clip_objective(ctx, pixels, labels, texts):
    features = ctx.bundle.image_features(pixels)
    multi_positive = ctx.method.hp["multi_positive"]
    return clip_loss(
        features,
        texts.to(features.device),
        labels.to(features.device) if multi_positive else labels,  # the paper's loss: unused
        ctx.logit_scale,
        multi_positive,
    )


def _spu_objective(ctx, pixels, labels, texts):
    features = ctx.bundle.image_features(pixels)
    return logit_norm_surrogate(features, texts.to(features.device), ctx.logit_scale)


AUTOCAST = {"bf16": "bfloat16"}
OBJECTIVES: dict[str, Callable] = {"clip": _clip_objective, "spu": _spu_objective}


def cosine_with_warmup(total: int, warmup_fraction: float) -> Callable[[int], float]:
    """Per-step schedule. Step 0 already trains at lr/(warmup+1): no wasted zero-lr step."""
    warmup = min(total - 1, math.ceil(warmup_fraction * total)) if total > 1 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def evaluation_steps(total: int, points: int) -> set[int]:
    return {max(1, round(total * (i + 1) / points)) for i in range(points)} if points else set()


# The app may run sessions at once in threads, each on its own copy of a small CPU model
# (`ui.engine.use_model`). torch's global random generator is one per process, so the part of
# a session that draws from it (seeding, scoring, installing: LoRA initialisation) takes this
# lock, and so does a training loop with active dropout: a seed then reproduces a session
# however many run beside it.
GLOBAL_RNG = threading.Lock()


def _draws_per_step(module) -> bool:
    """Whether a training step draws from the global generator (dropout that is on)."""
    return any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in module.modules())


def run_session(
    bundle,
    history: History,
    method: Method,
    train: LabelledImages,
    *,
    target: EvalSet,
    controls: list[EvalSet] = (),
    extra_sets: list[EvalSet] = (),
    trained_sets: list[str] | None = None,
    seed: int = 0,
    shots: int | None = None,
    templates: list[str] | None = None,
    eval_points: int = 4,
    reader: str = "clip",
    should_stop: Callable[[], bool] | None = None,
    autocast: str | None = None,
    sync_each_step: bool | None = None,
) -> Iterator:
    """Train one session on `train`; yield events; end with `Done(record)` or `Stopped`.

    The history is only read: the caller appends the record (so a forked GPU worker can run
    this and hand the record back). `record.extra["base"]` holds newly measured base accuracies.

    GPU speed (off by default where it changes results): `autocast="bf16"` runs the training
    steps' forward under `torch.autocast` in bfloat16 while the weights, gradients and Adam's
    state stay fp32 (master weights; the importance pass and evaluations stay fp32).
    `sync_each_step=False` (the default on CUDA) reads a step's loss only once the next step has
    been queued, so the host never waits for the device mid-loop; the Step events then come one
    step late, and all of them before any evaluation and at the end. Adam is fused on CUDA.
    """
    if autocast not in (None, "bf16"):  # fp16 would need loss scaling; bf16 does not
        raise ValueError(f"autocast must be 'bf16' or None, not {autocast!r}")
    validate(train)
    earlier = sorted({s.extra.get("reader", "clip") for s in history.sessions} - {reader})
    if earlier:
        # The base accuracies in the history were read that way: TI and CC would mix readers.
        raise HistoryError(
            f"This history measured accuracy with the '{earlier[0]}' reader; continue it with "
            f"that reader (not '{reader}'), or start a new history."
        )
    controls, extra_sets = list(controls), list(extra_sets)
    all_sets = [target, *controls, *extra_sets]
    templates = templates or target.templates or bundle.caption_templates
    index = len(history) + 1
    seconds: dict[str, float] = {}
    state = bundle.vision_state()
    record = None
    undo, session_undo, merged, trainable = [], [], False, []
    seeded = False
    bundle.lock.acquire()
    count_session(+1)
    try:
        clock = time.perf_counter()
        missing = [s for s in all_sets if s.name not in history.base]
        new_base = {}
        if missing:
            yield Phase("base", "Measuring the untouched model on the new test sets")
            new_base = base_accuracies(bundle, missing, reader)
        base = {**history.base, **new_base}
        seconds["base"] = time.perf_counter() - clock

        clock = time.perf_counter()
        undo = apply_stack(state, history.deltas())
        GLOBAL_RNG.acquire()
        seeded = True
        torch.manual_seed(seed)
        ctx = SessionContext(
            bundle,
            train,
            sorted(set(train.classes)),
            templates,
            seed,
            method,
            history.carry_for(method.name),
        )
        yield Phase(
            "scoring", "Scoring heads: one pass over the images to see which parameters matter"
        )
        method.prepare(ctx)
        scored = method.report(ctx)
        yield Scores(
            scored["head_scores"],
            scored["selected_heads"],
            scored["fc1_density"],
            bundle.layers_read_by_vlm,
        )
        footprint = method.footprint(ctx)
        session_undo = snapshot(state, footprint)
        trainable = method.install(ctx)
        if not _draws_per_step(bundle.clip):
            seeded = False
            GLOBAL_RNG.release()
        seconds["scoring"] = time.perf_counter() - clock

        clock = time.perf_counter()
        total = ctx.total_steps()
        # The same Adam arithmetic every way (a seeded toy session's delta is bit-identical):
        # fused on CUDA, one flat buffer on one CPU thread (FlatAdam), foreach otherwise.
        cuda = bundle.device.type == "cuda"
        if not cuda and FlatAdam.applies(trainable):
            optimizer = FlatAdam(trainable, lr=float(method.hp["lr"]), masks=method.masks)
        else:
            optimizer = torch.optim.Adam(
                trainable,
                lr=float(method.hp["lr"]),
                weight_decay=0.0,
                **({"fused": True} if cuda else {"foreach": True}),
            )
        if sync_each_step is None:
            sync_each_step = not cuda
        compute = (
            torch.autocast(bundle.device.type, dtype=getattr(torch, AUTOCAST[autocast]))
            if autocast
            else contextlib.nullcontext()
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, cosine_with_warmup(total, float(method.hp["warmup"]))
        )
        before = history.accuracies_after(len(history))
        before = {**base, **before}
        target_names = [target.name, *[c.name for c in controls]]
        ti, cc = ti_cc(before, base, target.name, [c.name for c in controls])
        yield Metrics(
            0,
            {n: before[n] for n in target_names},
            before[target.name],
            _control(before, controls),
            ti,
            cc,
        )
        yield Phase("training", f"Training {total} steps")
        curve, live, pending = [], [], []
        eval_at = evaluation_steps(total, eval_points)
        # Live points measured on a frozen copy in another thread while training goes on,
        # where a second core would otherwise idle (`evaluation_workers`); in line otherwise.
        # (A pool as wide as the machine: the app's CPU lanes each run a session at once.)
        measuring: list[tuple[int, Future]] = []
        aside = evaluation_workers(bundle) > 1

        def live_point(point: tuple[int, Future]) -> Metrics:
            measured_step, now = point[0], point[1].result()
            ti, cc = ti_cc(now, base, target.name, [c.name for c in controls])
            live.append({"step": measured_step, **now})
            return Metrics(measured_step, now, now[target.name], _control(now, controls), ti, cc)

        step = 0
        # Train mode for the whole loop, eval mode only while measuring: switching the whole
        # CLIP's mode (a walk over every module) twice a step was a tenth of a toy step.
        bundle.clip.train()
        for epoch, (pixels, labels, texts) in ctx.batches():
            if should_stop is not None and should_stop():
                yield Stopped(f"Stopped at step {step} of {total}: nothing changed.")
                return
            lr = schedule.get_last_lr()[0]
            with compute:
                loss = ctx.loss(pixels, labels, texts, method.objective)
                extra = method.extra_loss(ctx)
                if extra is not None:
                    loss = loss + extra
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            method.shape_gradients()
            optimizer.step()
            method.after_step(lr)
            schedule.step()
            step += 1
            pending.append((step, epoch, loss.detach(), lr))
            # Read the losses of the steps before this one (done on the device by now), or
            # all of them where a measurement or the end follows (it waits for the device).
            flush_all = sync_each_step or step in eval_at or step == total
            for done_step, done_epoch, done_loss, done_lr in pending[: None if flush_all else -1]:
                value = float(done_loss)
                curve.append({"step": done_step, "loss": value, "lr": done_lr})
                yield Step(done_step, total, done_epoch, value, done_lr)
            pending = [] if flush_all else pending[-1:]
            if step in eval_at and step < total:
                bundle.clip.eval()
                if aside and reader == "clip":
                    for eval_set in (target, *controls):  # caches the copy takes along
                        eval_set.pixels(bundle)
                        class_text_features(
                            bundle, eval_set.classes, eval_set.templates or bundle.caption_templates
                        )
                frozen = bundle.frozen_copy() if aside else None
                if frozen is None:
                    now = accuracies(bundle, [target, *controls], reader)
                    measuring.append((step, _finished(now)))
                else:
                    pool = thread_pool(max(2, usable_cores()))
                    job = pool.submit(accuracies, frozen, [target, *controls], reader)
                    measuring.append((step, job))
                bundle.clip.train()
            while measuring and (measuring[0][1].done() or step == total):
                yield live_point(measuring.pop(0))
        for done_step, done_epoch, done_loss, done_lr in pending:  # a loop that ended early
            value = float(done_loss)
            curve.append({"step": done_step, "loss": value, "lr": done_lr})
            yield Step(done_step, total, done_epoch, value, done_lr)
        while measuring:
            yield live_point(measuring.pop(0))
        bundle.clip.eval()
        if seeded:
            seeded = False
            GLOBAL_RNG.release()
        seconds["training"] = time.perf_counter() - clock

        clock = time.perf_counter()
        yield Phase("merging", "Merging the update into the encoder")
        method.merge(ctx, footprint)
        merged = True
        delta = Delta.read(state, footprint)
        if not all(bool(torch.isfinite(p.values).all()) for p in delta.values()):
            # Every later apply refuses non-finite values, so say so now, not at the next chat.
            raise DeltaError(
                "Training diverged: the update holds NaN or infinite values. Lower the "
                "learning rate."
            )
        seconds["merging"] = time.perf_counter() - clock

        clock = time.perf_counter()
        yield Phase("evaluating", "Evaluating the adapted model")
        measured = accuracies(bundle, all_sets, reader)
        ti, cc = ti_cc(measured, base, target.name, [c.name for c in controls])
        trained_here = trained_sets if trained_sets is not None else [target.name]
        others = other_sets_change(
            measured, base, before, {target.name, *(c.name for c in controls), *trained_here}
        )
        live.append({"step": total, **{n: measured[n] for n in target_names}})
        yield Metrics(
            total,
            {n: measured[n] for n in target_names},
            measured[target.name],
            _control(measured, controls),
            ti,
            cc,
        )
        seconds["evaluating"] = time.perf_counter() - clock
        report = method.report(ctx)
        record = SessionRecord(
            index=index,
            method=method.name,
            settings=dict(method.hp),
            target=target.name,
            classes=ctx.classes,
            shots=shots or max(train.counts().values()),
            images=len(train),
            seed=seed,
            delta=delta,
            accuracies=measured,
            ti=ti,
            cc=cc,
            controls=[c.name for c in controls],
            trained_sets=trained_sets if trained_sets is not None else [target.name],
            head_scores=report["head_scores"],
            selected_heads=report["selected_heads"],
            layers_read=bundle.layers_read_by_vlm,
            fc1_density=report["fc1_density"],
            trainable_params=report["trainable_params"],
            seconds=seconds,
            curve=curve,
            carry={k: v.detach().cpu() for k, v in method.carry().items()},
            extra={
                "base": new_base,
                "reader": reader,
                "live": live,
                "others": others,
                **{k: v for k, v in report.items() if k not in _REPORTED},
            },
        )
    finally:
        if not merged:
            method.remove(ctx) if "ctx" in locals() else None
        restore(state, session_undo)
        restore(state, undo)
        for param in trainable:
            param.requires_grad_(False)
            param.grad = None
        bundle.clip.eval()
        if seeded:
            GLOBAL_RNG.release()
        count_session(-1)
        bundle.lock.release()
    yield Done(f"Done: session {index} saved", record)


def _finished(value) -> Future:
    future = Future()
    future.set_result(value)
    return future


_REPORTED = {"head_scores", "selected_heads", "fc1_density", "trainable_params"}


def _control(accuracies, controls) -> float:
    if not controls:
        return float("nan")
    return sum(accuracies[c.name] for c in controls) / len(controls)


from .vqa import answer_loss  # noqa: E402

OBJECTIVES["ppl"] = answer_loss  # LoRSU-Ppl: the VLM's answer loss
