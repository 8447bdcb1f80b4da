"""`python -m lorsu_demo`: train, export, sessions (and the app and benchmarks)."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from .data import DataError
from .delta import applied
from .history import History, HistoryError
from .methods import METHODS, MethodError, method_settings
from .model import OFFLINE_PRESET, BundleError, load_bundle, save_bundle
from .runs import HISTORY_FILE, method_settings_for, plan_run, run_sessions, run_summary

USER_ERRORS = (DataError, BundleError, HistoryError, MethodError)


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def describe(event, session, total_sessions: int) -> str | None:
    tag = f"[session {session.index}/{total_sessions}]"
    if event.kind == "phase":
        return f"{tag} {event.message}"
    if event.kind == "scores":
        if event.head_scores is None:
            return None
        heads = " ".join(
            f"L{l}:{','.join(map(str, h))}" for l, h in enumerate(event.selected_heads) if h
        )
        return f"{tag} selected heads {heads}"
    if event.kind == "step":
        return f"{tag} step {event.step}/{event.total} loss {event.loss:.4f} lr {event.lr:.2e}"
    if event.kind == "metrics":
        control = (
            ""
            if math.isnan(event.control_acc)
            else f"  control {event.control_acc:.1f}% (CC {event.cc:+.1f})"
        )
        return f"{tag} target {event.target_acc:.1f}% (TI {event.ti:+.1f}){control}"
    if event.kind in ("done", "stopped"):
        return f"{tag} {event.message}"
    return None


def cmd_train(args) -> int:
    out = Path(args.out)
    if (out / HISTORY_FILE).exists():
        raise HistoryError(f"{out} already holds a run: choose another --out or delete it.")
    settings = {
        "lr": args.lr,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "heads": args.heads,
        "rank": args.rank,
        "alpha": args.alpha,
        "sparsity": args.sparsity,
        "multi_positive": args.multi_positive or None,
    }
    for item in args.set or []:
        key, _, value = item.partition("=")
        settings[key.replace("-", "_")] = (
            json.loads(value) if value[:1] in "0123456789-[{tf" else value
        )
    model_seed = args.seed if args.model_seed is None else args.model_seed
    bundle = load_bundle(
        args.model, device=args.device, seed=model_seed, memory=args.memory, clip=args.clip
    )
    known = set(METHODS[args.method].defaults) | {
        "lr",
        "epochs",
        "batch_size",
        "multi_positive",
        "weight_decay",
        "warmup",
        "max_importance_images",
    }
    settings = {
        k: v
        for k, v in settings.items()
        if v is not None and (k in known or k in (args.set_keys or []))
    }
    settings = method_settings_for(bundle, args.method, settings)
    iterations = settings.get("iterations", method_settings(args.method).get("iterations", 0))
    if iterations and args.epochs is not None:
        # DAC trains a number of steps, as its authors do; say so rather than ignore --epochs.
        say(
            f"note: {args.method} trains {iterations} iterations (its authors' setting); "
            "--epochs is not used. Add --set iterations=0 to train by epochs."
        )
    plan = plan_run(
        bundle, args.data, args.control, args.sessions, args.shots, args.seed, args.template
    )
    history = compare.start_history(args.start_from, bundle)
    out.mkdir(parents=True, exist_ok=True)
    say(
        f"{bundle.name}: {args.method} on {plan.domain.name}, {len(plan.sessions)} session(s), {args.shots} shots per class"
    )
    for session, event in run_sessions(
        bundle, history, plan, args.method, settings, args.seed, save_to=out, reader=args.eval
    ):
        line = describe(event, session, len(plan.sessions))
        if line and (
            event.kind != "step"
            or args.verbose
            or event.step == event.total
            or event.step % 10 == 0
        ):
            say(line)
    summary = run_summary(history, plan.target.name, [c.name for c in plan.controls])
    (out / "run.json").write_text(json.dumps(summary, indent=2))
    if args.json:
        print(json.dumps(summary))
    else:
        say(f"wrote {out / HISTORY_FILE} and {out / 'run.json'}")
    return 0


def load_run(run: str) -> History:
    path = Path(run)
    return History.load(path / HISTORY_FILE if path.is_dir() else path)


def cmd_export(args) -> int:
    history = load_run(args.run)
    model = args.model or history.model.get("model")
    # A run on a LLaVA folder records the CLIP it paired it with; --clip / LORSU_CLIP override.
    recorded_clip = history.model.get("clip") if not args.model else None
    bundle = load_bundle(
        model,
        device="cpu",
        seed=history.model.get("seed", 0),
        clip=args.clip or os.environ.get("LORSU_CLIP") or recorded_clip,
    )
    deltas = history.deltas(args.session)
    out = Path(args.out)
    with bundle.lock, applied(bundle.vision_state(), deltas):
        save_bundle(
            bundle,
            out,
            name=f"{bundle.name}+s{args.session}",
            description=f"{bundle.name} after session {args.session} of {args.run}",
        )
    say(
        f"wrote the VLM after session {args.session} to {out} (LlavaForConditionalGeneration.from_pretrained loads it)"
    )
    return 0


def cmd_sessions(args) -> int:
    history = load_run(args.run)
    rows = history.table()
    if args.json:
        print(
            json.dumps(
                {
                    "base": history.base,
                    "sessions": rows,
                    "accuracy_matrix": history.matrix().to_dict(),
                }
            )
        )
        return 0
    header = f"{'#':>3}  {'method':<11}{'target':<16}{'acc':>7}{'TI':>8}{'CC':>8}{'delta KB':>10}{'s':>7}  classes"
    print(header)
    for row in rows:
        print(
            f"{row['session']:>3}  {row['method']:<11}{row['target'][:15]:<16}{row['target_acc']:>7.1f}"
            f"{row['ti']:>+8.1f}{row['cc']:>+8.1f}{row['delta_kb']:>10.1f}{row['seconds']:>7.1f}  {row['classes']}"
        )
    return 0


def add_clip_argument(parser) -> None:
    """`--clip` for every command that takes `--model`."""
    parser.add_argument(
        "--clip",
        default=None,
        help="CLIP checkpoint (local folder or hub id) whose vision encoder the LLaVA uses; "
        "needed with a LLaVA folder as --model (default: $LORSU_CLIP)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lorsu_demo", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser(
        "train", help="run few-shot continual-learning sessions on a domain"
    )
    train.add_argument(
        "--model", default=OFFLINE_PRESET, help="preset, bundle folder or LLaVA folder"
    )
    add_clip_argument(train)
    train.add_argument("--data", required=True, help="DIR/<class>/*.png, or DIR/train + DIR/test")
    train.add_argument("--control", action="append", help="control set folder (repeatable)")
    train.add_argument("--method", default="lorsu", choices=list(METHODS))
    train.add_argument("--shots", type=int, default=5)
    train.add_argument("--sessions", type=int, default=1)
    train.add_argument("--epochs", type=int)
    train.add_argument("--lr", type=float)
    train.add_argument("--batch-size", type=int)
    train.add_argument("--heads", type=int, help="k heads per layer (LoRSU)")
    train.add_argument("--rank", type=int)
    train.add_argument("--alpha", type=float)
    train.add_argument("--sparsity", type=float, help="fraction of fc1 entries trained")
    train.add_argument(
        "--template",
        action="append",
        help="caption template containing {label} (repeatable; default: DIR/templates.txt, "
        'else "a photo of a {label}.")',
    )
    train.add_argument(
        "--multi-positive", action="store_true", help="same-class pairs are positives"
    )
    train.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="any other method setting"
    )
    train.add_argument("--seed", type=int, default=0)
    train.add_argument(
        "--model-seed", type=int, help="seed of tiny-random's random weights (default: --seed)"
    )
    train.add_argument(
        "--start-from", metavar="HISTORY", help="a history file to continue (its sessions stay)"
    )
    train.add_argument(
        "--memory",
        choices=["bf16", "4bit"],
        help="4bit: quantize the LLM for 16-24 GB GPUs (bitsandbytes; default LORSU_MEMORY or bf16)",
    )
    train.add_argument("--device", default=None)
    train.add_argument("--out", required=True, help="run folder (history file and run.json)")
    train.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    train.add_argument("--verbose", action="store_true", help="print every step")
    train.add_argument(
        "--eval",
        default="clip",
        choices=["clip", "mc", "open"],
        help="accuracy reader for TI/CC: CLIP zero-shot, or the VLM's answers (multiple choice, open)",
    )
    train.set_defaults(func=cmd_train)

    export = commands.add_parser("export", help="write the VLM as it was after a session")
    export.add_argument("--run", required=True)
    export.add_argument("--session", type=int, required=True, help="0 is the base model")
    export.add_argument("--out", required=True)
    export.add_argument("--model", help="load the base model from here instead")
    add_clip_argument(export)
    export.set_defaults(func=cmd_export)

    sessions = commands.add_parser("sessions", help="a table of a run's sessions")
    sessions.add_argument("--run", required=True)
    sessions.add_argument("--json", action="store_true")
    sessions.set_defaults(func=cmd_sessions)

    for extend in EXTENSIONS:
        extend(commands)
    return parser


# Subcommands contributed by other modules (the app, the benchmarks): callables taking the
# subparsers object.
EXTENSIONS: list = []


def quiet_libraries() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    args.set_keys = [
        s.partition("=")[0].replace("-", "_") for s in getattr(args, "set", None) or []
    ]
    try:
        return args.func(args)
    except USER_ERRORS as err:
        say(f"error: {err}")
        return 2
    except KeyboardInterrupt:
        say("stopped: the sessions completed before the interruption are saved")
        return 130


def add_bench_commands(commands) -> None:
    """`bench flops|session|history|classroom`, imported only when the parser is built: the
    benchmarks (the meta-device architectures, the FLOP counter) are not loaded with the app."""
    from .bench import add_commands

    add_commands(commands)


EXTENSIONS.append(add_bench_commands)
from . import compare  # noqa: E402,F401  (adds `compare`)
from .ui import cli as _app_command  # noqa: E402,F401  (registers `python -m lorsu_demo app`)
