"""Several methods on the same data, shots and seed, each from the same starting history.

`run_compare` is a generator of events like `run_session`: for every method a `MethodStart`,
that session's own events (Phase, Scores, Step, Metrics), then a `MethodResult` carrying the
session's record; a final `Compared` lists every result. The starting history is only read:
each method trains from it, and nothing is appended (the caller may keep one record, which
then follows the history exactly as a plain session would).

`second_reading` reads a finished session's TI and CC again with another accuracy reader (the
chat model's multiple choice after a CLIP session, say) and stores it in the record, so that a
record holds both readings: `record.extra["readings"][reader] = {"ti", "cc", ...}`.

The command line gets `python -m lorsu_demo compare` here (registered in `cli.EXTENSIONS`).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .delta import DeltaError, applied
from .evaluate import READERS, EvalSet, accuracy, base_accuracy, ti_cc
from .events import Done, Event, Stopped
from .history import History, HistoryError
from .methods import METHODS, MethodError, make_method, method_settings
from .session import run_session

DEFAULT_METHODS = ["lorsu", "lora", "spu", "full"]
# The reader a session is read with besides its own: the chat model's multiple choice after a
# CLIP session (the paper's VQA reading), CLIP after a session read through the chat model.
SECOND_READER = {"clip": "mc", "mc": "clip", "open": "clip"}


@dataclass
class MethodStart(Event):
    """Method `index` of `total` starts its session."""

    method: str
    index: int
    total: int
    kind = "method"


@dataclass
class MethodResult(Event):
    """A method finished: `result` is its row of the comparison, `record` its SessionRecord
    (not appended anywhere)."""

    method: str
    result: dict
    record: Any = field(default=None, repr=False)
    kind = "result"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "method": self.method, "result": self.result}


@dataclass
class Compared(Event):
    results: list[dict]
    kind = "compared"


def parse_methods(methods: str | list[str] | None) -> list[str]:
    """ "lorsu, lora" or ["lorsu", "lora"] -> checked names in order, without repeats."""
    if methods is None or methods == "" or methods == []:
        return list(DEFAULT_METHODS)
    if isinstance(methods, str):
        methods = methods.split(",")
    names = []
    for name in methods:
        name = str(name).strip()
        if name and name not in names:
            names.append(name)
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise MethodError(
            f"Unknown method {unknown[0]!r}: compare any of {', '.join(METHODS)} (comma-separated)."
        )
    if not names:
        raise MethodError(f"Name at least one method to compare: {', '.join(METHODS)}.")
    return names


def settings_per_method(bundle, methods: list[str], overrides: dict) -> dict[str, dict]:
    """Each method's settings as `train` makes them (`runs.method_settings_for`), with the
    `overrides` a method has (a rank means nothing to full fine-tuning). An override that no
    compared method has is a mistake, and says so."""
    from .runs import method_settings_for

    overrides = {k: v for k, v in overrides.items() if v is not None}
    unused = set(overrides)
    out = {}
    for name in methods:
        own = method_settings(name)
        mine = {k: v for k, v in overrides.items() if k in own}
        unused -= set(mine)
        out[name] = method_settings_for(bundle, name, mine)
    if unused:
        raise MethodError(
            f"None of {', '.join(methods)} has the setting {sorted(unused)[0]!r}; check its "
            "spelling."
        )
    return out


# ---- reading a session twice --------------------------------------------------------------
def known_base(history: History, reader: str) -> dict[str, float]:
    """Accuracies of the untouched model under `reader` that the history already holds."""
    primary = history.sessions[0].extra.get("reader", "clip") if history.sessions else None
    base = dict(history.base) if primary == reader else {}
    for record in history.sessions:
        base.update(record.extra.get("readings", {}).get(reader, {}).get("base", {}))
    return base


def second_reading(
    bundle,
    history: History,
    record,
    target: EvalSet,
    controls: list[EvalSet] = (),
    reader: str = "mc",
) -> dict:
    """TI and CC of `record` (a session that follows `history`) under `reader`, on the target
    and the control sets. Stored in `record.extra["readings"]` beside the session's own reading,
    and returned. Base accuracies under `reader` are taken from the history where earlier
    sessions measured them, else measured now (and stored with this record)."""
    if reader not in READERS:
        raise ValueError(f"unknown accuracy reader {reader!r}: use one of {sorted(READERS)}")
    readings = record.extra.setdefault("readings", {})
    own = record.extra.get("reader", "clip")
    readings.setdefault(own, {"ti": record.ti, "cc": record.cc})
    if reader == own:
        return readings[own]
    sets = [target, *controls]
    base = known_base(history, reader)
    clock = time.perf_counter()
    state = bundle.vision_state()
    with bundle.lock:
        # The untouched model's reading, once per process for all workspaces (as the
        # session's own base phase does): a class's first sessions all read the same sets.
        new_base = {s.name: base_accuracy(bundle, s, reader) for s in sets if s.name not in base}
        with applied(state, [*history.deltas(), record.delta]):
            now = {s.name: accuracy(bundle, s, reader) for s in sets}
    base = {**base, **new_base}
    ti, cc = ti_cc(now, base, target.name, [c.name for c in controls])
    reading = {
        "ti": ti,
        "cc": cc,
        "accuracies": now,
        "base": new_base,
        "seconds": round(time.perf_counter() - clock, 3),
    }
    readings[reader] = reading
    return reading


def result_row(record) -> dict:
    """One method's row of a comparison: TI and CC under the session's reader (`ti`, `cc`),
    and under every reader it was read with (`ti_clip`, `cc_clip`, `ti_mc`, `cc_mc`, ...)."""
    reader = record.extra.get("reader", "clip")
    row = {
        "method": record.method,
        "reader": reader,
        "ti": record.ti,
        "cc": record.cc,
        "target_acc": record.accuracies.get(record.target),
        "control_acc": _mean([record.accuracies[c] for c in record.controls]),
        "trainable_params": record.trainable_params,
        "delta_bytes": record.delta_bytes,
        "changed_values": record.delta.changed_values,
        "seconds": round(sum(record.seconds.values()), 3),
        "settings": record.settings,
    }
    readings = {reader: {"ti": record.ti, "cc": record.cc}, **record.extra.get("readings", {})}
    for name, reading in readings.items():
        row[f"ti_{name}"] = reading["ti"]
        row[f"cc_{name}"] = reading["cc"]
    return row


def _mean(values):
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else None


# ---- the comparison -----------------------------------------------------------------------
def compare_one(
    bundle,
    history: History,
    method,
    train,
    *,
    target: EvalSet,
    controls: list[EvalSet] = (),
    extra_sets: list[EvalSet] = (),
    seed: int = 0,
    shots: int | None = None,
    reader: str = "clip",
    also: str | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Iterator:
    """One method's session of a comparison, from `history`: the session's events (not its
    Done), then a MethodResult with the record, read with `also` too when given; or Stopped.
    (The app runs one GPU call per method through this; `run_compare` loops over it.)"""
    events = run_session(
        bundle,
        history,
        method,
        train,
        target=target,
        controls=list(controls),
        extra_sets=list(extra_sets),
        trained_sets=[target.name],
        seed=seed,
        shots=shots,
        reader=reader,
        should_stop=should_stop,
    )
    record = None
    try:
        for event in events:
            if isinstance(event, Done):
                record = event.record
                break
            yield event
            if isinstance(event, Stopped):
                return
    finally:
        events.close()
    if also is not None:
        second_reading(bundle, history, record, target, list(controls), also)
    yield MethodResult(method.name, result_row(record), record)


def run_compare(
    bundle,
    history: History,
    methods: list[str],
    train,
    *,
    target: EvalSet,
    controls: list[EvalSet] = (),
    extra_sets: list[EvalSet] = (),
    settings: dict[str, dict] | None = None,
    seed: int = 0,
    shots: int | None = None,
    reader: str = "clip",
    also: str | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Iterator:
    """Train one session per method, each from `history` with the same images and seed; yield
    MethodStart, the session's events, MethodResult per method, then Compared (or Stopped).
    `also`: a second reader to read every session with (None: only `reader`)."""
    settings = settings or {}
    # Every method and its settings are checked before the first one trains.
    made = {name: make_method(name, **settings.get(name, {})) for name in methods}
    if not made:
        raise MethodError("Name at least one method to compare.")
    if also is not None and also not in READERS:
        raise ValueError(f"unknown accuracy reader {also!r}: use one of {sorted(READERS)}")
    results = []
    for number, (name, method) in enumerate(made.items(), 1):
        yield MethodStart(name, number, len(made))
        for event in compare_one(
            bundle,
            history,
            method,
            train,
            target=target,
            controls=controls,
            extra_sets=extra_sets,
            seed=seed,
            shots=shots,
            reader=reader,
            also=also,
            should_stop=should_stop,
        ):
            yield event
            if isinstance(event, Stopped):
                return
            if isinstance(event, MethodResult):
                results.append(event.result)
    yield Compared(results)


# ---- the command line ---------------------------------------------------------------------
def start_history(path: str | Path | None, bundle) -> History:
    """A new history on `bundle`, or the history file `path` to continue (checked to fit)."""
    if not path:
        return History(model=dict(bundle.source))
    history = History.load(Path(path))
    made_on, here = history.model.get("model"), bundle.source.get("model")
    if made_on and here and made_on != here:
        raise HistoryError(
            f"{path} was made on the model {made_on!r}, not {here!r}: pass --model {made_on}."
        )
    if "seed" in history.model and history.model["seed"] != bundle.source.get("seed"):
        raise HistoryError(
            f"{path} was made on {here!r} with random weights of seed {history.model['seed']}: "
            f"pass --model-seed {history.model['seed']}."
        )
    # Every patch must fit this model exactly, as the app checks an uploaded history.
    state = bundle.vision_state()
    for record in history.sessions:
        try:
            record.delta.check(state, f"session {record.index}")
        except DeltaError as err:
            raise HistoryError(
                f"{path} does not fit this model: {err} It was made on another model."
            ) from None
    return history


def parse_seeds(text: str) -> list[int]:
    """`0-4` or `0,3,7` (or both: `0-2,9`) as a list of distinct seeds, in the order given."""
    seeds: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        first, dash, last = part.partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise MethodError(
                f"--seeds {text!r}: give seeds as numbers, a range or a list, e.g. 0-4 or 0,3,7."
            )
        span = range(int(first), int(last) + 1) if dash else [int(first)]
        if not span:
            raise MethodError(f"--seeds {text!r}: the range {part} is empty; write it low-high.")
        for seed in span:
            if seed in seeds:
                raise MethodError(f"--seeds {text!r} names seed {seed} twice.")
            seeds.append(seed)
    return seeds


def seed_summary(per_seed: list[dict]) -> list[dict]:
    """Each method's TI and CC over the seeds' comparisons: mean, sample sd, min and max of
    every reading (`ti_clip`, `cc_mc`, ...), and how many seeds it ran."""
    methods: dict[str, list[dict]] = {}
    for run in per_seed:
        for row in run["results"]:
            methods.setdefault(row["method"], []).append(row)
    summary = []
    for method, rows in methods.items():
        entry: dict[str, Any] = {"method": method, "seeds": len(rows)}
        for key in rows[0]:
            if not key.startswith(("ti_", "cc_")):
                continue
            values = [r[key] for r in rows if r.get(key) is not None]
            if not values:
                continue
            entry[key] = {
                "mean": statistics.fmean(values),
                "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
                "min": min(values),
                "max": max(values),
            }
        summary.append(entry)
    return summary


def summary_table(summary: list[dict]) -> str:
    """The seeds' summary as a Markdown table: mean +- sd (min to max) of every reading."""
    readers = _readers(summary)
    head = ["method", "seeds", *[f"{w} {r}" for r in readers for w in ("TI", "CC")]]
    lines = ["| " + " | ".join(head) + " |", "|---|---:|" + "---|" * (len(head) - 2)]
    for entry in summary:
        cells = [entry["method"], str(entry["seeds"])]
        for r in readers:
            for w in ("ti", "cc"):
                got = entry.get(f"{w}_{r}")
                cells.append(
                    "-"
                    if got is None
                    else f"{got['mean']:+.1f} +- {got['sd']:.1f} "
                    f"({got['min']:+.1f} to {got['max']:+.1f})"
                )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cmd_compare(args) -> int:
    from .cli import say
    from .model import load_bundle

    methods = parse_methods(args.methods)
    overrides = {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size}
    for item in args.set or []:
        key, _, value = item.partition("=")
        overrides[key.replace("-", "_")] = json.loads(value) if _looks_json(value) else value
    if args.seeds is not None and args.seed is not None:
        raise MethodError("Give --seed or --seeds, not both.")
    seeds = parse_seeds(args.seeds) if args.seeds is not None else [args.seed or 0]
    bundle = load_bundle(
        args.model,
        device=args.device,
        seed=seeds[0] if args.model_seed is None else args.model_seed,
        memory=args.memory,
        clip=args.clip,
    )
    settings = settings_per_method(bundle, methods, overrides)
    history = start_history(args.start_from, bundle)
    also = None if args.also_eval == "none" else args.also_eval
    runs = []
    for seed in seeds:
        out = None
        if args.out:
            out = Path(args.out) / f"seed-{seed}" if args.seeds is not None else Path(args.out)
        runs.append(
            _compare_with_seed(args, bundle, methods, settings, history, also, seed, out, say)
        )
    if args.seeds is None:
        summary = runs[0]
    else:
        summary = {
            key: runs[0][key]
            for key in ("model", "data", "target", "controls", "shots", "reader", "also")
        }
        summary["start_sessions"] = len(history)
        summary["seeds"] = seeds
        summary["per_seed"] = runs
        summary["summary"] = seed_summary(runs)
    if args.json:
        print(json.dumps(summary))
    elif args.seeds is None:
        print(results_table(summary["results"]))
    else:
        print(summary_table(summary["summary"]))
    return 0


