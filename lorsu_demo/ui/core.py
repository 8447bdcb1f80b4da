"""What the app does, without Gradio: the actions behind every button and API endpoint.

`AppCore` holds the shared model, the example data and every browser session's workspace.
Its methods take a workspace key (Gradio's `session_hash`) and plain values, and give plain
values back; user mistakes raise `UserError` with a message meant for the screen. The Gradio
layer (`app.py`) only maps these to components, so the tests can drive everything without a
server.
"""

from __future__ import annotations

import hashlib
import logging
import math
import shutil
import statistics
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .. import takeaway
from ..confidence import ConfidenceError
from ..data import (
    MAX_IMAGE_PIXELS,
    MIN_STORE_SIDE,
    DataError,
    PixelBudget,
    open_image,
    pixel_budget,
)
from ..delta import DeltaError
from ..evaluate import READERS
from ..events import Done, Metrics, Phase, Scores, Step, Stopped
from ..history import History, HistoryError
from ..methods import METHODS, MethodError
from ..model import ASSETS_DIR, Bundle, ModelInfo
from ..runs import check_labels, control_sets, one_session, run_seed
from . import drawing, engine, uploads, zerogpu
from .engine import ProbeAnswers
from .workspace import (
    Dataset,
    DiskStore,
    Examples,
    Store,
    Workspace,
    browser_secret,
    default_state_dir,
    idle_seconds,
    new_browser_key,
    valid_browser_key,
)

log = logging.getLogger("lorsu_demo.ui")

USER_ERRORS = (DataError, HistoryError, MethodError, ValueError)


class UserError(Exception):
    """A problem the person can fix; the message says how."""


@contextmanager
def worker_refusals():
    """A GPU worker's refusals as messages: a session's delta that does not fit this model (the
    worker refuses it before writing any weight) and ZeroGPU's quota and duration refusals.
    Anything else goes on as it is."""
    try:
        yield
    except UserError:
        raise
    except DeltaError as err:
        raise UserError(f"This session cannot be applied: {err}") from None
    except Exception as err:
        problem = zerogpu.gpu_problem(err)
        if problem is None:
            raise
        raise UserError(problem) from None


@dataclass
class Live:
    """Everything the live view shows, updated event by event."""

    status: str = "Starting"
    tone: str = "busy"  # info | busy | done | stopped | error
    phase: str = "queued"
    method: str = ""
    data: str = ""
    total: int | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)
    epochs: list[int] = field(default_factory=list)  # the epoch of each loss
    accuracy: list[dict] = field(default_factory=list)
    base_target: float | None = None
    base_control: float | None = None
    ti: float | None = None
    cc: float | None = None
    target_now: float | None = None
    control_now: float | None = None
    scores: Scores | None = None
    probes: list = field(default_factory=list)
    answers: dict[str, list[str]] = field(default_factory=dict)
    finished: bool = False
    saved: int | None = None  # the session index, when one was saved
    reader: str = "clip"  # what measured TI and CC (engine.READER_NAMES)
    readings: dict = field(default_factory=dict)  # {reader: {"ti", "cc"}} once the session is done

    def on(self, event) -> None:
        if isinstance(event, Phase):
            self.phase = event.name
            self.status = {
                "base": "Measuring the untouched base model on the test sets…",
                "scoring": "Scoring heads: one pass over your images to find what matters…",
                "training": f"{event.message}…",
                "merging": "Merging the update into the image encoder…",
                "evaluating": "Evaluating the adapted model on every test set…",
            }.get(event.name, event.message)
        elif isinstance(event, Scores):
            self.scores = event
        elif isinstance(event, Step):
            self.phase = "training"
            self.total = event.total
            self.losses.append((event.step, event.loss))
            self.epochs.append(event.epoch)
            self.status = (
                f"Step {event.step} of {event.total} (epoch {event.epoch}) · loss {event.loss:.3f}"
            )
        elif isinstance(event, Metrics):
            control = event.control_acc if _finite(event.control_acc) else None
            if self.base_target is None:
                self.base_target = event.target_acc - event.ti
                self.base_control = control - event.cc if control is not None else None
            self.accuracy.append(
                {"step": event.step, "target": event.target_acc, "control": control}
            )
            self.ti, self.target_now = event.ti, event.target_acc
            self.cc, self.control_now = (event.cc, control) if control is not None else (None, None)
        elif isinstance(event, ProbeAnswers):
            self.answers.update(event.answers)
            if event.picked is not None:  # the session chose its probes from the pool
                self.probes = [self.probes[i] for i in event.picked]
            if event.stage == "before":
                self.status = "Asking the probe images before training…"


