"""The app's model and its GPU work, without Gradio.

One model per process, loaded once (`load_model`), shared by every user. Every function that
touches the weights is a *worker*: it takes the user's deltas (or history) in, applies them only
for the call under `bundle.lock`, and gives plain results (and, for training, the new session
record) back. That is exactly what Hugging Face ZeroGPU needs: `@spaces.GPU` runs a worker in a
forked process where weight changes never reach the main process; outside ZeroGPU the decorator
is a no-op and `spaces` need not be installed.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import queue
import shutil
import tempfile
import threading
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..chat import answer, generate_answers, stream_answer
from ..compare import second_reading
from ..confidence import ConfidenceError, confidence
from ..delta import applied
from ..events import Done, Phase
from ..history import History
from ..methods import METHODS, make_method, method_settings, preset_defaults
from ..model import (
    ASSETS_DIR,
    BUNDLE_FILE,
    OFFLINE_PRESET,
    SMALL_ENCODER,
    Bundle,
    BundleError,
    ModelInfo,
    load_bundle,
    save_bundle,
)
from ..session import planned_steps as session_steps
from ..session import run_session
from ..vqa import names_class
from . import zerogpu

try:  # Hugging Face ZeroGPU; a no-op elsewhere, and optional
    import spaces
except ImportError:  # pragma: no cover - depends on the environment
    spaces = None

log = logging.getLogger("lorsu_demo.ui")

PROBE_QUESTION = "What is in this image?"
PROBE_TOKENS = 12
PROBES = 5  # shown in the probe table, picked from a larger pool
CHAT_TOKENS = 48
# Models above this many parameters are not zipped for a browser download (LLaVA is 7 B).
MAX_EXPORT_PARAMS = 500_000_000


def gpu(duration):
    """`spaces.GPU(duration=...)` when running on ZeroGPU, else the function unchanged.
    `duration` may be a callable of the worker's arguments (ZeroGPU calls it per call);
    LORSU_ZEROGPU_SIZE=xlarge asks for the full card."""

    def wrap(fn):
        if spaces is None:
            return fn
        if zerogpu.slice_size() == "xlarge":
            return spaces.GPU(duration=duration, size="xlarge")(fn)
        return spaces.GPU(duration=duration)(fn)

    return wrap


# ---- the one model ---------------------------------------------------------------------------
_MODEL: dict[str, object] = {}


def use_model(bundle: Bundle, notice: str | None = None) -> Bundle:
    """Make `bundle` the process's model (the app calls this once). A small model on the CPU
    gets one copy per lane (`pool_size`), so that sessions of several users run on several
    cores at once, each on its own copy; otherwise every worker borrows the one model in turn."""
    _MODEL["bundle"] = bundle
    _MODEL["notice"] = notice
    pool: queue.LifoQueue = queue.LifoQueue()
    pool.put(bundle)
    for _ in range(pool_size(bundle) - 1):
        pool.put(copy_bundle(bundle))
    _MODEL["pool"] = pool
    return bundle


def pool_size(bundle: Bundle | ModelInfo) -> int:
    """Copies of the model the workers share: one per CPU lane for a small CPU model (a few MB
    each, `zerogpu.cpu_lanes`), one for anything on a GPU or large (ZeroGPU's workers are
    separate processes)."""
    if zerogpu.on_zerogpu() or bundle.device.type != "cpu":
        return 1
    if bundle.encoder_parameters >= SMALL_ENCODER:
        return 1
    return zerogpu.cpu_lanes()


def lane_width(bundle: Bundle | ModelInfo) -> int:
    """How many model calls the app runs at once: ZeroGPU's width there (each call is its own
    worker), elsewhere one per model copy, so that no call waits inside a worker for a copy."""
    return zerogpu.lane_width() if zerogpu.on_zerogpu() else pool_size(bundle)


def copy_bundle(bundle: Bundle) -> Bundle:
    """An independent copy (weights, tokenizers, caches) with its own lock; the CLIP's vision
    tower stays the VLM's (deepcopy keeps shared modules shared)."""
    copied = copy.deepcopy(bundle, {id(bundle.lock): threading.Lock()})
    assert copied.clip.vision_model is copied.vlm.model.vision_tower
    return copied