def _compare_with_seed(args, bundle, methods, settings, history, also, seed, out, say) -> dict:
    """One comparison (every method, one seed's shots) as `compare --seed SEED` prints it."""
    from .runs import one_session, plan_run, run_seed

    plan = plan_run(bundle, args.data, args.control, 1, args.shots, seed)
    train = one_session(plan.domain, args.shots, seed)
    say(
        f"{bundle.name}: comparing {', '.join(methods)} on {plan.domain.name}, {args.shots} "
        f"shots per class, seed {seed}, from {len(history)} earlier session(s)"
    )
    current = ""
    results, records = [], {}
    for event in run_compare(
        bundle,
        history,
        methods,
        train,
        target=plan.target,
        controls=plan.controls,
        settings=settings,
        seed=run_seed(seed, 1),
        reader=args.eval,
        also=also,
    ):
        if isinstance(event, MethodStart):
            current = f"[{event.method} {event.index}/{event.total}]"
            say(f"{current} training from session {len(history)}")
        elif isinstance(event, MethodResult):
            results.append(event.result)
            records[event.method] = event.record
            say(f"{current} {_describe_result(event.result)}")
        elif event.kind == "step" and (event.step == event.total or event.step % 10 == 0):
            say(f"{current} step {event.step}/{event.total} loss {event.loss:.4f}")
    if out:
        for name, record in records.items():
            kept = History(model=dict(history.model), base=dict(history.base))
            for earlier in history.sessions:
                kept.append(earlier)
            kept.append(record)
            kept.save(out / name / "history.lorsu")
        say(f"wrote {out}/<method>/history.lorsu (continue one with train --start-from)")
    return {
        "model": bundle.source.get("model"),
        "data": str(args.data),
        "target": plan.target.name,
        "controls": [c.name for c in plan.controls],
        "shots": args.shots,
        "seed": seed,
        "reader": args.eval,
        "also": also,
        "start_sessions": len(history),
        "base": {
            "target_acc": history.base.get(plan.target.name)
            if plan.target.name in history.base
            else _first_base(records, plan.target.name),
        },
        "results": results,
    }


