"""The Compare tab and the /compare and /keep endpoints (Gradio).

`build_tab(core)` lays the tab out (call it inside a `gr.Tab`), `wire(...)` connects it once
the rest of the page exists, `add_api(core)` adds the public endpoints. The actions are in
`compare_core` (no Gradio).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import gradio as gr

from ..compare import DEFAULT_METHODS, MethodResult
from ..events import Step
from ..methods import METHODS
from . import figures
from .common import LIGHT, PRIVATE
from .compare_core import compare, keep
from .core import UserError

STATUS_EVERY = 0.3  # seconds between status-only updates

INTRO = """Run several methods on **the same images, shots and seed**, each starting from your
current sessions, one after another, and see the paper's picture: full fine-tuning learns most
and forgets most, LoRA and SPU forget little and learn less, LoRSU learns while forgetting
little. **Your sessions stay as they are**: keep one method's session if you like it."""

HEADERS = ["Method", "TI", "CC", "TI (chat MC)", "CC (chat MC)", "Trainable", "Change (KB)", "s"]


@dataclass
class CompareTab:
    data: gr.Dropdown
    methods: gr.CheckboxGroup
    shots: gr.Slider
    epochs: gr.Number
    seed: gr.Number
    also: gr.Checkbox
    run: gr.Button
    stop: gr.Button
    figure: gr.Plot
    table: gr.Dataframe
    command: gr.Code
    keep_choice: gr.Dropdown
    keep: gr.Button


def build_tab(core) -> CompareTab:
    gr.Markdown(INTRO)
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=320):
            data = gr.Dropdown(
                choices=[("The data picked in step 1", "")]
                + core.example_choices()
                + [("Your latest upload", "uploaded")],
                value="",
                label="Data",
                elem_id="lorsu-compare-data",
            )
            methods = gr.CheckboxGroup(
                choices=list(METHODS),
                value=[m for m in DEFAULT_METHODS if m in METHODS],
                label="Methods (one after another)",
                elem_id="lorsu-compare-methods",
            )
            with gr.Row():
                shots = gr.Slider(1, 50, value=5, step=1, label="Shots (images per class)")
                epochs = gr.Number(
                    value=None, precision=0, label="Epochs", info="blank: each method's own"
                )
                seed = gr.Number(
                    value=None,
                    precision=0,
                    label="Seed",
                    info="blank: the next session's number",
                    elem_id="lorsu-compare-seed",
                )
            also = gr.Checkbox(
                value=True,
                label="Also read TI and CC with the chat model's multiple choice (slower)",
            )
            with gr.Row():
                run = gr.Button("Compare", variant="primary", elem_id="lorsu-compare-run", scale=2)
                stop = gr.Button("Stop", variant="stop", interactive=False)
        with gr.Column(scale=3, min_width=420):
            figure = gr.Plot(
                figures.compare_figure([]),
                format="png",
                show_label=False,
                elem_id="lorsu-compare-figure",
            )
            table = gr.Dataframe(
                headers=HEADERS,
                value=None,
                interactive=False,
                label="Methods compared",
                elem_id="lorsu-compare-table",
            )
            with gr.Row():
                keep_choice = gr.Dropdown(choices=[], value=None, label="Keep this one", scale=2)
                keep_btn = gr.Button("Keep it as my next session", scale=1)
            command = gr.Code(
                value="",
                language="shell",
                label="The chosen method's session on the command line (Copy as CLI)",
                interactive=False,
                lines=2,
                elem_id="lorsu-compare-command",
            )
    return CompareTab(
        data, methods, shots, epochs, seed, also, run, stop, figure, table, command,
        keep_choice, keep_btn,
    )  # fmt: skip


def table_rows(results: list[dict]) -> list[list]:
    rows = []
    for row in results:
        rows.append(
            [
                row["method"],
                _signed(row.get("ti")),
                _signed(row.get("cc")),
                _signed(row.get("ti_mc")) if row.get("reader") != "mc" else "(same)",
                _signed(row.get("cc_mc")) if row.get("reader") != "mc" else "(same)",
                f"{row['trainable_params']:,}",
                round(row["delta_bytes"] / 1024, 1),
                round(row["seconds"], 1),
            ]
        )
    return rows


