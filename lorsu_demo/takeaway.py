"""Results a researcher can take away: the command that repeats a session, and a history's
sessions table and accuracy matrix as CSV and JSON.

`train_command` writes the `python -m lorsu_demo train ...` line that trains the same session
again: same model, data, method, settings, shots, seed and reader, from the same earlier
history (`--start-from`). On CPU it gives the same delta and the same TI bit for bit, because
the app draws a session's images and seeds its training exactly as a one-session `train` run
does (`runs.one_session`, `runs.run_seed`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shlex
from pathlib import Path

from .history import History
from .methods import make_method
from .runs import method_settings_for

# Settings with a flag of their own in `train`; any other setting goes through --set.
FLAGS = {
    "epochs": "--epochs",
    "lr": "--lr",
    "batch_size": "--batch-size",
    "heads": "--heads",
    "rank": "--rank",
    "alpha": "--alpha",
    "sparsity": "--sparsity",
}


def cli_baseline(bundle, method: str) -> dict:
    """The settings `train --method METHOD` uses when no setting is given."""
    return dict(make_method(method, **method_settings_for(bundle, method, {})).hp)


def setting_args(settings: dict, baseline: dict) -> list[str]:
    """The flags that turn `baseline` into `settings` (only what differs)."""
    args: list[str] = []
    for key, value in settings.items():
        if key in baseline and baseline[key] == value:
            continue
        if key == "multi_positive" and value is True:
            args.append("--multi-positive")
        elif key in FLAGS and not isinstance(value, bool):
            args += [FLAGS[key], repr(value)]
        else:
            # `train --set` reads numbers, lists, objects and true/false as JSON, else text.
            text = value if isinstance(value, str) else json.dumps(value)
            args += ["--set", f"{key}={text}"]
    return args


def train_command(
    bundle,
    data_dir: str | Path | None,
    method: str,
    settings: dict,
    shots: int,
    seed: int,
    *,
    reader: str = "clip",
    controls: list[str] | None = None,
    start_from: str | None = None,
    out: str | None = None,
) -> str:
    """The `python -m lorsu_demo train` command of one session (see the module's docstring).
    `data_dir` None: data that is not in a folder (uploads); the command then names DIR."""
    source = bundle.source
    args = ["python", "-m", "lorsu_demo", "train", "--model", str(source.get("model"))]
    if "seed" in source and source["seed"] != seed:
        args += ["--model-seed", str(source["seed"])]  # tiny-random's weights
    if bundle.device.type != "cpu":
        args += ["--device", bundle.device.type]
    args += ["--data", _shown_path(data_dir) if data_dir else "DIR"]
    for control in controls or []:
        args += ["--control", _shown_path(control)]
    args += ["--method", method, "--shots", str(int(shots)), "--seed", str(int(seed))]
    args += setting_args(settings, cli_baseline(bundle, method))
    if reader != "clip":
        args += ["--eval", reader]
    if start_from:
        args += ["--start-from", start_from]
    args += ["--out", out or f"runs/{method}-seed{seed}"]
    return " ".join(a if a == "DIR" else shlex.quote(a) for a in args)


def _shown_path(path: str | Path) -> str:
    """Relative to the working directory when inside it (`assets/domains/...`)."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def history_upto(history: History, upto: int) -> History:
    """A copy of `history` with sessions 1..upto (a `--start-from` file for session upto+1)."""
    copy = History(model=dict(history.model))
    for record in history.sessions[:upto]:
        copy.append(record)  # brings the base accuracies that session measured
    return copy


# ---- tables -------------------------------------------------------------------------------
def trained_cells(history: History) -> list[tuple[int, str]]:
    """(session, set) for every set every session trained: the matrix's boxes."""
    return [(r.index, name) for r in history.sessions for name in r.trained_sets]


def readers_of(history: History) -> list[str]:
    names: list[str] = []
    for record in history.sessions:
        own = record.extra.get("reader", "clip")
        for name in [own, *record.extra.get("readings", {})]:
            if name not in names:
                names.append(name)
    return names


def session_rows(history: History) -> list[dict]:
    """One row per session: what ran, TI and CC under every reader it was read with."""
    readers = readers_of(history)
    rows = []
    for record in history.sessions:
        own = record.extra.get("reader", "clip")
        readings = {own: {"ti": record.ti, "cc": record.cc}, **record.extra.get("readings", {})}
        row = {
            "session": record.index,
            "method": record.method,
            "target": record.target,
            "classes": " ".join(record.classes),
            "shots": record.shots,
            "seed": record.extra.get("user_seed", record.seed),
            "reader": own,
            "target_acc": record.accuracies.get(record.target),
            "ti": record.ti,
            "cc": record.cc,
        }
        for name in readers:
            reading = readings.get(name, {})
            row[f"ti_{name}"] = reading.get("ti")
            row[f"cc_{name}"] = reading.get("cc")
        row.update(
            {
                "trainable_params": record.trainable_params,
                "delta_bytes": record.delta_bytes,
                "seconds": round(sum(record.seconds.values()), 3),
                "trained_sets": " ".join(record.trained_sets),
                "command": record.extra.get("command", ""),
            }
        )
        rows.append(row)
    return rows


def sessions_csv(history: History) -> str:
    rows = session_rows(history)
    out = io.StringIO()
    if rows:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(v) for k, v in row.items()})
    return out.getvalue()


def matrix_csv(history: History) -> str:
    """a[j, i] with a header of set names; row j is after session j (0: the base model).
    Full precision (`repr`), so the file holds exactly the matrix; empty: not measured."""
    matrix = history.matrix()
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["after_session", *matrix.sets])
    for j, row in enumerate(matrix.rows):
        writer.writerow([j, *[_cell(v) for v in row]])
    return out.getvalue()


def matrix_json(history: History) -> dict:
    matrix = history.matrix()
    return {
        **_finite(matrix.to_dict()),
        "trained": [[j, name] for j, name in trained_cells(history)],
    }


def write_tables(history: History, folder: str | Path, stem: str = "lorsu") -> list[Path]:
    """sessions.csv/json and matrix.csv/json in `folder`; returns the four paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sessions = {"model": history.model, "base": history.base, "sessions": session_rows(history)}
    files = {
        f"{stem}-sessions.csv": sessions_csv(history),
        f"{stem}-sessions.json": json.dumps(_finite(sessions), indent=1),
        f"{stem}-matrix.csv": matrix_csv(history),
        f"{stem}-matrix.json": json.dumps(matrix_json(history), indent=1),
    }
    paths = []
    for name, content in files.items():
        path = folder / name
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(content)
        os.replace(tmp, path)
        paths.append(path)
    return paths


def _cell(value):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return repr(value) if isinstance(value, float) else value


def _finite(value):
    """JSON without NaN (not valid JSON): a value not measured is null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