def session_seed(seed, index: int) -> int:
    """The seed a session uses: the one given, else the session's number (so that sessions
    draw other images unless told otherwise)."""
    if seed is None or seed == "":
        return index
    try:
        value = int(seed)
        if value != float(seed) or value < 0:
            raise ValueError
    except (TypeError, ValueError):
        raise UserError(
            f"The seed must be a whole number, 0 or more (or blank: the session's number), "
            f"not {seed!r}."
        ) from None
    return value


def history_file_before(index: int) -> str:
    """The name of the history file that holds the sessions before session `index`."""
    return f"history-before-session-{index}.lorsu"


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


class AppCore:
    def __init__(
        self,
        bundle: Bundle | None,
        notice: str | None = None,
        domains_dir: str | Path | None = None,
        control_dirs: list[str] | None = None,
        work_dir: str | Path | None = None,
        state_dir: str | Path | None = None,
        idle_hours: float | None = None,
        *,
        info: ModelInfo | None = None,
    ):
        """`bundle=None` with `info` (`model.bundle_info`): the page is built and served from
        `info` while `load` loads the model, and every call that needs the model waits for it."""
        if bundle is None and info is None:
            raise ValueError("AppCore needs a bundle, or the info of one that load() will load")
        self.info: Bundle | ModelInfo = bundle if bundle is not None else info
        self.notice = notice
        self.examples = Examples(Path(domains_dir) if domains_dir else ASSETS_DIR / "domains")
        own_control = self.info.control_dir  # known before the model is loaded
        if not control_dirs and own_control is None and (ASSETS_DIR / "control").is_dir():
            control_dirs = [str(ASSETS_DIR / "control")]  # LLaVA presets have none of their own
        self.controls = control_sets(self.info, control_dirs)
        self.control_dirs = list(control_dirs or [])  # for the "Copy as CLI" command
        # Browsers' workspaces are kept here across restarts (see workspace.DiskStore).
        self.state_dir = Path(state_dir) if state_dir else default_state_dir()
        self.idle = idle_seconds() if idle_hours is None else float(idle_hours) * 3600
        # Who waits for the model lane (workspace key -> when Train was pressed) and how long
        # the last sessions took, for the status line's queue position and ETA.
        self._waiting: dict[str, float] = {}
        self._running: dict[str, float] = {}
        self._durations: deque[float] = deque(maxlen=5)
        self._queue_lock = threading.Lock()
        base = Path(work_dir) if work_dir else Path(tempfile.gettempdir())
        base.mkdir(parents=True, exist_ok=True)
        self.work_dir = Path(tempfile.mkdtemp(prefix="lorsu-app-", dir=base))
        self._loaded = threading.Event()
        self._load_error: Exception | None = None
        if bundle is not None:
            self._attach(bundle, notice)

    def load(self, loader: Callable[[], tuple[Bundle, str | None]]) -> None:
        """Load the model (`loader()` gives the bundle and a notice) and let the calls waiting
        for it go on; if it fails, they get the error and so does the caller."""
        try:
            bundle, notice = loader()
        except Exception as err:
            self._load_error = err
            self._loaded.set()
            raise
        self._attach(bundle, notice)

    def _attach(self, bundle: Bundle, notice: str | None) -> None:
        self._bundle = engine.use_model(bundle, notice)
        self.notice = notice
        self._store = Store(
            bundle.source,
            DiskStore(self.state_dir / "workspaces"),
            check=lambda history: self._check_fits(history, "The saved history"),
        )
        self.info = bundle
        self._loaded.set()

    @property
    def ready(self) -> bool:
        """The model is loaded (a page served before that shows it is loading)."""
        return self._loaded.is_set() and self._load_error is None

    def _wait_for_model(self) -> None:
        self._loaded.wait()
        if self._load_error is not None:
            raise UserError(f"The model could not be loaded ({self._load_error}). Restart the app.")

    @property
    def bundle(self) -> Bundle:
        self._wait_for_model()
        return self._bundle

    @property
    def store(self) -> Store:
        self._wait_for_model()
        return self._store

    # ---- workspaces ------------------------------------------------------------------------
    def workspace(self, key: str | None) -> Workspace:
        if key not in self.store:
            self.store.sweep(self.idle)
        return self.store.get(key)

    def browser_secret(self) -> str:
        return browser_secret(self.state_dir)

    def attach(self, page: str | None, browser_key) -> tuple[str, Workspace]:
        """A page loaded with the browser key it keeps (or none yet, or one that is not ours:
        then a new one). Returns the key for the browser to keep and its workspace."""
        key = valid_browser_key(browser_key) or new_browser_key()
        if key not in self.store:
            self.store.sweep(self.idle)
        return key, self.store.attach(page, key)

    def remember(self, ws: Workspace, history: bool = True) -> None:
        """Keep a browser's workspace on disk after a change (nothing for API clients)."""
        self.store.save(ws, history)

    def set_chat_version(self, key: str | None, version) -> None:
        ws = self.workspace(key)
        if isinstance(version, (int, float)) and version >= 0 and version != ws.chat_version:
            ws.chat_version = int(version)
            self.remember(ws, history=False)

    def take_interrupted(self, key: str | None) -> dict | None:
        """The session a reload cut short, once (the page that shows it clears it)."""
        ws = self.workspace(key)
        note, ws.interrupted = ws.interrupted, None
        if note is not None:
            self.remember(ws, history=False)
        return note

    def close(self, key: str | None) -> None:
        """A browser tab closed: forget its workspace (a running session is stopped first)."""
        self.store.drop(key)
        folder = self._folder(key, create=False)
        if key not in self.store and folder.exists():
            shutil.rmtree(folder, ignore_errors=True)

    def _folder(self, key: str | None, create: bool = True) -> Path:
        digest = hashlib.sha256((key or "local").encode()).hexdigest()[:16]
        folder = self.work_dir / digest
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        return folder

    # ---- data ------------------------------------------------------------------------------
    def example_choices(self) -> list[tuple[str, str]]:
        return [(title, name) for name, title in self.examples.titles().items()]

    def dataset(self, ws: Workspace, name: str | None) -> Dataset:
        name = (name or ws.selected or "").strip()
        if not name:
            raise UserError("Pick example data or upload your own images first (step 1).")
        if name == "uploaded":
            if not ws.uploads:
                raise UserError("No images uploaded in this session yet.")
            return ws.uploads[list(ws.uploads)[-1]]
        if name in ws.uploads:
            return ws.uploads[name]
        try:
            return self.examples.get(name)
        except DataError as err:
            raise UserError(str(err)) from None

    def select(self, key: str | None, name: str) -> Dataset:
        ws = self.workspace(key)
        try:
            data = self.dataset(ws, name)
        except DataError as err:  # a damaged example folder
            raise UserError(str(err)) from None
        ws.selected = data.name
        self.remember(ws)
        return data

    def upload(
        self,
        key: str | None,
        cards: list[uploads.Card] = (),
        zip_path: str | None = None,
        files: list[str] = (),
    ) -> Dataset:
        """Check what was uploaded and make it this workspace's selected data."""
        ws = self.workspace(key)
        # One upload may decode MAX_UPLOAD_PIXELS; what it keeps (at the model's input size)
        # counts against what this workspace still may keep.
        budget = PixelBudget(self.store_side(), kept=_kept_pixels(ws))
        try:
            test = None
            if zip_path:
                with pixel_budget(budget):
                    images, test = uploads.read_zip(zip_path)
            elif files:
                with pixel_budget(budget):
                    images = uploads.from_named_files(list(files))
            elif any(c.name.strip() or c.files for c in cards):
                with pixel_budget(budget):
                    images = uploads.from_cards(list(cards))
            else:
                raise UserError(
                    "Nothing to use yet: fill at least two class cards, or add a zip or "
                    "named image files."
                )
            name = f"my images {ws.uploads_made + 1}"
            check_labels(self.bundle, images.classes)
            domain = uploads.make_domain(name, images, test)
        except DataError as err:
            raise UserError(str(err)) from None
        ws.uploads_made += 1
        title = f"Your images ({len(domain.train)} to train, {len(domain.test)} to test)"
        data = Dataset.of(domain, title, from_cards=not (zip_path or files))
        ws.uploads[name] = data
        ws.selected = name
        self.remember(ws)
        return data

    def add_own_example(self, key: str | None, value, kind: str = "drawing") -> str:
        """A pad drawing or webcam photo for a class card: checked (not blank), padded square
        and scaled to the model's input size, written as a PNG in this browser's folder. The
        card then holds it like an uploaded file ("Use these images" checks it again)."""
        try:
            if kind == "drawing":
                picture = drawing.drawing_image(value)
            elif kind == "photo":
                picture = drawing.photo_image(value)
            else:
                raise UserError(f"Unknown kind of example {kind!r}: a drawing or a photo.")
        except DataError as err:
            raise UserError(str(err)) from None
        side = int(self.bundle.image_size)
        return str(drawing.save_example(picture, self._folder(key) / "own", side, kind))

    def store_side(self) -> int:
        """The shorter side images are kept at: the model's input size (its processor resizes
        to that anyway), but large enough to look at on screen."""
        return max(int(self.bundle.vision.config.image_size), MIN_STORE_SIDE)

    def _extra_sets(self, ws: Workspace, data: Dataset) -> list:
        """Every other example domain and the uploads already trained: the accuracy matrix then
        shows transfer before a set is trained and forgetting after."""
        skip = {data.name, *(c.name for c in self.controls)}
        sets = []
        for name in self.examples.names():
            if name not in skip:
                try:
                    sets.append(self.examples.get(name).target)
                except DataError:
                    log.warning("example domain %s cannot be loaded; skipped", name)
        for name, upload in ws.uploads.items():
            if name not in skip and name in ws.history.base:
                sets.append(upload.target)
        return sets

    # ---- training --------------------------------------------------------------------------
    def train(
        self,
        key: str | None,
        data_name: str | None,
        method: str,
        shots: int,
        epochs: int,
        settings: dict | None = None,
        reader: str | None = None,
        seed: int | None = None,
        also: str | None = None,
    ) -> Iterator[tuple[object, Live]]:
        """Run one session; yield (event, live view) pairs. Ends with a `Done`, a `Stopped` or
        an "error" event. The session's record is appended here when it completes; a stop
        (`ws.stop`) or a closed generator leaves the history and the model as they were.
        `seed` (None: the session's number) draws the images and seeds training as
        `train --seed` does; `also` reads TI and CC a second way (e.g. "mc")."""
        ws = self.workspace(key)
        live = Live()
        with self._queue_lock:
            self._waiting.pop(ws.key, None)  # its turn came (or it is refused below)
        try:
            if ws.busy:
                raise UserError(
                    "A session is already running in this tab: wait for it or press Stop."
                )
            data = self.dataset(ws, data_name)
            check_labels(self.bundle, data.classes)
            if method not in METHODS:
                raise UserError(f"Unknown method {method!r}: choose one of {', '.join(METHODS)}.")
            for name in (reader, also):
                if name is not None and name not in READERS:
                    raise UserError(f"Unknown reader {name!r}: choose one of {', '.join(READERS)}.")
            values = {**engine.settings_for(self.bundle, method), **(settings or {})}
            values["epochs"] = epochs if epochs else values.get("epochs")
            settings = engine.clean_settings(method, values)
            shots = 5 if shots is None else int(shots)
            most = data.max_shots()
            if shots < 1:
                raise UserError("Use at least one shot (training image per class).")
            shots = min(shots, most)
            index = len(ws.history) + 1
            seed = session_seed(seed, index)
            train = one_session(data.domain, shots, seed)
        except USER_ERRORS as err:
            yield self._failed(live, str(err))
            return
        except UserError as err:
            yield self._failed(live, str(err))
            return

        live.method, live.data, live.probes = method, data.name, data.probe_pool()
        if ws.stop.is_set():
            yield self._stopped(live, "Stopped before it started: nothing changed.")
            return
        steps = engine.planned_steps(len(train), settings)
        live.total = steps
        live.status = (
            f"Session {index}: {method} on {data.name}, {shots} per class "
            f"({len(train)} images, {steps} steps)…"
        )
        if zerogpu.on_zerogpu():  # what the visitor's daily GPU quota pays for it
            live.status += " " + zerogpu.quota_note(steps)
        ws.busy, ws.runner = True, key
        started = time.perf_counter()
        with self._queue_lock:
            self._running[ws.key] = time.monotonic()
        inputs = {
            "index": index,
            "data": data.name,
            "method": method,
            "shots": shots,
            "epochs": epochs,
            "settings": {k: v for k, v in settings.items() if _plain(v)},
            "reader": reader,
            "seed": None if seed == index else seed,
            "also": also,
        }
        first = ws.history.sessions[0].extra.get("reader") if ws.history.sessions else None
        live.reader = first or reader or engine.default_reader()
        worker = engine.session_worker(
            ws.folds.for_call(ws.history),  # one folded delta, not every session's
            method,
            settings,
            train,
            data.target,
            self.controls,
            self._extra_sets(ws, data),
            live.probes,
            run_seed(seed, 1),
            shots,
            reader,
            also,
        )
        try:
            yield Phase("start", live.status), live
            for event in worker:
                if ws.stop.is_set():
                    worker.close()
                    if ws.closed:  # its page closed or reloaded: say so when it comes back
                        self._interrupted(ws, inputs)
                    yield self._stopped(live, "Stopped: nothing changed.")
                    return
                live.on(event)
                if isinstance(event, Done):
                    live.reader = event.record.extra.get("reader", live.reader)
                    live.readings = dict(event.record.extra.get("readings", {}))
                    event.record.extra["user_seed"] = seed
                    event.record.extra["command"] = self.command(data, event.record, seed)
                    ws.history.append(event.record)
                    self.remember(ws)
                    live.finished, live.saved, live.tone = True, event.record.index, "done"
                    live.phase = "done"
                    seconds = time.perf_counter() - started
                    with self._queue_lock:
                        self._durations.append(seconds)
                    live.status = done_status(event.record, seconds, bool(self.controls))
                    if zerogpu.on_zerogpu():
                        counted = zerogpu.quota_seconds(seconds)
                        live.status += (
                            f" It used at most {counted:.0f} s of your daily ZeroGPU quota "
                            f"({100 * counted / zerogpu.VISITOR_QUOTA_S:.0f}% of a visitor's "
                            "2 minutes)."
                        )
                elif isinstance(event, Stopped):
                    yield self._stopped(live, event.message)
                    return
                yield event, live
            if live.saved:  # after the Done was shown: fold the new version for its chats
                ws.folds.get(ws.history.deltas())
        except GeneratorExit:  # the page went away (a reload): Gradio dropped the event
            if not live.saved:
                self._interrupted(ws, inputs)
            raise
        except USER_ERRORS as err:
            yield self._failed(live, f"{err} Nothing was saved.")
        except Exception as err:  # never a traceback on screen; the log has it
            problem = zerogpu.gpu_problem(err)  # ZeroGPU's quota and duration refusals
            if problem is None:
                log.exception("session failed")
            yield self._failed(
                live,
                problem
                or f"Something went wrong ({type(err).__name__}: {err}). Nothing was saved.",
            )
        finally:
            worker.close()
            ws.busy, ws.runner = False, None
            with self._queue_lock:
                self._running.pop(ws.key, None)
            if ws.closed:
                self.close(ws.key)

    def _interrupted(self, ws: Workspace, inputs: dict) -> None:
        index = inputs["index"]
        ws.interrupted = {
            **inputs,
            "message": f"Session {index} was interrupted by a reload; nothing was saved. "
            "Its settings are back in step 2: press Train to run it again.",
        }
        self.remember(ws)

    def command(self, data: Dataset, record, seed: int) -> str:
        """The `python -m lorsu_demo train` command that repeats `record` (see takeaway)."""
        folder = self.examples.folder / data.name if data.example else None
        earlier = record.index - 1
        return takeaway.train_command(
            self.bundle,
            folder,
            record.method,
            record.settings,
            record.shots,
            seed,
            reader=record.extra.get("reader", "clip"),
            controls=self.control_dirs,
            start_from=history_file_before(record.index) if earlier else None,
        )

    def _failed(self, live: Live, message: str):
        live.status, live.tone, live.finished, live.phase = message, "error", True, "error"
        return {"kind": "error", "message": message}, live

    def _stopped(self, live: Live, message: str):
        live.status, live.tone, live.finished, live.phase = message, "stopped", True, "stopped"
        return Stopped(message), live

    def arm(self, key: str | None) -> None:
        """A Train press: clear the stop flag before the session waits in the queue."""
        ws = self.workspace(key)
        ws.stop.clear()
        with self._queue_lock:
            self._waiting.setdefault(ws.key, time.monotonic())

    def queue_note(self, key: str | None, lanes: int | None = None) -> str | None:
        """While this workspace's session waits for the model: its place in the line and an
        estimate of the wait from the last sessions' durations. None once it runs."""
        ws_key = self.store.resolve(key)
        lanes = max(1, lanes or engine.lane_width(self.info))
        now = time.monotonic()
        with self._queue_lock:
            if ws_key not in self._waiting:
                return None
            mine = self._waiting[ws_key]
            ahead = sum(1 for t in self._waiting.values() if t < mine)
            running = list(self._running.values())
            typical = statistics.median(self._durations) if self._durations else None
        position = ahead + 1
        if len(running) < lanes and ahead == 0:
            return "Waiting for the model: yours is next."
        text = f"Waiting for the model: position {position} in the line"
        if running:
            text += f" ({len(running)} session{'s' if len(running) > 1 else ''} running)"
        if typical is None:
            return text + "; no session has finished yet to estimate the wait."
        left = sum(max(0.0, typical - (now - t)) for t in running) + ahead * typical
        eta = left / lanes
        n = len(self._durations)
        return (
            f"{text}, about {_duration(eta)} to wait (sessions take about "
            f"{_duration(typical)}, the median of the last {n})."
        )

    def stop(self, key: str | None) -> str:
        ws = self.workspace(key)
        ws.stop.set()
        if ws.busy:
            return "Stopping after the current step… nothing of this session will be kept."
        return "Stopped: nothing changed."

    # ---- chat ------------------------------------------------------------------------------
    def chat(
        self,
        key: str | None,
        image,
        question: str,
        version: int | None = None,
        with_base: bool = True,
    ) -> Iterator[tuple[str, str | None]]:
        """Yield (adapted answer, base answer or None) as they grow."""
        adapted, base = "", None
        for which, value in self.ask(key, image, question, version, with_base, sure=False):
            if which == "adapted":
                adapted = value
            else:
                base = value
            yield adapted, base

    def ask(
        self,
        key: str | None,
        image,
        question: str,
        version: int | None = None,
        with_base: bool = True,
        sure: bool = True,
    ) -> Iterator[tuple[str, object]]:
        """A chat in one model call: ("adapted", text) as it grows, ("base", text), then with
        `sure` ("confidence", `confidence()`'s dict) or ("confidence-error", message) when
        there are no classes to read or the model cannot read them."""
        ws = self.workspace(key)
        if image is None or image == "":
            raise UserError("Add an image first: upload one, or click an example below.")
        question = (question or "").strip()
        if not question:
            raise UserError("Type a question, for example: What is in this image?")
        if len(question) > 500:
            raise UserError("That question is long: keep it under 500 characters.")
        version = self.version(ws, version)
        picture = self.chat_image(image)
        request = source = missing = None
        if sure:
            try:
                classes, templates, source = self.confidence_classes(ws)
                request = {"classes": classes, "templates": templates}
            except UserError as err:
                missing = str(err)
        deltas = ws.folds.get(ws.history.deltas(version))
        worker = engine.chat_worker(picture, question, deltas, bool(with_base), request)
        try:
            with worker_refusals():
                for which, value in worker:
                    if which == "confidence":
                        value = {"readings": value, "version": version, "source": source}
                    elif which == "confidence-error":
                        value = f"No confidence for this model: {value}"
                    yield which, value
        finally:
            worker.close()
        if missing:
            yield "confidence-error", missing

    def confidence_classes(self, ws) -> tuple[list[str], list[str] | None, str]:
        """(classes, templates, where they come from) for the confidence bars: the selected
        data's, else the model's own labels, else its control set's."""
        if ws.selected:
            data = self.dataset(ws, None)
            return list(data.classes), data.domain.templates, f"the classes of {data.title}"
        if self.bundle.labels:
            return list(self.bundle.labels), None, "the model's classes (no data picked)"
        if self.controls:
            classes = list(self.controls[0].classes)
            return classes, None, "the control set's classes (no data picked)"
        raise UserError("Pick example data or upload images to see per-class confidence.")

    def confidence(
        self, key: str | None, image, version: int | None = None, with_base: bool = True
    ) -> dict:
        """Per-class confidence of a version (and the base) for a chat image, over
        `confidence_classes`; a call of its own (the page reads it with the answer, `ask`)."""
        ws = self.workspace(key)
        version = self.version(ws, version)
        picture = self.chat_image(image)
        classes, templates, source = self.confidence_classes(ws)
        deltas = ws.folds.get(ws.history.deltas(version))
        with worker_refusals():
            try:
                readings = engine.confidence_worker(picture, classes, deltas, templates, with_base)
            except ConfidenceError as err:  # e.g. a tokenizer without single-token letters
                raise UserError(f"No confidence for this model: {err}") from None
        return {"readings": readings, "version": version, "source": source}

    def chat_image(self, image):
        """A chat image as the model will see it. The same checks as an upload, on the file
        itself (the app opens it, not Gradio), decoded reduced and kept at the model's size."""
        if image is None or image == "":
            raise UserError("Add an image first: upload one, or click an example below.")
        name = Path(str(image)).name[:80] if isinstance(image, (str, Path)) else "the image"
        try:
            with pixel_budget(PixelBudget(self.store_side(), keep_limit=MAX_IMAGE_PIXELS)):
                return open_image(image, name)
        except DataError as err:
            raise UserError(str(err)) from None

    def version(self, ws: Workspace, version) -> int:
        latest = len(ws.history)
        if version is None or version == "" or (isinstance(version, (int, float)) and version < 0):
            return latest
        try:
            value = int(version)
        except (TypeError, ValueError):
            raise UserError(f"Version {version!r} is not a session number.") from None
        if not 0 <= value <= latest:
            raise UserError(f"There is no session {value}: choose 0 (the base model) to {latest}.")
        return value

    # ---- sessions --------------------------------------------------------------------------
    def sessions(self, key: str | None) -> dict:
        ws = self.workspace(key)
        history = ws.history
        matrix = history.matrix()
        return {
            "model": history.model.get("model"),
            "base": history.base,
            "sessions": history.table(),
            "accuracy_matrix": matrix.to_dict(),
        }

    def rollback(self, key: str | None, session: int) -> str:
        ws = self.workspace(key)
        if ws.busy:
            raise UserError("A session is running: stop it (or let it finish) before rolling back.")
        target = self.version(ws, session)
        latest = len(ws.history)
        if target == latest:
            return f"Nothing to roll back: session {latest} is already the latest."
        ws.history.rollback(target)
        self.remember(ws)
        removed = f"session {latest}" if latest == target + 1 else f"sessions {target + 1}-{latest}"
        where = "the base model" if target == 0 else f"session {target}"
        return f"Rolled back to {where}: {removed} removed exactly."

    def export_history(self, key: str | None) -> Path:
        ws = self.workspace(key)
        if not len(ws.history):
            raise UserError("Nothing to download yet: train a session first.")
        name = f"lorsu-history-{self.bundle.name}-{len(ws.history)}-sessions.lorsu"
        folder = self._folder(key) / "history"
        shutil.rmtree(folder, ignore_errors=True)
        return ws.history.save(folder / name)

    def import_history(self, key: str | None, path: str | None) -> str:
        ws = self.workspace(key)
        if not path:
            raise UserError("Choose a history file (.lorsu) to upload.")
        if ws.busy:
            raise UserError("A session is running: stop it (or let it finish) before uploading.")
        try:
            history = History.load(path)
            self._check_fits(history, Path(str(path)).name)
        except HistoryError as err:
            raise UserError(str(err)) from None
        except Exception as err:  # anything odd in a foreign file is still the file's fault
            log.warning("history upload failed: %r", err)
            raise UserError(
                f"{Path(str(path)).name} could not be read as a lorsu-demo history file."
            ) from None
        ws.history = history
        self.remember(ws)
        n = len(history)
        return f"Loaded {n} session{'s' if n != 1 else ''} from {Path(str(path)).name}."

    def _check_fits(self, history: History, name: str) -> None:
        made_on, here = history.model.get("model"), self.bundle.source.get("model")
        if made_on and here and made_on != here:
            raise HistoryError(
                f"{name} was made on the model {made_on!r}, but this app runs {here!r}; "
                "a history only fits the model it was trained on."
            )
        for key in ("seed",):
            if key in history.model and history.model.get(key) != self.bundle.source.get(key):
                raise HistoryError(f"{name} was made on another {here!r} ({key} differs).")
        # Every patch must fit this model exactly (names, shapes, index ranges, value counts,
        # finite values), the same check `apply_stack` repeats before each write, so a history
        # that imports can be applied, and one that cannot is refused before it is kept.
        state = self.bundle.vision_state()
        for record in history.sessions:
            try:
                record.delta.check(state, f"session {record.index}")
            except DeltaError as err:
                raise HistoryError(
                    f"{name} does not fit this model: {err} It was made on another model, "
                    "or it was damaged."
                ) from None

    def export_model(self, key: str | None, session: int | None) -> Path:
        ws = self.workspace(key)
        version = self.version(ws, session)
        problem = engine.export_size_problem(self.bundle)
        if problem:
            raise UserError(problem)
        folder = self._folder(key) / "model"
        shutil.rmtree(folder, ignore_errors=True)
        out = folder / f"{self.bundle.name}-session{version}.zip"
        deltas = ws.folds.get(ws.history.deltas(version))
        with worker_refusals():
            return Path(engine.export_worker(deltas, version, str(out)))

    # ---- what the tables show --------------------------------------------------------------
    def version_choices(self, key: str | None) -> list[tuple[str, int]]:
        ws = self.workspace(key)
        choices = [("0 · base model (no sessions)", 0)]
        for record in ws.history.sessions:
            choices.append(
                (f"{record.index} · after {record.method} on {record.target}", record.index)
            )
        return choices

    def table_rows(self, key: str | None) -> list[list]:
        rows = []
        history = self.workspace(key).history
        for row, record in zip(history.table(), history.sessions, strict=True):
            rows.append(
                [
                    row["session"],
                    row["method"],
                    row["target"],
                    row["classes"],
                    row["shots"],
                    _round(row["target_acc"]),
                    _round(row["ti"], signed=True),
                    _round(row["cc"], signed=True) if self.controls else "—",
                    worst_other(record),
                    round(row["delta_kb"], 1),
                    round(row["seconds"], 1),
                ]
            )
        return rows