def _signed(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{value:+.1f}"


def wire(tab: CompareTab, core, status, session_outputs, views, lane: dict) -> None:
    """Connect the tab. `session_outputs` and `views.sessions(key)` refresh the Sessions tab
    after a kept session; `lane` is the app's GPU queue lane (the comparison waits in it)."""

    def key_of(request):
        return getattr(request, "session_hash", None) if request is not None else None

    def on_arm(request: gr.Request):
        core.arm(key_of(request))
        return (
            figures.status_html("Waiting for the model: it runs one job at a time…", "busy"),
            gr.update(interactive=False),
            gr.update(interactive=True),
        )

    def on_compare(data, methods, shots, epochs, seed, also, request: gr.Request):
        key = key_of(request)
        said = 0.0
        for event, view in compare(
            core, key, data or None, methods or [], shots, epochs, None, seed, None,
            "mc" if also else None,
        ):  # fmt: skip
            done = view.finished
            now = time.monotonic()
            if isinstance(event, Step) and not done and now - said < STATUS_EVERY:
                continue
            said = now
            result = isinstance(event, MethodResult) or done
            choices = [r["method"] for r in view.results] if done and view.tone == "done" else []
            yield (
                figures.status_html(view.status, view.tone),
                figures.compare_figure(view.results) if result else gr.skip(),
                table_rows(view.results) if result else gr.skip(),
                gr.update(choices=choices, value=choices[0] if choices else None)
                if done
                else gr.skip(),
                gr.update(interactive=done),
                gr.update(interactive=not done),
            )

    tab.run.click(on_arm, None, [status, tab.run, tab.stop], queue=False, **PRIVATE).then(
        on_compare,
        [tab.data, tab.methods, tab.shots, tab.epochs, tab.seed, tab.also],
        [status, tab.figure, tab.table, tab.keep_choice, tab.run, tab.stop],
        show_progress="full",
        show_progress_on=[status],
        **lane,
        **PRIVATE,
    ).then(
        lambda: (gr.update(interactive=True), gr.update(interactive=False)),
        None,
        [tab.run, tab.stop],
        queue=False,
        **PRIVATE,
    )

    def on_stop(request: gr.Request):
        return figures.status_html(core.stop(key_of(request)), "stopped")

    tab.stop.click(on_stop, None, [status], queue=False, **PRIVATE)

    def on_choice(method, request: gr.Request):
        ws = core.workspace(key_of(request))
        record = ws.compared.get("records", {}).get(method)
        return record.extra.get("command", "") if record is not None else ""

    tab.keep_choice.change(on_choice, [tab.keep_choice], [tab.command], **PRIVATE, **LIGHT)

    def on_keep(method, request: gr.Request):
        key = key_of(request)
        try:
            message, tone = keep(core, key, method), "done"
        except UserError as err:
            return (figures.status_html(str(err), "error"), gr.skip(),
                    *[gr.skip()] * len(session_outputs))  # fmt: skip
        return (
            figures.status_html(message, tone),
            gr.update(choices=[], value=None),
            *views.sessions(key),
        )

    tab.keep.click(
        on_keep, [tab.keep_choice], [status, tab.keep_choice, *session_outputs], **PRIVATE,
        **LIGHT,
    )  # fmt: skip


def add_api(core, lane: dict) -> None:
    """/compare (streams events; the last one holds {"results": [...]}) and /keep."""

    def fail(message: str):
        raise gr.Error(message, print_exception=False)

    with gr.Column(visible=False):
        data = gr.Textbox(label="data")
        methods = gr.Textbox(value=",".join(DEFAULT_METHODS), label="methods")
        shots = gr.Number(value=5, precision=0, label="shots")
        epochs = gr.Number(value=None, precision=0, label="epochs")
        settings = gr.JSON(value=None, label="settings")
        seed = gr.Number(value=None, precision=0, label="seed")
        also = gr.Textbox(value="mc", label="also")
        event_out = gr.JSON(label="event")
        method = gr.Textbox(label="method")
        result = gr.JSON(label="result")
        compare_b, keep_b = gr.Button(visible=False), gr.Button(visible=False)

    def api_compare(data_name, method_names, shot_count, epoch_count, extra, seed_value,
                    also_reader, request: gr.Request):  # fmt: skip
        """Train one session per method (comma-separated; default lorsu,lora,spu,full) from
        this client's history, on the same images, shots and seed; the history is not
        changed. Streams events as JSON (method, phase, step, metrics, result); the last is
        {"kind": "compared", "results": [{"method", "ti", "cc", "ti_mc", "cc_mc",
        "trainable_params", "delta_bytes", "seconds", ...}]}. `also`: "mc" (default) also
        reads TI and CC with the chat model's multiple choice; "" skips it."""
        key = getattr(request, "session_hash", None)
        core.arm(key)
        if extra is not None and not isinstance(extra, dict):
            fail('settings must be a JSON object, e.g. {"lr": 0.001}.')
        for event, _view in compare(
            core, key, data_name or None, method_names, shot_count, epoch_count, extra or {},
            seed_value, None, also_reader or None,
        ):  # fmt: skip
            if isinstance(event, dict):
                fail(event["message"])
            yield event.to_dict()

    def api_keep(method_name, request: gr.Request):
        """Append the last comparison's session of `method` to this client's history (only
        while the history is the one it started from); returns /sessions."""
        key = getattr(request, "session_hash", None)
        try:
            message = keep(core, key, method_name)
        except UserError as err:
            fail(str(err))
        return {"message": message, **core.sessions(key)}

    compare_b.click(
        api_compare, [data, methods, shots, epochs, settings, seed, also], event_out,
        api_name="compare", **lane,
    )  # fmt: skip
    keep_b.click(api_keep, [method], result, api_name="keep", **LIGHT)