@contextmanager
def borrow() -> Iterator[Bundle]:
    """A model copy for one worker call, given back when the call ends (or is closed)."""
    pool = _MODEL.get("pool")
    if pool is None:
        yield current()
        return
    bundle = pool.get()
    try:
        yield bundle
    finally:
        pool.put(bundle)


def current() -> Bundle:
    try:
        return _MODEL["bundle"]
    except KeyError:
        raise RuntimeError("no model loaded: call engine.load_model() first") from None


def notice() -> str | None:
    return _MODEL.get("notice")


def load_model(
    name: str, device: str | None = None, clip: str | None = None
) -> tuple[Bundle, str | None]:
    """Load `name` (with `clip`, or LORSU_CLIP, for a LLaVA folder); when the offline toy
    model is asked for but missing, fall back to `tiny-random` with a notice (the app still
    starts). Other failures raise BundleError."""
    try:
        return load_bundle(name, device=device, clip=clip), None
    except BundleError as err:
        if name != OFFLINE_PRESET or (ASSETS_DIR / OFFLINE_PRESET / BUNDLE_FILE).exists():
            raise
        log.warning("%s Falling back to tiny-random.", err)
        message = (
            f"The offline toy model is missing ({ASSETS_DIR / OFFLINE_PRESET}), so this app runs "
            "on **tiny-random**, a model with random weights: its answers are gibberish and its "
            "accuracies are chance. Build the toy model with "
            "`python -m lorsu_demo.toyworld.train --out assets` and restart."
        )
        return load_bundle("tiny-random", device=device), message


def describe_model(bundle: Bundle | ModelInfo) -> str:
    layers, heads = bundle.num_layers, bundle.num_heads
    read = bundle.layers_read_by_vlm
    return (
        f"**{bundle.name}** on {bundle.device.type.upper()}: image encoder of {layers} layers "
        f"x {heads} attention heads; the language model reads the output of layer {read}."
    )


# ---- settings --------------------------------------------------------------------------------
def settings_for(bundle: Bundle | ModelInfo, method: str) -> dict:
    """A method's settings as the app offers them: the method's defaults, then the model's
    (a tiny encoder wants a larger learning rate than LLaVA's)."""
    settings = method_settings(method)
    preset = preset_defaults(method, bundle.defaults)  # the authors' settings stay the authors'
    settings.update({k: v for k, v in preset.items() if k in settings})
    return settings


def clean_settings(method: str, values: dict) -> dict:
    """Keep only the settings `method` has; cast to the type of their default."""
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}: choose one of {', '.join(METHODS)}.")
    defaults = method_settings(method)
    out = {}
    for key, value in values.items():
        if key not in defaults or value is None:
            continue
        default = defaults[key]
        try:
            if isinstance(default, bool):
                value = bool(value)
            elif isinstance(default, int):
                if float(value) != int(float(value)):
                    raise ValueError
                value = int(float(value))
            elif isinstance(default, float):
                value = float(value)
            elif isinstance(default, str):
                value = str(value).strip()
                if not value or len(value) > 300:
                    raise ValueError
        except (TypeError, ValueError):
            kind = "text" if isinstance(default, str) else "a number"
            raise ValueError(f"Setting {key!r} must be {kind} like {default!r}.") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"Setting {key!r} must be a finite number.")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            raise ValueError(f"Setting {key!r} cannot be negative.")
        out[key] = value
    if out.get("epochs", 1) < 1 or out.get("batch_size", 1) < 1:
        raise ValueError("Use at least one epoch and a batch of at least one image.")
    return out


