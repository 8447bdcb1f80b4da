"""The Compare tab's actions, without Gradio: run several methods from the user's history, and
keep one of them.

`compare` checks the request, runs `lorsu_demo.compare.run_compare` in a GPU worker (the same
queue lane as training) and yields (event, view) pairs; the user's history is only read. The
sessions it trained wait in the workspace (`ws.compared`) until `keep` appends one, which it
does only while the history is still the one they started from.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..compare import Compared, MethodResult, MethodStart, compare_one, parse_methods
from ..evaluate import READERS
from ..events import Metrics, Phase, Step, Stopped
from ..methods import MethodError, make_method, method_settings
from ..runs import check_labels, one_session, run_seed
from . import engine, zerogpu
from .core import USER_ERRORS, AppCore, UserError, session_seed

log = logging.getLogger("lorsu_demo.ui")


@dataclass
class CompareView:
    """What the Compare tab shows, updated event by event."""

    status: str = "Starting"
    tone: str = "busy"
    methods: list[str] = field(default_factory=list)
    current: str = ""
    results: list[dict] = field(default_factory=list)
    finished: bool = False
    start: int = 0  # sessions in the history the comparison started from

    def on(self, event) -> None:
        if isinstance(event, MethodStart):
            self.current = event.method
            self.status = f"{event.method} ({event.index} of {event.total}): starting…"
        elif isinstance(event, Step):
            self.status = (
                f"{self.current} ({self._position()}): step {event.step} of {event.total} · "
                f"loss {event.loss:.3f}"
            )
        elif isinstance(event, Phase):
            self.status = f"{self.current} ({self._position()}): {event.message}…"
        elif isinstance(event, Metrics) and event.step == 0:
            self.status = f"{self.current} ({self._position()}): training…"
        elif isinstance(event, MethodResult):
            self.results.append(event.result)

    def _position(self) -> str:
        index = self.methods.index(self.current) + 1 if self.current in self.methods else 0
        return f"{index} of {len(self.methods)}"


def _history_key(history) -> tuple:
    """What identifies a history's sessions: a kept session must follow exactly these."""
    return tuple((r.index, r.method, r.created) for r in history.sessions)


def _method_seconds(
    history, method, settings, train, target, controls=(), extra_sets=(), seed=0, shots=None,
    reader="clip", also=None,
) -> int:  # fmt: skip
    """ZeroGPU duration of one method's session (a comparison asks once per method, so that
    each call stays within the platform's longest call); a second reading adds its evaluation."""
    steps = engine.planned_steps(len(train), settings)
    extra = zerogpu.SESSION_FIXED_S if also else 0
    return int(min(zerogpu.MAX_DURATION_S, zerogpu.session_seconds(steps) + extra))


@engine.gpu(duration=_method_seconds)
def method_worker(
    history,
    method: str,
    settings: dict,
    train,
    target,
    controls=(),
    extra_sets=(),
    seed: int = 0,
    shots: int | None = None,
    reader: str = "clip",
    also: str | None = None,
) -> Iterator:
    """One method's session of a comparison on the process's model (`compare_one`): its
    events, then a MethodResult carrying the record (nothing is appended anywhere)."""
    with engine.borrow() as bundle:  # this call's copy of the model
        events = compare_one(
            bundle,
            history,
            make_method(method, **settings),
            train,
            target=target,
            controls=list(controls),
            extra_sets=list(extra_sets),
            seed=seed,
            shots=shots,
            reader=reader,
            also=also,
        )
        try:
            yield from events
        finally:
            events.close()


def method_settings_for_app(
    core: AppCore, methods: list[str], epochs, settings: dict | None
) -> dict[str, dict]:
    """Each method's settings as a Train press would make them, with `epochs` (None: each
    method's own) and `settings` applied where the method has them."""
    settings = dict(settings or {})
    known = set().union(*(method_settings(m) for m in methods))
    unknown = sorted(set(settings) - known)
    if unknown:
        raise UserError(
            f"None of {', '.join(methods)} has the setting {unknown[0]!r}; check its spelling."
        )
    out = {}
    for name in methods:
        values = engine.settings_for(core.bundle, name)
        values.update({k: v for k, v in settings.items() if k in values})
        if epochs:
            values["epochs"] = epochs
        out[name] = engine.clean_settings(name, values)
    return out


