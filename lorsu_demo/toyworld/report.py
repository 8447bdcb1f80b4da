"""Measure the toy world's figures the way a user meets them: through the command line.

    python -m lorsu_demo.toyworld.report [--assets assets] [--heldout DIR] \
        [--out docs/toyworld-figures.json]

1. Base accuracies of the shipped model under every reader (CLIP zero-shot, the chat model's
   multiple choice and its open answer) on the control set and every domain's test set.
2. For every example domain (and every held-out look under --heldout, written by
   `python -m lorsu_demo.toyworld.heldout`), as separate processes:

       python -m lorsu_demo compare --data D --methods lorsu,lora,spu,full --json
       python -m lorsu_demo train --data D --sessions 1 --shots 5 --eval open --json

   `compare` runs one default 5-shot session of each method from the base model, read by CLIP
   and by the chat model's multiple choice; `train --eval open` reads the `lorsu` session
   through the chat model's open answers.

Prints Markdown tables and writes every figure, with its command, to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lorsu_demo.toyworld.train import arithmetic

READERS = ("clip", "mc", "open")
METHODS = "lorsu,lora,spu,full"


def run_json(shown: list[str], out_flag: bool) -> tuple[dict, float]:
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, *shown[1:]] + (["--out", f"{tmp}/run"] if out_flag else [])
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{' '.join(shown)} failed:\n{done.stderr[-2000:]}")
        return json.loads(done.stdout), round(time.perf_counter() - start, 1)


def base_accuracies(model: str, folders: dict[str, Path], control: Path) -> dict:
    """{set: {reader: accuracy}} for the control set and each folder's test images."""
    from lorsu_demo import vqa  # noqa: F401  (registers the chat readers)
    from lorsu_demo.data import load_domain
    from lorsu_demo.evaluate import EvalSet, accuracy
    from lorsu_demo.model import load_bundle
    from lorsu_demo.runs import load_control

    bundle = load_bundle(model)
    images = load_control(control)
    sets = {"control": EvalSet("control", images, images.classes, role="control")}
    for name, folder in folders.items():
        domain = load_domain(folder)
        sets[name] = EvalSet(name, domain.test, domain.classes, domain.templates)
    return {
        name: {reader: round(accuracy(bundle, s, reader), 1) for reader in READERS}
        for name, s in sets.items()
    }


def measure(name: str, folder: Path, model: str, methods: str) -> dict:
    common = ["--model", model, "--data", str(folder), "--shots", "5", "--seed", "0", "--json"]
    compare_cmd = ["python", "-m", "lorsu_demo", "compare", *common, "--methods", methods]
    compare_cmd += ["--eval", "clip", "--also-eval", "mc"]
    compared, compare_s = run_json(compare_cmd, out_flag=False)
    open_cmd = ["python", "-m", "lorsu_demo", "train", *common, "--sessions", "1"]
    open_cmd += ["--eval", "open"]
    opened, open_s = run_json(open_cmd, out_flag=True)
    (session,) = opened["sessions"]
    rows = []
    for result in compared["results"]:
        row = {"method": result["method"]}
        for reader in ("clip", "mc"):
            row[f"ti_{reader}"] = result.get(f"ti_{reader}")
            row[f"cc_{reader}"] = result.get(f"cc_{reader}")
        if result["method"] == "lorsu":
            row["ti_open"], row["cc_open"] = session["ti"], session["cc"]
        rows.append(row)
    return {
        "domain": name,
        "commands": [" ".join(compare_cmd), " ".join(open_cmd) + " --out RUN"],
        "seconds": {"compare": compare_s, "train_open": open_s},
        "methods": rows,
    }


def processor_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(
                line.split(":", 1)[1].strip() for line in f if line.startswith("model name")
            )
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def _num(value) -> str:
    return "-" if value is None else f"{value:+.1f}"


def tables(base: dict, runs: list[dict]) -> str:
    lines = ["| set | CLIP | chat (mc) | chat (open) |", "|---|---:|---:|---:|"]
    for name, accs in base.items():
        lines.append(f"| {name} | {accs['clip']:.1f} | {accs['mc']:.1f} | {accs['open']:.1f} |")
    lines += [
        "",
        "| domain | method | TI clip | CC clip | TI mc | CC mc | TI open | CC open | mc/clip |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        for row in run["methods"]:
            ratio = (
                f"{row['ti_mc'] / row['ti_clip']:.2f}"
                if row.get("ti_mc") is not None and row.get("ti_clip")
                else "-"
            )
            cells = [_num(row.get(f"{k}_{r}")) for r in READERS for k in ("ti", "cc")]
            lines.append(f"| {run['domain']} | `{row['method']}` | {' | '.join(cells)} | {ratio} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--assets", default="assets", type=Path)
    ap.add_argument("--model", default="toy")
    ap.add_argument("--heldout", type=Path, help="a folder written by toyworld.heldout")
    ap.add_argument("--methods", default=METHODS)
    ap.add_argument("--out", default="docs/toyworld-figures.json", type=Path)
    args = ap.parse_args(argv)
    folders = {p.name: p for p in sorted((args.assets / "domains").iterdir()) if p.is_dir()}
    if args.heldout:
        folders.update(
            {f"held-out {p.name}": p for p in sorted(args.heldout.iterdir()) if p.is_dir()}
        )
    base = base_accuracies(args.model, folders, args.assets / "control")
    print(tables(base, []).split("\n\n")[0], flush=True)
    runs = []
    for name, folder in folders.items():
        runs.append(measure(name, folder, args.model, args.methods))
        print(f"{name}: {json.dumps(runs[-1]['methods'])}", flush=True)
    print()
    print(tables(base, runs))
    machine = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": processor_name(),
        "cpus": os.cpu_count(),
        # as the model was loaded for the figures (the toy runs on one thread, model.py); the
        # sessions' and chat's figures reproduced across CPU kernel levels (docs/toyworld.md)
        "arithmetic": arithmetic(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    document = {"machine": machine, "base": base, "runs": runs}
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