def planned_steps(images: int, settings: dict) -> int:
    return session_steps(images, settings)


# ---- probes ----------------------------------------------------------------------------------
@dataclass
class Probe:
    image: object  # PIL image
    label: str


@dataclass
class ProbeAnswers:
    """Answers to the probe images: stage "before" (base and current model) or "after".
    `picked`: with "before", which images of the pool the session asks about (`pick_probes`)."""

    stage: str
    answers: dict[str, list[str]] = field(default_factory=dict)
    picked: list[int] | None = None
    kind = "probes"

    def to_dict(self) -> dict:
        payload = {"kind": self.kind, "stage": self.stage, "answers": self.answers}
        if self.picked is not None:
            payload["picked"] = self.picked
        return payload


def probe_answers(bundle: Bundle, probes: list[Probe], deltas) -> list[str]:
    if not probes:
        return []
    with bundle.lock, applied(bundle.vision_state(), deltas):
        return generate_answers(
            bundle,
            [p.image for p in probes],
            [PROBE_QUESTION] * len(probes),
            max_new_tokens=PROBE_TOKENS,
        )


def pick_probes(pool: list[Probe], answers: list[str], count: int = 5) -> list[int]:
    """Which `count` images of the pool to show, so that a session's change can be seen:
    those the model answers wrong come first, one per class before a second of any class;
    images it already gets right fill what is left. Indices in pool order."""
    wrong = [i for i, (p, a) in enumerate(zip(pool, answers)) if not names_class(a, p.label)]
    right = sorted(set(range(len(pool))) - set(wrong))
    picked: list[int] = []
    seen: set[str] = set()
    for group in (wrong, right):
        for new_classes_only in (True, False):
            for i in group:
                if len(picked) == count:
                    return sorted(picked)
                if i not in picked and not (new_classes_only and pool[i].label in seen):
                    picked.append(i)
                    seen.add(pool[i].label)
    return sorted(picked)


def default_reader() -> str:
    """clip (fast) unless LORSU_READER names the VLM's own answers: mc / open (SPEC section 4)."""
    return os.environ.get("LORSU_READER", "clip")


READER_NAMES = {
    "clip": "CLIP zero-shot classifier",
    "mc": "chat model's multiple choice",
    "open": "chat model's open answers",
}


def _session_seconds(history, method, settings, train, *args, **kwargs) -> int:
    """The ZeroGPU duration of one session, from its planned steps (see `zerogpu`)."""
    return zerogpu.session_seconds(planned_steps(len(train), settings))


@gpu(duration=_session_seconds)
def session_worker(
    history: History,
    method: str,
    settings: dict,
    train,
    target,
    controls=(),
    extra_sets=(),
    probes: list[Probe] = (),
    seed: int = 0,
    shots: int | None = None,
    reader: str | None = None,
    also: str | None = None,
) -> Iterator:
    """One session as events: ProbeAnswers("before"), run_session's events (Phase, Scores,
    Step, Metrics), ProbeAnswers("after"), then Done(record) or Stopped. `history` is only read;
    the caller appends `Done.record`. Closing this generator leaves the model as it was.
    `also`: a second accuracy reader; its TI and CC go into the record beside the first's."""
    with borrow() as bundle:  # this call's copy of the model
        probes = list(probes)
        deltas = history.deltas()
        if probes:  # a pool: the model's answers to it choose the probes
            now = probe_answers(bundle, probes, deltas)
            picked = pick_probes(probes, now, PROBES)
            probes, now = [probes[i] for i in picked], [now[i] for i in picked]
            base = probe_answers(bundle, probes, []) if deltas else now
            yield ProbeAnswers("before", {"base": base, "before": now}, picked)
        events = run_session(
            bundle,
            history,
            make_method(method, **settings),
            train,
            target=target,
            controls=list(controls),
            extra_sets=list(extra_sets),
            trained_sets=[target.name],
            seed=seed,
            shots=shots,
            reader=reader or default_reader(),
        )
        try:
            for event in events:
                if isinstance(event, Done) and also and also != event.record.extra.get("reader"):
                    yield Phase("reading", f"Reading TI and CC with the {READER_NAMES[also]} too")
                    second_reading(bundle, history, event.record, target, list(controls), also)
                if isinstance(event, Done) and probes:
                    after = probe_answers(bundle, probes, [*deltas, event.record.delta])
                    yield ProbeAnswers("after", {"after": after})
                yield event
        finally:
            events.close()


