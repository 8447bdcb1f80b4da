"""Accuracy readers and continual-learning metrics. Accuracies are percentages (0-100)."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from .data import LabelledImages, normalise, to_unit_pixels


@dataclass
class EvalSet:
    """A labelled test set and the class names it is judged against."""

    name: str
    images: LabelledImages
    classes: list[str]
    templates: list[str] | None = None
    role: str = "target"  # "target" | "control" | "session"
    _pixels: torch.Tensor | None = field(default=None, repr=False)

    def pixels(self, bundle) -> torch.Tensor:
        if self._pixels is None:
            unit = to_unit_pixels([i.image for i in self.images.items], bundle.clip_image_processor)
            self._pixels = normalise(unit, bundle.clip_image_processor)
        return self._pixels

    @property
    def targets(self) -> torch.Tensor:
        index = {c: i for i, c in enumerate(self.classes)}
        return torch.tensor([index[i.label] for i in self.images.items])


def class_text_features(bundle, classes: list[str], templates: list[str]) -> torch.Tensor:
    """One embedding per class: the normalised mean over caption templates."""
    per_template = torch.stack(
        [bundle.text_features([t.format(label=c) for c in classes]) for t in templates]
    )
    return torch.nn.functional.normalize(per_template.mean(0), dim=-1)


EVAL_BATCH = 64


def evaluation_workers(bundle) -> int:
    """Threads that measure accuracy together: two on a CPU whose torch runs one intra-op
    thread (the small models, `model.limit_cpu_threads`) where a core is left over by the
    sessions running in this process, one otherwise. Each thread runs whole batches, so every
    image goes through exactly the kernels it would alone: the predictions are the same, only
    sooner. LORSU_EVAL_THREADS sets the number where the encoder holds no method's own
    modules (`Bundle.plain_encoder`) and the process is not a forked child."""
    if _FORKED or getattr(_THREAD, "in_pool", False) or not bundle.plain_encoder():
        return 1  # (a pool's thread measures on itself: it never waits on its own pool)
    setting = os.environ.get("LORSU_EVAL_THREADS", "")
    if setting.isdigit():
        return max(1, int(setting))
    if bundle.device.type != "cpu" or torch.get_num_threads() != 1:
        return 1
    # A class on the app's CPU lanes keeps every core busy with sessions: threads would only
    # take turns with them (30 clients took 5% longer when each session used two).
    return 2 if usable_cores() > running_sessions() else 1


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1


_RUNNING = [0]
_RUNNING_LOCK = threading.Lock()


def running_sessions() -> int:
    return _RUNNING[0]


def count_session(change: int) -> None:
    """+1 when a session starts in this process, -1 when it ends (see `evaluation_workers`)."""
    with _RUNNING_LOCK:
        _RUNNING[0] += change


_THREAD = threading.local()


def _mark_pool_thread() -> None:
    _THREAD.in_pool = True


_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


_FORKED: list[bool] = []


def _forget_pools_in_child() -> None:
    """A forked child (ZeroGPU's GPU workers, a CPU worker of LORSU_SHARED_DIR) has none of its
    parent's threads, though the pools think they have: a job given to one would never run.
    Nor may it start new ones: torch refuses to set up its thread pool in a new thread of a
    forked child ("Invalid thread pool!"). A forked child measures on its own thread."""
    global _POOLS_LOCK
    _POOLS.clear()
    _POOLS_LOCK = threading.Lock()
    _FORKED.append(True)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools_in_child)


def thread_pool(workers: int) -> ThreadPoolExecutor:
    """One pool per size for the process (threads are made once, not per evaluation)."""
    with _POOLS_LOCK:
        if workers not in _POOLS:
            _POOLS[workers] = ThreadPoolExecutor(
                workers, thread_name_prefix="lorsu-eval", initializer=_mark_pool_thread
            )
        return _POOLS[workers]


def map_batches(function, batches: list, workers: int) -> list:
    """`function` of every batch, in order: on `workers` threads of a pool where that is more
    than one and there is more than one batch (never in a forked child), else here."""
    if workers > 1 and len(batches) > 1 and not _FORKED:
        return list(thread_pool(workers).map(function, batches))
    return [function(batch) for batch in batches]


def clip_predictions_many(
    bundle,
    eval_sets: list[EvalSet],
    batch_size: int = EVAL_BATCH,
    image_features=None,
    workers: int | None = None,
) -> list[torch.Tensor]:
    """`clip_predictions` for several sets at once, their batches shared among `workers`
    threads: by default `evaluation_workers` for the bundle's own features, one for others
    (a caller's function may not be safe to run side by side)."""
    if workers is None:
        workers = 1 if image_features is not None else evaluation_workers(bundle)
    image_features = image_features or bundle.image_features
    jobs = []
    for number, eval_set in enumerate(eval_sets):
        texts = class_text_features(
            bundle, eval_set.classes, eval_set.templates or bundle.caption_templates
        )
        pixels = eval_set.pixels(bundle)
        jobs += [
            (number, pixels[start : start + batch_size], texts)
            for start in range(0, len(pixels), batch_size)
        ]

    def predict(job) -> torch.Tensor:
        with torch.no_grad():  # (grad mode is per thread)
            return (image_features(job[1]) @ job[2].T).argmax(-1).cpu()

    guesses = map_batches(predict, jobs, workers)
    per_set = [[] for _ in eval_sets]
    for (number, _, _), guess in zip(jobs, guesses):
        per_set[number].append(guess)
    return [torch.cat(g) if g else torch.zeros(0, dtype=torch.long) for g in per_set]


def clip_predictions(
    bundle, eval_set: EvalSet, batch_size: int = EVAL_BATCH, image_features=None
) -> torch.Tensor:
    """CLIP's zero-shot class for every image; `image_features` (pixels -> normalised
    embeddings, default the bundle's) lets a development check read another embedding."""
    return clip_predictions_many(bundle, [eval_set], batch_size, image_features)[0]


def clip_accuracy(bundle, eval_set: EvalSet) -> float:
    predictions = clip_predictions(bundle, eval_set)
    return percent(predictions == eval_set.targets)


def per_class_accuracy(bundle, eval_set: EvalSet) -> dict[str, float]:
    correct = clip_predictions(bundle, eval_set) == eval_set.targets
    targets = eval_set.targets
    return {
        c: percent(correct[targets == i])
        for i, c in enumerate(eval_set.classes)
        if (targets == i).any()
    }


def percent(correct: torch.Tensor) -> float:
    return 100.0 * float(correct.double().mean()) if len(correct) else float("nan")


READERS = {"clip": clip_accuracy}


def accuracy(bundle, eval_set: EvalSet, reader: str = "clip") -> float:
    try:
        return READERS[reader](bundle, eval_set)
    except KeyError:
        raise ValueError(
            f"unknown accuracy reader {reader!r}: use one of {sorted(READERS)}"
        ) from None


def accuracies(bundle, eval_sets: list[EvalSet], reader: str = "clip") -> dict[str, float]:
    """`accuracy` of every set by name; CLIP's reader measures them all in one pass of shared
    batches (`clip_predictions_many`)."""
    if reader != "clip":
        return {s.name: accuracy(bundle, s, reader) for s in eval_sets}
    guesses = clip_predictions_many(bundle, eval_sets)
    return {s.name: percent(g == s.targets) for s, g in zip(eval_sets, guesses)}


BASE_CACHE_SIZE = 256


def set_fingerprint(bundle, eval_set: EvalSet, reader: str) -> str:
    """What a set's accuracy depends on besides the weights: its pixels, labels, classes,
    caption templates, and the reader."""
    digest = hashlib.sha256()
    pixels = eval_set.pixels(bundle).detach().cpu().contiguous()
    digest.update(pixels.numpy().tobytes())
    digest.update(eval_set.targets.numpy().tobytes())
    templates = eval_set.templates or bundle.caption_templates
    digest.update(json.dumps([reader, list(eval_set.classes), list(templates)]).encode())
    return digest.hexdigest()


def base_accuracy(bundle, eval_set: EvalSet, reader: str = "clip") -> float:
    """`accuracy` of the untouched model, measured once per process for a set's content and
    reader (see `base_accuracies`)."""
    return base_accuracies(bundle, [eval_set], reader)[eval_set.name]


def base_accuracies(bundle, eval_sets: list[EvalSet], reader: str = "clip") -> dict[str, float]:
    """`accuracies` of the untouched model, each measured once per process for a set's content
    and reader: the base model never changes, and every user's first session on an example
    domain measures the same sets (30 students, 30 identical base passes). Call it only with
    no delta applied and no adapter installed (a session's base phase, under the bundle's lock)."""
    # The encoder's weights summed per tensor guard the "untouched" promise: a model whose
    # weights were changed in place (a test, a caller that forgot to restore) misses the cache.
    with torch.no_grad():
        weights = tuple(
            float(v.detach().sum(dtype=torch.float64)) for v in bundle.vision_state().values()
        )
    keys = {s.name: (set_fingerprint(bundle, s, reader), weights) for s in eval_sets}
    missing = [s for s in eval_sets if keys[s.name] not in bundle.base_cache]
    for name, value in accuracies(bundle, missing, reader).items():
        if len(bundle.base_cache) >= BASE_CACHE_SIZE:  # drop the oldest
            bundle.base_cache.pop(next(iter(bundle.base_cache)))
        bundle.base_cache[keys[name]] = value
    return {s.name: bundle.base_cache[keys[s.name]] for s in eval_sets}


def ti_cc(accuracies: dict, base: dict, target: str, controls: list[str]) -> tuple[float, float]:
    ti = accuracies[target] - base[target]
    cc = float(np.mean([accuracies[c] - base[c] for c in controls])) if controls else 0.0
    return ti, cc


def other_sets_change(
    accuracies: dict, base: dict, before: dict, exclude: set[str] | list[str]
) -> dict:
    """CC's companion. The paper's controls are all the other datasets; here CC is over the
    control set(s), so beside it: the change on every other set measured (not the target, not
    a control, not a set this session trained), against the base model as CC is (`change`) and
    against the model the session started from (`session_change`), naming the worst drop."""
    names = [n for n in accuracies if n not in set(exclude) and n in base]
    sets = {
        n: {
            "now": accuracies[n],
            "base": base[n],
            "change": accuracies[n] - base[n],
            "session_change": accuracies[n] - before.get(n, base[n]),
        }
        for n in names
    }
    worst = min(sets, key=lambda n: sets[n]["change"]) if sets else None
    return {
        "sets": sets,
        "mean_change": float(np.mean([v["change"] for v in sets.values()])) if sets else None,
        "worst": worst,
        "worst_change": sets[worst]["change"] if worst else None,
    }


@dataclass
class AccuracyMatrix:
    """a[j, i]: accuracy on set i after session j (row 0 is the untouched base model)."""

    sets: list[str]
    rows: list[list[float]]
    trained_at: dict[str, int]  # set -> the session that trained it (sets not listed: controls)

    @classmethod
    def from_history(cls, base: dict, sessions: list[dict], trained_at: dict[str, int]):
        sets = list(base)
        for row in sessions:
            sets += [s for s in row if s not in sets]
        rows = [[row.get(s, float("nan")) for s in sets] for row in [base, *sessions]]
        return cls(sets, rows, trained_at)

    @property
    def array(self) -> np.ndarray:
        return np.array(self.rows, dtype=float)

    def _trained(self) -> list[int]:
        return [
            i for i, s in enumerate(self.sets) if 0 < self.trained_at.get(s, 0) < len(self.rows)
        ]

    def forgetting(self) -> dict[str, float]:
        """Best accuracy from the set's training session on (every row for a set never
        trained) minus the latest; rows before its training do not count."""
        a = self.array
        last = len(a) - 1
        out = {}
        for i, s in enumerate(self.sets):
            start = self.trained_at.get(s, 0)
            start = start if 0 < start <= last else 0
            column = a[start:, i]
            seen = column[~np.isnan(column)]
            out[s] = (
                float(seen.max() - a[last, i]) if len(seen) and not np.isnan(a[last, i]) else 0.0
            )
        return out

    def summary(self) -> dict[str, float]:
        """Avg, Last and Transfer exactly as MTIL's `cal_MTIL_metrics` (ZSCL, KeepLoRA) on the
        rows after each session (the base row is not one of them) and the trained sets only;
        BWT as SPEC section 4."""
        a = self.array
        trained = self._trained()
        last = len(a) - 1
        out: dict[str, float] = {
            "avg": float("nan"),
            "last": float("nan"),
            "transfer": float("nan"),
            "bwt": float("nan"),
        }
        if not trained:
            return out
        sessions = a[1:]
        out["avg"] = _mean_seen([_mean_seen(sessions[:, i]) for i in trained])
        out["last"] = _mean_seen(a[last, trained])
        # Transfer of a set: its mean over the rows after the sessions before its training.
        # A set trained in session 1 has no such row: MTIL starts at the second trained set.
        before = [
            _mean_seen(a[1 : self.trained_at[self.sets[i]], i])
            for i in trained
            if self.trained_at[self.sets[i]] > 1
        ]
        out["transfer"] = _mean_seen(before)
        after = [
            a[last, i] - a[self.trained_at[self.sets[i]], i]
            for i in trained
            if self.trained_at[self.sets[i]] < last
        ]
        out["bwt"] = float(np.mean(after)) if after else 0.0
        return out

    def to_dict(self) -> dict:
        return {
            "sets": self.sets,
            "rows": self.rows,
            "trained_at": self.trained_at,
            "forgetting": self.forgetting(),
            **self.summary(),
        }


def _mean_seen(values) -> float:
    """Mean of the measured values (a set added later has no value in earlier rows)."""
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    return float(values.mean()) if len(values) else float("nan")


from . import vqa  # noqa: E402,F401  (registers the VLM readers "mc" and "open")
