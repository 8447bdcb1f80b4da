"""A run: a domain's classes split into sessions, trained one after the other on one history.

The command line and the benchmarks use this; the app drives `run_session` directly.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .data import (
    DataError,
    Domain,
    LabelledImages,
    check_template,
    load_domain,
    load_folder,
    plan_sessions,
)
from .evaluate import EvalSet
from .events import Done, Stopped
from .history import History
from .methods import make_method, preset_defaults
from .session import run_session

HISTORY_FILE = "history.lorsu"


def load_control(directory: str | Path) -> LabelledImages:
    directory = Path(directory)
    test = directory / "test"
    return load_folder(test if test.is_dir() else directory, f"control:{directory.name}")


def control_sets(bundle, directories: list[str] | None) -> list[EvalSet]:
    """The --control folders, or the model preset's default control set."""
    if not directories and bundle.control_dir is not None and Path(bundle.control_dir).is_dir():
        directories = [str(bundle.control_dir)]
    sets = []
    for directory in directories or []:
        images = load_control(directory)
        sets.append(EvalSet(images.name, images, images.classes, role="control"))
    return sets


def check_labels(bundle, classes: list[str]) -> None:
    """Refuse class names the model cannot spell: with a word-level text side (the offline toy)
    an unknown word becomes one shared unknown token, and the session would train to nothing."""
    unknown = bundle.unknown_words(classes)
    if not unknown:
        return
    words = ", ".join(repr(w) for w in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
    known = f" It knows these class names: {', '.join(bundle.labels)}." if bundle.labels else ""
    suggestions = [(w, known_word_for(w, bundle.labels)) for w in unknown]
    suggestions = [f"{w!r} -> {s!r}" for w, s in suggestions if s][:5]
    hint = f" Perhaps: {', '.join(suggestions)}." if suggestions else ""
    raise DataError(
        f"The model {bundle.name!r} does not know the word{'s' if len(unknown) > 1 else ''} "
        f"{words}: its small text side only has the words it was trained with.{known}{hint} "
        "Name your classes with those words, or run a model whose tokenizer takes any label (a "
        "GPU model, for example --model llava-1.5-7b)."
    )


NUMERALS = "zero one two three four five six seven eight nine".split()


def known_word_for(word: str, labels: list[str]) -> str | None:
    """The known class name a user most likely meant: digit folders ("8", as MNIST-style sets
    name them) for the digit's word, plurals and typos for the closest name."""
    word = word.lower()
    if word.isdecimal() and len(word) == 1 and NUMERALS[int(word)] in labels:
        return NUMERALS[int(word)]
    close = difflib.get_close_matches(word, labels, n=1, cutoff=0.75)
    return close[0] if close else None


@dataclass
class RunPlan:
    domain: Domain
    target: EvalSet
    controls: list[EvalSet]
    sessions: list = field(default_factory=list)  # SessionPlan
    session_sets: list[EvalSet] = field(default_factory=list)


def plan_run(
    bundle,
    data: str | Path,
    controls: list[str] | None,
    sessions: int,
    shots: int,
    seed: int,
    templates: list[str] | None = None,
) -> RunPlan:
    domain = load_domain(data, seed=seed)
    check_labels(bundle, domain.classes)
    plans = plan_sessions(domain, sessions, shots, seed)
    templates = [check_template(t) for t in templates] if templates else domain.templates
    target = EvalSet(domain.name, domain.test, domain.classes, templates, role="target")
    session_sets = []
    if len(plans) > 1:
        for plan in plans:
            images = domain.test.subset(plan.classes, f"{domain.name}:s{plan.index}")
            if not images.items:
                raise DataError(
                    f"{domain.name}'s test set has no images of {', '.join(plan.classes)}."
                )
            session_sets.append(
                EvalSet(images.name, images, domain.classes, templates, role="session")
            )
    return RunPlan(domain, target, control_sets(bundle, controls), plans, session_sets)


def run_seed(seed: int, index: int) -> int:
    """The training seed of session `index` of a run seeded `seed` (every session its own)."""
    return seed * 1000 + index


def one_session(domain: Domain, shots: int, seed: int) -> LabelledImages:
    """The images of a one-session run (`train --sessions 1`): the app draws a session's
    images this way too, so that `train` with the same seed repeats an app session exactly."""
    return plan_sessions(domain, 1, shots, seed)[0].train


def method_settings_for(bundle, method: str, overrides: dict) -> dict:
    """The preset's defaults (tuned to its encoder) where the method has no setting of its own
    (its authors'), then what the user set."""
    settings = preset_defaults(method, bundle.defaults)
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return settings


def run_sessions(
    bundle,
    history: History,
    plan: RunPlan,
    method: str,
    settings: dict,
    seed: int,
    save_to: Path | None = None,
    reader: str = "clip",
) -> Iterator:
    """Yield (session plan, event) for every event of every session; append records as they end."""
    for session in plan.sessions:
        trained = (
            [plan.session_sets[session.index - 1].name] if plan.session_sets else [plan.target.name]
        )
        events = run_session(
            bundle,
            history,
            make_method(method, **settings),
            session.train,
            target=plan.target,
            controls=plan.controls,
            extra_sets=plan.session_sets,
            trained_sets=trained,
            seed=run_seed(seed, session.index),
            shots=None,
            reader=reader,
        )
        for event in events:
            if isinstance(event, Done):
                history.append(event.record)
                if save_to is not None:
                    history.save(save_to / HISTORY_FILE)
            yield session, event
            if isinstance(event, Stopped):
                return


def run_summary(history: History, plan_target: str, controls: list[str]) -> dict:
    base_control = _mean([history.base[c] for c in controls])
    sessions = []
    for record in history.sessions:
        summary = record.summary()
        sessions.append(
            {
                "index": record.index,
                "method": record.method,
                "classes": record.classes,
                "target_acc": record.accuracies[plan_target],
                "control_acc": _mean([record.accuracies[c] for c in controls]),
                "ti": record.ti,
                "cc": record.cc,
                "selected_heads": record.selected_heads,
                "trainable_params": record.trainable_params,
                "delta_bytes": record.delta_bytes,
                "seconds": round(sum(record.seconds.values()), 3),
                "seconds_by_phase": {k: round(v, 3) for k, v in record.seconds.items()},
                "fc1_density": record.fc1_density,
                "paper_params": summary["extra"].get("paper_params"),
                # CC is over the control set(s); this is every other set measured.
                "others": summary["extra"].get("others"),
                "free_dims": summary["extra"].get("free_dims"),
            }
        )
    last = history.sessions[-1] if history.sessions else None
    return {
        "model": history.model,
        "base": {"target_acc": history.base.get(plan_target), "control_acc": base_control},
        "sessions": sessions,
        "final": {
            "ti": last.ti if last else 0.0,
            "cc": last.cc if last else 0.0,
            **_worst_other(last),
        },
        "accuracy_matrix": history.matrix().to_dict(),
    }


def _worst_other(record) -> dict:
    """The set other than the target and the controls that lost most since the base model."""
    others = record.extra.get("others") if record else None
    if not others or others.get("worst") is None:
        return {"worst_other": None, "worst_other_change": None}
    return {"worst_other": others["worst"], "worst_other_change": others["worst_change"]}


def _mean(values):
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else None
