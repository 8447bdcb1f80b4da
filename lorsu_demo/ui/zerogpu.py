"""Hugging Face ZeroGPU, the platform facts the app depends on (no Gradio import).

On ZeroGPU every `@spaces.GPU` call runs in its own forked worker on its own GPU slice: by
default half an RTX Pro 6000 Blackwell (48 GB), or the full 96 GB card with `size="xlarge"` at
twice the quota. A call asks for a `duration` up front; the platform refuses it when the
visitor's remaining daily quota is below that (an unauthenticated visitor gets 2 minutes a day)
and counts non-xlarge durations 1.5 times. Outside ZeroGPU none of this applies: `spaces` is a
no-op or absent, and the model lane runs one call per model copy (`engine.lane_width`).
"""

from __future__ import annotations

import math
import os
import re

# The platform's accounting (hub docs, spaces-zerogpu, 2026).
VISITOR_QUOTA_S = 120  # unauthenticated visitors, per day
QUOTA_FACTOR = {"large": 1.5, "xlarge": 2.0}  # how a requested second counts, by slice size
# The longest duration requested in one call: 80 s counts 120 s on the default slice, so an
# unauthenticated visitor's full quota can still pay for it (a larger request is refused).
MAX_DURATION_S = 80

# Seconds a call needs at LLaVA-1.5-7B scale on half an RTX Pro 6000, padded: probes (answers
# to a pool of 30 test images, to pick them) and the TI/CC evaluations (fixed), and one training step of batch 16 at 336 px (an H100 ran a
# 15-step session in 4.6 s, about 0.3 s a step; half a Blackwell is slower, so 1 s).
SESSION_FIXED_S = 24
SESSION_STEP_S = 1.0
CHAT_S = 20
MAX_CPU_LANES = 8  # copies of a small CPU model (a few MB each)
EXPORT_S = 60


def on_zerogpu() -> bool:
    """True in a ZeroGPU Space (the platform sets SPACES_ZERO_GPU; `spaces` reads it too)."""
    return os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "true", "yes")


def slice_size() -> str:
    """`large` (half a card, the default) or `xlarge` (the full card): LORSU_ZEROGPU_SIZE."""
    size = os.environ.get("LORSU_ZEROGPU_SIZE", "large").strip().lower()
    return size if size in QUOTA_FACTOR else "large"


def lane_width() -> int:
    """How many model-lane calls run at once on one shared model. On ZeroGPU each call gets
    its own forked worker and GPU slice and applies only its own user's deltas, so calls can
    run side by side (LORSU_GPU_LANES, default 4). Elsewhere the calls take turns on it; a
    small model on the CPU is copied instead, one copy per lane (`engine.lane_width`)."""
    if on_zerogpu():
        return _int_env("LORSU_GPU_LANES", 4)
    return 1


def cpu_lanes() -> int:
    """Copies of a small model on the CPU, so that a class's sessions run on several cores at
    once: LORSU_CPU_LANES, by default the cores this process may use (at most 8). A session
    runs on one thread either way (`model.limit_cpu_threads`), so a lone user loses nothing."""
    return _int_env("LORSU_CPU_LANES", min(usable_cores(), MAX_CPU_LANES))


def usable_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _int_env(name: str, default: int) -> int:
    try:
        return max(1, int(os.environ.get(name, str(default))))
    except ValueError:
        return default


def session_seconds(steps: int) -> int:
    """The duration a session of `steps` training steps asks ZeroGPU for."""
    return int(min(MAX_DURATION_S, math.ceil(SESSION_FIXED_S + SESSION_STEP_S * steps)))


def quota_seconds(duration: float, size: str | None = None) -> float:
    """How many seconds of a visitor's daily quota a call asking for `duration` needs free."""
    return duration * QUOTA_FACTOR[size or slice_size()]


def quota_note(steps: int) -> str:
    """One line for the page: what a session of `steps` steps costs of the visitor quota."""
    asked = session_seconds(steps)
    counted = quota_seconds(asked)
    chat = quota_seconds(CHAT_S)
    return (
        f"On ZeroGPU this session of {steps} steps reserves {asked} s of GPU time, which needs "
        f"{counted:.0f} s of your daily quota free ({100 * counted / VISITOR_QUOTA_S:.0f}% of "
        f"the {VISITOR_QUOTA_S // 60} minutes a visitor without a Hugging Face login gets; "
        f"only the seconds actually used are spent). A chat reserves {CHAT_S} s "
        f"({chat:.0f} s of quota)."
    )


_QUOTA = re.compile(r"quota", re.I)
_LEFT = re.compile(r"\((\d+)\s*s\s+left\s+vs\.?\s+(\d+)\s*s\s+requested\)", re.I)
_RETRY = re.compile(r"retry in\s+([0-9:]+)", re.I)
_ILLEGAL = re.compile(r"illegal duration|larger than the maximum allowed", re.I)


def _text(err: BaseException) -> str:
    parts = [str(err), str(getattr(err, "title", "") or ""), str(getattr(err, "message", ""))]
    return " ".join(p for p in parts if p)


def gpu_problem(err: BaseException) -> str | None:
    """A clear message for ZeroGPU's refusals ("ZeroGPU quota exceeded", "ZeroGPU illegal
    duration"), or None when `err` is something else."""
    text = _text(err)
    if _ILLEGAL.search(text):
        return (
            "ZeroGPU refused this call: it asked for more GPU time than one call may have. "
            "Use fewer shots or epochs, or a larger batch size, and train again."
        )
    if _QUOTA.search(text) and ("exceeded" in text.lower() or _LEFT.search(text)):
        left = _LEFT.search(text)
        retry = _RETRY.search(text)
        numbers = f" ({left.group(1)} s left, {left.group(2)} s needed)" if left else ""
        wait = f" in {retry.group(1)}" if retry else " later"
        return (
            f"Your free ZeroGPU time for today has run out{numbers}. Try again{wait}, log in "
            "to Hugging Face for more (free accounts get 5 minutes a day, PRO 40), or run the "
            "demo on your own machine: `python app.py` (CPU, the toy model). Nothing changed."
        )
    return None
