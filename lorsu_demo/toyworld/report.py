"""Measure the toy world's figures the way a user meets them: through the command line.

    python -m lorsu_demo.toyworld.report [--assets assets] [--out docs/toyworld-figures.json]

For every example domain and method it runs, as a separate process,

    python -m lorsu_demo train --data assets/domains/<name> --sessions 1 --shots 5 --json
        [--method M] [--eval mc]

and records the base accuracy, TI, CC and the command's wall-clock seconds (model loading
included). `--eval mc` reads the same figures through the chat model's multiple-choice answers.
Prints a Markdown table and writes every run's JSON to --out.
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

from lorsu_demo.toyworld.data import DOMAINS

METHODS = ["lorsu", "lora", "spu", "full"]


def run_cli(data: Path, method: str, reader: str, extra: list[str]) -> dict:
    shown = ["python", "-m", "lorsu_demo", "train", "--data", str(data), "--sessions", "1"]
    shown += ["--shots", "5", "--json", "--method", method, "--eval", reader, *extra]
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, *shown[1:], "--out", f"{tmp}/run"]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        seconds = time.perf_counter() - start
    run = json.loads(done.stdout)
    (session,) = run["sessions"]
    return {
        "command": " ".join(shown),
        "method": method,
        "reader": reader,
        "base_target": run["base"]["target_acc"],
        "base_control": run["base"]["control_acc"],
        "target": session["target_acc"],
        "control": session["control_acc"],
        "ti": session["ti"],
        "cc": session["cc"],
        "session_seconds": session["seconds"],
        "wall_seconds": round(seconds, 1),
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| domain | method | reader | base target | after | TI | base control | CC | session s "
        "| command s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['domain']} | `{r['method']}` | {r['reader']} | {r['base_target']:.1f} "
            f"| {r['target']:.1f} | {r['ti']:+.1f} | {r['base_control']:.1f} | {r['cc']:+.1f} "
            f"| {r['session_seconds']:.1f} | {r['wall_seconds']:.1f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--assets", default="assets", type=Path)
    ap.add_argument("--out", default="docs/toyworld-figures.json", type=Path)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--domains", default=",".join(DOMAINS))
    ap.add_argument("--no-mc", action="store_true", help="skip the multiple-choice runs")
    ap.add_argument("extra", nargs="*", help="more `train` options, after --")
    args = ap.parse_args(argv)
    rows = []
    plan = [(m, "clip") for m in args.methods.split(",")]
    if not args.no_mc:
        plan.append(("lorsu", "mc"))
    for method, reader in plan:
        for name in args.domains.split(","):
            row = {"domain": name}
            row.update(run_cli(args.assets / "domains" / name, method, reader, args.extra))
            rows.append(row)
            print(table([row]).splitlines()[-1], flush=True)
    print()
    print(table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    machine = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }
    args.out.write_text(json.dumps({"machine": machine, "runs": rows}, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