def worst_other(record) -> str:
    """The other set (not the target, not a control) that lost most since the base model:
    the paper's controls are all the other datasets, ours CC only the control set."""
    others = record.extra.get("others") or {}
    if others.get("worst") is None:
        return "—"
    return f"{others['worst']} {others['worst_change']:+.1f}"


def done_status(record, seconds: float, has_control: bool) -> str:
    text = (
        f"Done: session {record.index} saved in {seconds:.0f} s (TI {record.ti:+.1f}"
        + (f", CC {record.cc:+.1f}" if has_control else "")
        + ")."
    )
    others = record.extra.get("others") or {}
    if others.get("worst") is not None:
        text += (
            f" Other sets: mean {others['mean_change']:+.1f}, worst {others['worst']} "
            f"{others['worst_change']:+.1f}."
        )
    free = record.extra.get("free_dims_after")
    if free:
        # KeepLoRA: the input dimensions each layer's q/k/v/out still leaves free.
        layers = " · ".join(
            f"L{l} {'/'.join(str(n) for n in row.values())}" for l, row in enumerate(free)
        )
        text += f" Free dimensions left (q/k/v/out per layer): {layers}."
    return text + " Try it in the Chat tab, or train again."


def _duration(seconds: float) -> str:
    seconds = max(1, round(seconds))
    return f"{seconds} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def _plain(value) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _kept_pixels(ws: Workspace) -> int:
    """Pixels of the images this workspace's uploads keep."""
    items = [i for d in ws.uploads.values() for i in (*d.domain.train.items, *d.domain.test.items)]
    return sum(i.image.size[0] * i.image.size[1] for i in items)


def _round(value, signed: bool = False):
    if value is None or not _finite(value):
        return "—"
    return f"{value:+.1f}" if signed else f"{value:.1f}"


TABLE_HEADERS = [
    "Session",
    "Method",
    "Data",
    "Classes",
    "Shots",
    "Target acc %",
    "TI",
    "CC",
    "Worst other set",
    "Change (KB)",
    "Seconds",
]
