"""What the tab modules share: queue lanes, the workspace key of a request, status lines and
`Views` (core state turned into component values)."""

from __future__ import annotations

import logging

import gradio as gr

from ..takeaway import trained_cells
from . import engine, figures, text
from .core import AppCore, UserError
from .engine import PROBE_QUESTION

log = logging.getLogger("lorsu_demo.ui")

# Model work shares one queue lane. Its width follows the platform (`engine.lane_width`, set
# by `build_app` once the model is loaded): one call at a time on one shared model (a dedicated
# GPU, a large model); one per copy of a small CPU model; on ZeroGPU every call runs in its own
# forked worker on its own GPU slice, so several run side by side (LORSU_GPU_LANES, default 4).
GPU = {"concurrency_id": "gpu", "concurrency_limit": engine.zerogpu.lane_width()}
LIGHT = {"concurrency_limit": 8}
PRIVATE = {"api_visibility": "private"}


def key_of(request: gr.Request | None) -> str | None:
    return getattr(request, "session_hash", None) if request is not None else None


def explain(err: Exception) -> str:
    """A user's mistake as its message; anything else as a short note (the log has the rest)."""
    if isinstance(err, UserError):
        return str(err)
    log.exception("unexpected error in a handler")
    return f"Something went wrong ({type(err).__name__}): nothing was changed. Try again."


def status_line(message: str, tone: str = "info") -> str:
    return figures.status_html(message, tone)


class Views:
    """Turns core state into component values."""

    def __init__(self, core: AppCore):
        self.core = core
        info = core.info  # the page can be built before the model is loaded
        self.shape = (info.num_layers, info.num_heads, info.layers_read_by_vlm)
        self.has_control = bool(core.controls)

    def metrics(self, live=None) -> str:
        if live is None:
            return figures.metrics_html(
                None, None, note="Train a session to see TI and CC.", control=self.has_control
            )
        note = f"Measured with the {engine.READER_NAMES.get(live.reader, live.reader)}."
        for reader, reading in live.readings.items():
            if reader != live.reader and reading.get("ti") is not None:
                cc = reading.get("cc")
                note += (
                    f" The {engine.READER_NAMES.get(reader, reader)}: TI {reading['ti']:+.1f}"
                    + (f", CC {cc:+.1f}." if cc is not None else ".")
                )
        return figures.metrics_html(
            live.ti,
            live.cc,
            live.target_now,
            live.base_target,
            live.control_now,
            live.base_control,
            note=note,
            control=self.has_control,
        )

    def cleared(self, reason: str) -> tuple:
        """(TI/CC cards, curves, heatmap) emptied, the cards saying why: what they showed is
        no longer the model you have (a stop, a roll back, other data)."""
        cards = figures.metrics_html(None, None, note=reason, control=self.has_control)
        return cards, self.curves(), self.scores()

    def curves(self, live=None):
        if live is None:
            return figures.curves_figure([], [], None)
        return figures.curves_figure(
            live.losses,
            live.accuracy,
            live.total,
            live.base_target,
            live.base_control,
            epochs=live.epochs,
        )

    def scores(self, live=None):
        layers, heads, read = self.shape
        scores = live.scores if live is not None else None
        if scores is None:
            return figures.empty_scores_figure(layers, heads, read)
        return figures.scores_figure(
            scores.head_scores,
            scores.selected_heads,
            scores.fc1_density,
            scores.layers_read,
            layers,
            heads,
            live.method,
        )

    def probes(self, probes, answers=None) -> str:
        return figures.probes_html(probes, answers or {}, PROBE_QUESTION)

    def sessions(self, key):
        """(table, matrix figure, summary, chat version, rollback choice, export choice,
        download button)."""
        core = self.core
        rows = core.table_rows(key)
        info = core.sessions(key)
        matrix = core.workspace(key).history.matrix()
        boxes = trained_cells(core.workspace(key).history)  # every session's trained set
        figure = figures.matrix_figure(matrix, boxes) if rows or info["base"] else None
        summary = ""
        if rows:
            m = info["accuracy_matrix"]
            parts = [
                f"**{name}** {m[k]:.1f}"
                for name, k in (
                    ("Avg", "avg"),
                    ("Last", "last"),
                    ("Transfer", "transfer"),
                    ("BWT", "bwt"),
                )
                if isinstance(m.get(k), float) and m[k] == m[k]
            ]
            summary = " · ".join(parts) + ("  \n" if parts else "") + text.MATRIX_FIGURES
        choices = core.version_choices(key)
        latest = choices[-1][1]
        download = gr.update(value=None, interactive=False)
        if rows:
            download = gr.update(value=str(core.export_history(key)), interactive=True)
        return (
            rows,
            figure,
            summary,
            gr.update(choices=choices, value=latest),
            gr.update(choices=choices, value=max(0, latest - 1)),
            gr.update(choices=choices, value=latest),
            download,
        )