@gpu(duration=zerogpu.CHAT_S)
def chat_worker(
    image, question: str, deltas, with_base: bool, sure: dict | None = None
) -> Iterator[tuple[str, object]]:
    """Yield (which, value): ("adapted", text) as the adapted model's answer grows, then
    ("base", text); with `sure` ({"classes", "templates"}), then ("confidence", readings) or
    ("confidence-error", message) from the same call (one GPU call per question on ZeroGPU)."""
    with borrow() as bundle:  # this call's copy of the model
        text = ""
        for text in stream_answer(bundle, image, question, deltas, max_new_tokens=CHAT_TOKENS):
            yield "adapted", text
        if not text:
            yield "adapted", ""
        if with_base:
            yield "base", answer(bundle, image, question, (), max_new_tokens=CHAT_TOKENS)
        if sure is not None:
            try:
                readings = read_confidence(bundle, image, deltas, with_base, **sure)
            except ConfidenceError as err:  # the answers stand; only the bars are missing
                yield "confidence-error", str(err)
            else:
                yield "confidence", readings


def read_confidence(bundle, image, deltas, with_base, classes, templates=None) -> dict:
    readings = confidence(bundle, image, classes, deltas, templates=templates, with_base=with_base)
    return {name: reading.to_dict() for name, reading in readings.items()}


@gpu(duration=zerogpu.CHAT_S)
def confidence_worker(image, classes, deltas, templates=None, with_base: bool = True) -> dict:
    """Per-class confidence for one image (`confidence.confidence`), as plain dicts: a forward
    pass per reader and version, no generation, so a chat's budget is plenty."""
    with borrow() as bundle:
        return read_confidence(bundle, image, deltas, with_base, classes, templates)


def export_size_problem(bundle: Bundle) -> str | None:
    params = sum(p.numel() for p in bundle.vlm.parameters())
    params += sum(p.numel() for p in bundle.clip.text_model.parameters())
    if params <= MAX_EXPORT_PARAMS:
        return None
    gigabytes = params * bundle.vlm.dtype.itemsize / 1e9
    return (
        f"The adapted {bundle.name} is about {gigabytes:.0f} GB: too large to download through a "
        "browser. Download the history file instead and run `python -m lorsu_demo export --run "
        "history.lorsu --session N --out DIR` where the base model is."
    )


@gpu(duration=zerogpu.EXPORT_S)
def export_worker(deltas, session: int, out: str) -> str:
    """Write the VLM (and its CLIP text side) as it was after `session` into a zip at `out`,
    laid out like `python -m lorsu_demo export` (a folder that `load_bundle` and
    `LlavaForConditionalGeneration.from_pretrained` read)."""
    bundle = current()
    out = Path(out)
    name = f"{bundle.name}-session{session}"
    folder = Path(tempfile.mkdtemp(prefix="lorsu-export-")) / name
    try:
        with bundle.lock, applied(bundle.vision_state(), deltas):
            save_bundle(
                bundle,
                folder,
                name=f"{bundle.name}+s{session}",
                description=f"{bundle.name} after session {session} (exported from the app)",
            )
        out.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(folder.rglob("*")):
                if path.is_file():
                    archive.write(path, Path(name) / path.relative_to(folder))
    finally:
        shutil.rmtree(folder.parent, ignore_errors=True)
    return str(out)