def _first_base(records: dict, name: str):
    for record in records.values():
        if name in record.extra.get("base", {}):
            return record.extra["base"][name]
    return None


def _looks_json(value: str) -> bool:
    # The same rule as `train --set`: numbers, lists, objects, true/false are JSON.
    return value[:1] in tuple("0123456789-[{") or value in ("true", "false")


def _describe_result(row: dict) -> str:
    parts = [f"TI {row['ti']:+.1f}", f"CC {row['cc']:+.1f} ({row['reader']})"]
    for key in row:
        if key.startswith("ti_") and key != f"ti_{row['reader']}":
            name = key[3:]
            parts.append(f"TI {row[key]:+.1f} CC {row[f'cc_{name}']:+.1f} ({name})")
    parts.append(f"{row['trainable_params']:,} trainable, {row['seconds']:.1f} s")
    return ", ".join(parts)


def _readers(rows: list[dict]) -> list[str]:
    """The readers the rows were read with (`ti_<reader>` keys), in the order first met."""
    readers: list[str] = []
    for row in rows:
        readers += [k[3:] for k in row if k.startswith("ti_") and k[3:] not in readers]
    return readers


def results_table(results: list[dict]) -> str:
    """The comparison as a Markdown table (the CLI prints it; docs paste it)."""
    readers = _readers(results)
    head = ["method", *[f"{w} {r}" for r in readers for w in ("TI", "CC")]]
    head += ["trainable params", "delta KB", "seconds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    for row in results:
        cells = [row["method"]]
        for r in readers:
            cells += [_signed(row.get(f"ti_{r}")), _signed(row.get(f"cc_{r}"))]
        cells += [
            f"{row['trainable_params']:,}",
            f"{row['delta_bytes'] / 1024:.1f}",
            f"{row['seconds']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _signed(value) -> str:
    return (
        "-"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else f"{value:+.1f}"
    )


def add_commands(commands) -> None:
    from .model import OFFLINE_PRESET

    compare = commands.add_parser(
        "compare",
        help="several methods on the same data, shots and seed, each from the same start",
    )
    compare.add_argument("--data", required=True, help="DIR/<class>/*.png, or DIR/train + DIR/test")
    compare.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"comma-separated, any of {', '.join(METHODS)} (default: %(default)s)",
    )
    compare.add_argument(
        "--model", default=OFFLINE_PRESET, help="preset, bundle folder or LLaVA folder"
    )
    compare.add_argument(
        "--clip",
        default=None,
        help="CLIP checkpoint (local folder or hub id) for a LLaVA folder (default: $LORSU_CLIP)",
    )
    compare.add_argument("--control", action="append", help="control set folder (repeatable)")
    compare.add_argument("--shots", type=int, default=5)
    compare.add_argument("--epochs", type=int, help="for every method (default: each its own)")
    compare.add_argument("--lr", type=float, help="for every method (default: each its own)")
    compare.add_argument("--batch-size", type=int)
    compare.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="a setting, for the methods that have it",
    )
    compare.add_argument("--seed", type=int, default=None, help="(default: 0)")
    compare.add_argument(
        "--seeds",
        metavar="LIST",
        help="run the comparison once per seed (0-4, or 0,3,7) and summarise each method's TI "
        "and CC over them: mean, sd, min, max (--out writes OUT/seed-S/<method>/...)",
    )
    compare.add_argument(
        "--model-seed",
        type=int,
        help="seed of tiny-random's random weights (default: --seed, or the first of --seeds)",
    )
    compare.add_argument(
        "--eval",
        default="clip",
        choices=["clip", "mc", "open"],
        help="the accuracy reader of the sessions (and of the live curve)",
    )
    compare.add_argument(
        "--also-eval",
        default="mc",
        choices=["mc", "clip", "open", "none"],
        help="read every session's TI and CC a second way too (default: the chat model's "
        "multiple choice; none to skip)",
    )
    compare.add_argument(
        "--start-from", metavar="HISTORY", help="a history file: every method continues it"
    )
    compare.add_argument(
        "--out", help="write OUT/<method>/history.lorsu: the start plus that method's session"
    )
    compare.add_argument("--memory", choices=["bf16", "4bit"])
    compare.add_argument("--device", default=None)
    compare.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    compare.set_defaults(func=cmd_compare)


from .cli import EXTENSIONS  # noqa: E402  (cli imports this module at its end)

EXTENSIONS.append(add_commands)