def compare(
    core: AppCore,
    key: str | None,
    data_name: str | None,
    methods,
    shots: int | None,
    epochs: int | None = None,
    settings: dict | None = None,
    seed: int | None = None,
    reader: str | None = None,
    also: str | None = "mc",
) -> Iterator[tuple[object, CompareView]]:
    """Run every method from the workspace's history; yield (event, view). Ends with a
    `Compared` event, a `Stopped` or an "error" dict. The history is never changed."""
    ws = core.workspace(key)
    view = CompareView()
    try:
        if ws.busy:
            raise UserError("A session is already running in this tab: wait for it or press Stop.")
        data = core.dataset(ws, data_name)
        check_labels(core.bundle, data.classes)
        names = parse_methods(methods)
        if not reader:  # a history keeps the reader it started with
            first = ws.history.sessions[0] if ws.history.sessions else None
            reader = first.extra.get("reader", "clip") if first else engine.default_reader()
        also = also or None
        for name in (reader, also):
            if name is not None and name not in READERS:
                raise UserError(f"Unknown reader {name!r}: choose one of {', '.join(READERS)}.")
        per_method = method_settings_for_app(core, names, epochs, settings)
        for name in names:  # every method's settings are checked before the first one trains
            make_method(name, **per_method[name])
        shots = 5 if shots is None or shots == "" else int(shots)
        if shots < 1:
            raise UserError("Use at least one shot (training image per class).")
        shots = min(shots, data.max_shots())
        index = len(ws.history) + 1
        seed = session_seed(seed, index)
        train = one_session(data.domain, shots, seed)
    except (UserError, MethodError, *USER_ERRORS) as err:
        yield _failed(view, str(err))
        return

    view.methods, view.start = names, len(ws.history)
    if ws.stop.is_set():
        yield _stopped(view, "Stopped before it started: nothing changed.")
        return
    start_key = _history_key(ws.history)
    extra_sets = core._extra_sets(ws, data)
    ws.compared = {}
    ws.busy = True
    started = time.perf_counter()
    view.status = (
        f"Comparing {', '.join(names)} on {data.name}: {shots} per class, seed {seed}, each "
        f"from session {len(ws.history)}…"
    )
    records, results = {}, []
    worker = None
    try:
        yield Phase("start", view.status), view
        for number, name in enumerate(names, 1):
            event = MethodStart(name, number, len(names))
            view.on(event)
            yield event, view
            worker = method_worker(
                ws.history,
                name,
                per_method[name],
                train,
                data.target,
                core.controls,
                extra_sets,
                run_seed(seed, 1),
                shots,
                reader,
                also,
            )
            for event in worker:
                if ws.stop.is_set():
                    worker.close()
                    yield _stopped(view, "Stopped: nothing changed.")
                    return
                view.on(event)
                if isinstance(event, Stopped):
                    yield _stopped(view, event.message)
                    return
                if isinstance(event, MethodResult):
                    record = event.record
                    record.extra["user_seed"] = seed
                    record.extra["command"] = core.command(data, record, seed)
                    records[name] = record
                    results.append(event.result)
                yield event, view
            worker.close()
        ws.compared = {"start": start_key, "records": records, "data": data.name}
        view.finished, view.tone = True, "done"
        best = max(results, key=lambda r: r["ti"])
        view.status = (
            f"Compared {len(names)} methods in {time.perf_counter() - started:.0f} s "
            f"(most learned: {best['method']}, TI {best['ti']:+.1f}). Your history is "
            "unchanged: keep one method's session below, or compare again."
        )
        yield Compared(results), view
    except USER_ERRORS as err:
        yield _failed(view, f"{err} Nothing was saved.")
    except Exception as err:  # never a traceback on screen; the log has it
        problem = zerogpu.gpu_problem(err)  # ZeroGPU's quota and duration refusals
        if problem is None:
            log.exception("comparison failed")
        yield _failed(
            view,
            problem or f"Something went wrong ({type(err).__name__}: {err}). Nothing saved.",
        )
    finally:
        if worker is not None:
            worker.close()
        ws.busy = False
        if ws.closed:
            core.close(ws.key)


def keep(core: AppCore, key: str | None, method: str) -> str:
    """Append the compared session of `method` to the history, if it still follows it."""
    ws = core.workspace(key)
    records = ws.compared.get("records", {})
    if not records:
        raise UserError("Nothing to keep yet: run a comparison first.")
    if method not in records:
        raise UserError(f"The last comparison has no {method!r}: keep one of {', '.join(records)}.")
    if ws.busy:
        raise UserError("A session is running: wait for it before keeping a compared one.")
    if _history_key(ws.history) != ws.compared["start"]:
        raise UserError(
            "Your sessions changed since this comparison (a session trained, a roll back or an "
            "upload), so its sessions no longer follow them: compare again."
        )
    record = records[method]
    ws.history.append(record)
    ws.compared = {}  # the others started from the history before this one
    return (
        f"Kept {method}: it is session {record.index} now (TI {record.ti:+.1f}, "
        f"CC {record.cc:+.1f})."
    )


def _failed(view: CompareView, message: str):
    view.status, view.tone, view.finished = message, "error", True
    return {"kind": "error", "message": message}, view


def _stopped(view: CompareView, message: str):
    view.status, view.tone, view.finished = message, "stopped", True
    return Stopped(message), view
