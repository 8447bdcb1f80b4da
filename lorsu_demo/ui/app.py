"""The Gradio app: teach, watch, chat, roll back.

`build_app(core)` lays out the page and wires every button to `AppCore` (see `core.py`); `main`
is `python app.py` and `python -m lorsu_demo app`. All model work shares one queue lane
(`concurrency_id="gpu"`: one at a time, several on ZeroGPU); per-browser state lives in `core.store`, keyed by
`request.session_hash` and dropped in `demo.unload`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import gradio as gr

from ..events import Done, Metrics, Phase, Scores, Step, Stopped
from ..methods import METHODS, method_settings
from ..model import OFFLINE_PRESET, BundleError, env_model
from ..takeaway import trained_cells
from ..vqa import DEFAULT_QUESTION, mc_prompt
from . import compare as compare_ui
from . import engine, figures, text
from . import takeaway as takeaway_ui
from .cli import add_arguments
from .core import TABLE_HEADERS, AppCore, UserError
from .engine import PROBE_QUESTION, ProbeAnswers
from .uploads import Card

log = logging.getLogger("lorsu_demo.ui")

# Model work shares one queue lane. Its width follows the platform: one call at a time where
# one model is shared (CPU, a dedicated GPU); on ZeroGPU every call runs in its own forked
# worker on its own GPU slice, so several run side by side (LORSU_GPU_LANES, default 4).
GPU = {"concurrency_id": "gpu", "concurrency_limit": engine.zerogpu.lane_width()}
LIGHT = {"concurrency_limit": 8}
PRIVATE = {"api_visibility": "private"}
CARDS = 8
PLOT_EVERY = 0.35  # seconds between re-drawn curves while training (at least)
STATUS_EVERY = 0.3  # seconds between status-only updates while training

CSS = """
.lorsu-metrics {display: flex; gap: 12px; flex-wrap: wrap;}
.lorsu-metric {flex: 1 1 220px; border-radius: 12px; padding: 10px 14px; border: 2px solid;}
.lorsu-metric-name {font-weight: 700; font-size: 15px; letter-spacing: .04em;}
.lorsu-metric-value {font-size: 46px; font-weight: 800; line-height: 1.05;}
.lorsu-metric-change {font-size: 14px; font-weight: 600; min-height: 1.2em;}
.lorsu-metric-help {font-size: 12.5px; opacity: .9; margin-top: 4px;}
.lorsu-metric.lorsu-good, .lorsu-metric.lorsu-good * {background: #ecfdf5; color: #065f46 !important;}
.lorsu-metric.lorsu-good {border-color: #10b981;}
.lorsu-metric.lorsu-bad, .lorsu-metric.lorsu-bad * {background: #fef2f2; color: #991b1b !important;}
.lorsu-metric.lorsu-bad {border-color: #ef4444;}
.lorsu-metric.lorsu-flat, .lorsu-metric.lorsu-flat * {background: #f9fafb; color: #374151 !important;}
.lorsu-metric.lorsu-flat {border-color: #9ca3af;}
.lorsu-metric.lorsu-none, .lorsu-metric.lorsu-none * {background: #f9fafb; color: #6b7280 !important;}
.lorsu-metric.lorsu-none {border-color: #e5e7eb;}
.lorsu-metric-note {font-size: 12.5px; color: #6b7280; margin-top: 6px;}
.lorsu-status {padding: 9px 14px; border-radius: 8px; font-weight: 600; font-size: 15px;}
.lorsu-status * {color: inherit !important;}
.lorsu-status-info {background: #eff6ff; color: #1e3a8a;}
.lorsu-status-busy {background: #fffbeb; color: #92400e;}
.lorsu-status-done {background: #ecfdf5; color: #065f46;}
.lorsu-status-stopped {background: #f3f4f6; color: #374151;}
.lorsu-status-error {background: #fef2f2; color: #991b1b;}
.lorsu-notice {background: #fff7ed; border: 1px solid #fdba74; border-radius: 8px;
  padding: 4px 12px;}
.lorsu-probes {background: white; border-radius: 8px; padding: 8px;}
.lorsu-probes table {width: 100%; border-collapse: collapse; font-size: 13.5px;}
.lorsu-probes td b, .lorsu-probes td i {color: #1f2937 !important;}
.lorsu-probes th, .lorsu-probes td {border-bottom: 1px solid #e5e7eb; padding: 4px 6px;
  text-align: left; vertical-align: middle; color: #1f2937 !important; background: white;}
.lorsu-probes img {width: 64px; height: 64px; image-rendering: pixelated; border-radius: 4px;}
.lorsu-probe-q, .lorsu-probe-q * {font-size: 13px; color: #4b5563 !important; margin-bottom: 4px;}
.lorsu-probes .lorsu-ok .lorsu-mark {color: #059669 !important; font-weight: 700;}
.lorsu-probes .lorsu-no .lorsu-mark {color: #dc2626 !important; font-weight: 700;}
.lorsu-wait {color: #9ca3af;}
.lorsu-small {font-size: 13px; color: #6b7280;}
"""


def _key(request: gr.Request | None) -> str | None:
    return getattr(request, "session_hash", None) if request is not None else None


def _explain(err: Exception) -> str:
    """A user's mistake as its message; anything else as a short note (the log has the rest)."""
    if isinstance(err, UserError):
        return str(err)
    log.exception("unexpected error in a handler")
    return f"Something went wrong ({type(err).__name__}): nothing was changed. Try again."


def _status(message: str, tone: str = "info") -> str:
    return figures.status_html(message, tone)


class Views:
    """Turns core state into component values."""

    def __init__(self, core: AppCore):
        self.core = core
        bundle = core.bundle
        self.shape = (bundle.num_layers, bundle.num_heads, bundle.layers_read_by_vlm)
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


def build_app(core: AppCore) -> gr.Blocks:
    views = Views(core)
    bundle = core.bundle
    knob_names = _knob_names()
    defaults = engine.settings_for(bundle, "lorsu")

    with gr.Blocks(title="LoRSU demo", analytics_enabled=False) as demo:
        gr.Markdown(f"# {text.TITLE}")
        gr.Markdown(text.INTRO)
        if core.notice:
            gr.Markdown(f"⚠️ {core.notice}", elem_classes="lorsu-notice", elem_id="lorsu-notice")
        gr.Markdown(
            engine.describe_model(bundle)
            + " You share this model with everyone on this page; your sessions are yours alone.",
            elem_classes="lorsu-small",
        )
        status = gr.HTML(
            _status("Ready: pick example data or upload images (step 1), then press Train."),
            elem_id="lorsu-status",
        )

        with gr.Tabs(elem_id="lorsu-tabs"):
            # ---------------------------------------------------------------- teach & train
            with gr.Tab("1 · Teach & watch", id="train"):
                with gr.Row(equal_height=False):
                    with gr.Column(scale=2, min_width=340):
                        gr.Markdown("### 1 · Pick images")
                        with gr.Tabs():
                            with gr.Tab("Examples", id="examples"):
                                example = gr.Radio(
                                    choices=core.example_choices(),
                                    value=None,
                                    label="Example data",
                                    elem_id="lorsu-examples",
                                )
                                if not core.example_choices():
                                    gr.Markdown(
                                        "No example data is installed (`assets/domains/`): "
                                        "upload your own images in the next tabs."
                                    )
                                gr.Markdown(text.PICK, elem_classes="lorsu-small")
                            with gr.Tab("Class cards", id="cards"):
                                gr.Markdown(text.UPLOAD_CARDS, elem_classes="lorsu-small")
                                names, galleries, boxes = [], [], []
                                for i in range(CARDS):
                                    with gr.Group(visible=i < 2) as box:
                                        names.append(
                                            gr.Textbox(
                                                label=f"Class {i + 1}",
                                                placeholder=(
                                                    "class name, e.g. "
                                                    + (core.bundle.labels or ["cat"])[-1]
                                                ),
                                                max_length=60,
                                            )
                                        )
                                        galleries.append(
                                            gr.Gallery(
                                                label=f"Images of class {i + 1}",
                                                type="filepath",
                                                interactive=True,
                                                file_types=["image"],
                                                columns=5,
                                                height=150,
                                                show_label=False,
                                            )
                                        )
                                    boxes.append(box)
                                shown = gr.State(2)
                                with gr.Row():
                                    add_card = gr.Button("+ Add a class", size="sm")
                                    use_cards = gr.Button("Use these images", variant="primary")
                            with gr.Tab("Zip or named files", id="files"):
                                gr.Markdown(text.UPLOAD_ZIP, elem_classes="lorsu-small")
                                zip_file = gr.File(
                                    label="Zip of class folders", file_types=[".zip"]
                                )
                                gr.Markdown(text.UPLOAD_FILES, elem_classes="lorsu-small")
                                named_files = gr.File(
                                    label="Images named class_xxx.png",
                                    file_count="multiple",
                                    file_types=["image"],
                                )
                                use_files = gr.Button("Use these images", variant="primary")
                        data_info = gr.Markdown("*No data picked yet.*", elem_id="lorsu-data")
                        data_table = gr.Dataframe(
                            headers=["class", "training images", "test images"],
                            value=None,
                            interactive=False,
                            max_height=220,
                            label="Images per class",
                            visible=False,
                        )
                        data_gallery = gr.Gallery(
                            label="One training image per class",
                            columns=8,
                            height=150,
                            visible=False,
                            allow_preview=False,
                        )

                        gr.Markdown("### 2 · Train a session")
                        method = gr.Dropdown(
                            choices=list(METHODS),
                            value="lorsu",
                            label="Method",
                            elem_id="lorsu-method",
                        )
                        method_help = gr.Markdown(_method_help("lorsu"), elem_classes="lorsu-small")
                        with gr.Row():
                            shots = gr.Slider(
                                1, 50, value=5, step=1, label="Shots (images per class)"
                            )
                            epochs = gr.Slider(
                                1, 30, value=int(defaults.get("epochs", 5)), step=1, label="Epochs"
                            )
                            seed = gr.Number(
                                value=None,
                                precision=0,
                                label="Seed",
                                info="blank: the session's number",
                                elem_id="lorsu-seed",
                            )
                        gr.Markdown(text.SETTINGS, elem_classes="lorsu-small")
                        with gr.Accordion("Advanced settings", open=False):
                            knobs = [_knob(name, "lorsu", bundle) for name in knob_names]
                            reader = gr.Radio(
                                choices=READER_CHOICES,
                                value=engine.default_reader(),
                                label="Measure TI and CC with",
                                info=text.READER,
                                elem_id="lorsu-reader",
                            )
                            also = gr.Checkbox(
                                value=True,
                                label="Also read TI and CC with the chat model's multiple choice "
                                "after the session (slower)",
                                elem_id="lorsu-also",
                            )
                        with gr.Row():
                            train_btn = gr.Button(
                                "Train", variant="primary", elem_id="lorsu-train", scale=2
                            )
                            stop_btn = gr.Button(
                                "Stop", variant="stop", interactive=False, elem_id="lorsu-stop"
                            )

                    with gr.Column(scale=3, min_width=420):
                        gr.Markdown("### 3 · Watch it learn")
                        metrics = gr.HTML(views.metrics(), elem_id="lorsu-metrics")
                        readings = takeaway_ui.build_readings()
                        gr.Markdown(text.LIVE, elem_classes="lorsu-small")
                        curves = gr.Plot(
                            views.curves(), format="png", show_label=False, elem_id="lorsu-curves"
                        )
                        gr.Markdown(text.HEATMAP, elem_classes="lorsu-small")
                        scores = gr.Plot(
                            views.scores(), format="png", show_label=False, elem_id="lorsu-heatmap"
                        )
                        gr.Markdown(text.PROBES, elem_classes="lorsu-small")
                        probes = gr.HTML(views.probes([]), elem_id="lorsu-probes")
                        extras = takeaway_ui.build_session_extras(readings)

            # ------------------------------------------------------------------------ chat
            with gr.Tab("2 · Chat", id="chat"):
                gr.Markdown(text.CHAT)
                with gr.Row():
                    with gr.Column(scale=1):
                        # A plain file, opened by the app itself: gr.Image would decode it with
                        # PIL first, so bad files got Gradio's generic error, huge ones decoded.
                        # No file_types either: Gradio's own refusal would be another message.
                        chat_image = gr.File(label="Image file", elem_id="lorsu-chat-file")
                        chat_preview = gr.Image(
                            label="Image", height=260, interactive=False, elem_id="lorsu-chat-image"
                        )
                        question = gr.Textbox(
                            value=PROBE_QUESTION,
                            label="Question",
                            lines=1,
                            max_lines=8,
                            elem_id="lorsu-question",
                        )
                        version = gr.Dropdown(
                            choices=[("0 · base model (no sessions)", 0)],
                            value=0,
                            label="Version to talk to",
                            elem_id="lorsu-version",
                        )
                        with_base = gr.Checkbox(
                            value=True, label="Also ask the untouched base model"
                        )
                        ask_btn = gr.Button("Ask", variant="primary", elem_id="lorsu-ask")
                    with gr.Column(scale=1):
                        adapted_out = gr.Textbox(
                            label="Adapted model (your sessions)",
                            lines=3,
                            interactive=False,
                            elem_id="lorsu-answer",
                        )
                        base_out = gr.Textbox(
                            label="Base model (no sessions)",
                            lines=3,
                            interactive=False,
                            elem_id="lorsu-base-answer",
                        )
                        gr.Markdown(
                            "Answers are greedy (always the most likely word), so the same "
                            "question to the same version always gets the same answer.",
                            elem_classes="lorsu-small",
                        )
                chat_examples = _chat_examples(core)
                if chat_examples:
                    gr.Examples(
                        examples=chat_examples,
                        inputs=[chat_image],
                        label="Example images: click one, then Ask",
                        examples_per_page=12,
                        elem_id="lorsu-chat-examples",
                    )
                gr.Examples(
                    examples=[[q] for q in QUESTION_EXAMPLES],
                    inputs=[question],
                    label="Example questions (the multiple-choice one is how TI and CC are "
                    "read with the chat model)",
                    elem_id="lorsu-question-examples",
                )

            # -------------------------------------------------------------------- sessions
            with gr.Tab("3 · Sessions", id="sessions"):
                gr.Markdown(text.SESSIONS)
                table = gr.Dataframe(
                    headers=TABLE_HEADERS,
                    value=None,
                    interactive=False,
                    label="Your sessions",
                    elem_id="lorsu-table",
                )
                matrix = gr.Plot(format="png", show_label=False, elem_id="lorsu-matrix")
                matrix_summary = gr.Markdown(elem_classes="lorsu-small")
                with gr.Row():
                    rollback_to = gr.Dropdown(
                        choices=[("0 · base model (no sessions)", 0)],
                        value=0,
                        label="Roll back to",
                        elem_id="lorsu-rollback-to",
                        scale=2,
                    )
                    rollback_btn = gr.Button("Roll back…", elem_id="lorsu-rollback", scale=1)
                with gr.Group(visible=False, elem_id="lorsu-confirm") as confirm_box:
                    confirm_text = gr.Markdown()
                    with gr.Row():
                        confirm_yes = gr.Button(
                            "Yes, roll back", variant="stop", elem_id="lorsu-confirm-yes"
                        )
                        confirm_no = gr.Button("Cancel", elem_id="lorsu-confirm-no")
                gr.Markdown("#### Keep your work")
                with gr.Row():
                    download_history = gr.DownloadButton(
                        "Download history file",
                        value=None,
                        interactive=False,
                        elem_id="lorsu-download",
                    )
                    upload_history = gr.UploadButton(
                        "Upload a history file", elem_id="lorsu-upload-history"
                    )
                tables = takeaway_ui.build_downloads()
                with gr.Row():
                    export_version = gr.Dropdown(
                        choices=[("0 · base model (no sessions)", 0)],
                        value=0,
                        label="Adapted model to download",
                        scale=2,
                    )
                    export_btn = gr.Button("Prepare the model (.zip)", scale=1)
                export_file = gr.File(label="Adapted model", interactive=False, visible=False)
                gr.Markdown(
                    "The zip holds a model folder: `LlavaForConditionalGeneration.from_pretrained` "
                    "loads it, and so does `python app.py --model FOLDER`. It is what "
                    "`python -m lorsu_demo export` writes from a downloaded history file.",
                    elem_classes="lorsu-small",
                )

            with gr.Tab("4 · Compare", id="compare"):
                compare_tab = compare_ui.build_tab(core)

            with gr.Tab("How it works", id="how"):
                gr.Markdown(text.HOW)

        # ------------------------------------------------------------------ handlers (UI)
        session_outputs = [
            table,
            matrix,
            matrix_summary,
            version,
            rollback_to,
            export_version,
            download_history,
        ]

        def show_data(data):
            counts = data.domain.train.counts()
            rows = [[c, n, data.domain.test.counts().get(c, 0)] for c, n in counts.items()]
            sample = []
            for label in data.domain.train.classes[:24]:
                item = next(i for i in data.domain.train.items if i.label == label)
                sample.append((item.image, label))
            most = max(1, data.max_shots())
            description = f"  \n{data.description}" if data.description else ""
            info = (
                f"**Training on: {data.title}** (`{data.name}`): {len(data.classes)} classes, "
                f"{len(data.domain.train)} training and {len(data.domain.test)} test images."
                f"{description}"
            )
            return (
                _status(f"Data ready: {data.title}. Press Train (step 2).", "info"),
                info,
                gr.update(value=rows, visible=True),
                gr.update(value=sample, visible=True),
                gr.update(maximum=most, value=min(5, most)),
                views.probes(data.probes()),
            )

        data_outputs = [status, data_info, data_table, data_gallery, shots, probes]

        def on_example(name, request: gr.Request):
            if not name:
                return [gr.skip()] * len(data_outputs)
            try:
                return show_data(core.select(_key(request), name))
            except Exception as err:  # shown as a message; logged
                return [_status(_explain(err), "error")] + [gr.skip()] * (len(data_outputs) - 1)

        example.change(on_example, [example], data_outputs, **PRIVATE, **LIGHT)

        def on_add_card(count):
            count = min(CARDS, count + 1)
            return [count] + [gr.update(visible=i < count) for i in range(CARDS)]

        add_card.click(on_add_card, [shown], [shown, *boxes], queue=False, **PRIVATE)

        def on_upload(cards=(), zip_path=None, files=(), request: gr.Request = None):
            try:
                data = core.upload(_key(request), cards, zip_path, files or [])
            except Exception as err:  # shown as a message; logged
                return [_status(_explain(err), "error")] + [gr.skip()] * len(data_outputs)
            return [*show_data(data), gr.update(value=None)]

        def on_cards(values: dict, request: gr.Request):
            cards = [
                Card(values[names[i]] or "", [_gallery_path(g) for g in values[galleries[i]] or []])
                for i in range(CARDS)
            ]
            return on_upload(cards=cards, request=request)

        use_cards.click(
            on_cards, {*names, *galleries}, [*data_outputs, example], **PRIVATE, **LIGHT
        )

        def on_files(zip_path, files, request: gr.Request):
            return on_upload(
                zip_path=zip_path, files=[str(f) for f in files or []], request=request
            )

        use_files.click(on_files, [zip_file, named_files], [*data_outputs, example], **PRIVATE,
                        **LIGHT)  # fmt: skip

        def on_method(name):
            settings = method_settings(name)
            values = engine.settings_for(bundle, name)
            updates = [
                gr.update(visible=knob in settings, value=values.get(knob))
                if knob in settings
                else gr.update(visible=False)
                for knob in knob_names
            ]
            return [_method_help(name), gr.update(value=int(values.get("epochs", 5))), *updates]

        method.change(on_method, [method], [method_help, epochs, *knobs], queue=False, **PRIVATE)

        def on_arm(request: gr.Request):
            core.arm(_key(request))
            return (
                _status(
                    "Waiting for the model: it runs one job at a time (queue position on the "
                    "right)…",
                    "busy",
                ),
                gr.update(interactive=False),
                gr.update(interactive=True),
            )

        def on_train(values: dict, request: gr.Request):
            key = _key(request)
            method_name, shot_count, epoch_count = values[method], values[shots], values[epochs]
            reader_name = values[reader]
            seed_value, also_reader = values[seed], "mc" if values[also] else None
            settings = {name: values[knob] for name, knob in zip(knob_names, knobs, strict=True)}
            allowed = method_settings(method_name) if method_name in METHODS else {}
            settings = {k: v for k, v in settings.items() if k in allowed}
            drawn, draw_cost, said, started = 0.0, 0.0, 0.0, False
            for event, live in core.train(
                key,
                None,
                method_name,
                shot_count,
                epoch_count,
                settings,
                reader=reader_name,
                seed=seed_value,
                also=also_reader,
            ):
                final = live.finished
                buttons = (gr.update(interactive=final), gr.update(interactive=not final))
                if isinstance(event, Phase) and event.name == "start":
                    started = True
                    yield (
                        _status(live.status, live.tone),
                        views.metrics(live),
                        views.curves(live),
                        views.scores(None),
                        views.probes(live.probes, {}),
                        *buttons,
                        *[gr.skip()] * 7,
                    )
                    continue
                if not started:  # refused before it began: the last session's view stays
                    yield (_status(live.status, live.tone), *[gr.skip()] * 4, *buttons,
                           *[gr.skip()] * 7)  # fmt: skip
                    continue
                # A redraw (matplotlib, then Gradio's PNG) can cost more than a training
                # step: space them by a multiple of what the last one cost, so that drawing
                # takes at most about a fifth of the session.
                now = time.monotonic()
                spacing = max(PLOT_EVERY, 4 * draw_cost)
                redraw = final or not isinstance(event, Step) or now - drawn > spacing
                if isinstance(event, Step) and not redraw and now - said < STATUS_EVERY:
                    continue  # every update costs Gradio a round of work: not one per step
                said = now
                yield (
                    _status(live.status, live.tone),
                    views.metrics(live) if isinstance(event, Metrics) or final else gr.skip(),
                    views.curves(live) if redraw else gr.skip(),
                    views.scores(live) if isinstance(event, Scores) else gr.skip(),
                    views.probes(live.probes, live.answers)
                    if isinstance(event, ProbeAnswers)
                    else gr.skip(),
                    *buttons,
                    *(views.sessions(key) if isinstance(event, Done) else [gr.skip()] * 7),
                )
                if redraw:
                    drawn = time.monotonic()
                    draw_cost = drawn - now

        train_event = train_btn.click(
            on_arm, None, [status, train_btn, stop_btn], queue=False, **PRIVATE
        ).then(
            on_train,
            {method, shots, epochs, reader, seed, also, *knobs},
            [status, metrics, curves, scores, probes, train_btn, stop_btn, *session_outputs],
            show_progress="full",
            show_progress_on=[status],
            **GPU,
            **PRIVATE,
        )

        def on_train_end():
            return gr.update(interactive=True), gr.update(interactive=False)

        # If the session ended any way at all (even a dropped connection), buttons come back.
        train_event.then(on_train_end, None, [train_btn, stop_btn], queue=False, **PRIVATE)
        takeaway_ui.wire_session_extras(extras, core, train_event)
        takeaway_ui.wire_downloads(tables, core, table)

        def on_stop(request: gr.Request):
            return _status(core.stop(_key(request)), "stopped")

        stop_btn.click(on_stop, None, [status], queue=False, **PRIVATE)

        def on_ask(image, question_text, version_value, base_too, request: gr.Request):
            key = _key(request)
            try:
                chosen = core.version(core.workspace(key), version_value)
                who = "the base model" if chosen == 0 else f"session {chosen}"
                yield _status(f"Asking {who}…", "busy"), "", ""
                answer, base = "", None
                for answer, base in core.chat(key, image, question_text, chosen, base_too):
                    yield gr.skip(), answer, base if base is not None else gr.skip()
                if not base_too:
                    base = ""
                yield _status(f"Answered by {who}.", "done"), answer, base or ""
            except UserError as err:
                yield _status(str(err), "error"), gr.skip(), gr.skip()
            except Exception as err:
                log.exception("chat failed")
                yield _status(f"The model could not answer ({type(err).__name__}).", "error"), \
                    gr.skip(), gr.skip()  # fmt: skip

        def on_chat_image(path):
            """Show the chosen image as the model will see it, or say why it cannot be used."""
            if not path:
                return None, gr.skip()
            try:
                shown = figures.for_display(core.chat_image(path))
                return shown, _status("Image ready: ask a question.", "info")
            except UserError as err:
                return None, _status(str(err), "error")

        chat_image.change(on_chat_image, [chat_image], [chat_preview, status], **PRIVATE)

        chat_inputs = [chat_image, question, version, with_base]
        for trigger in (ask_btn.click, question.submit):
            trigger(
                on_ask,
                chat_inputs,
                [status, adapted_out, base_out],
                show_progress="full",
                show_progress_on=[status],
                **GPU,
                **PRIVATE,
            )

        def on_rollback_ask(target, request: gr.Request):
            ws = core.workspace(_key(request))
            latest = len(ws.history)
            if target is None or int(target) >= latest:
                return (
                    gr.update(visible=False),
                    "",
                    _status(
                        f"Nothing to roll back: pick an earlier session than {latest}.", "info"
                    ),
                )
            target = int(target)
            lost = latest - target
            where = "the base model" if target == 0 else f"session {target}"
            message = (
                f"**Roll back to {where}?** This removes the last {lost} "
                f"session{'s' if lost > 1 else ''} for good (download the history file first "
                "if you might want them back)."
            )
            return gr.update(visible=True), message, gr.skip()

        rollback_btn.click(
            on_rollback_ask, [rollback_to], [confirm_box, confirm_text, status], queue=False,
            **PRIVATE,
        )  # fmt: skip
        confirm_no.click(
            lambda: (gr.update(visible=False), _status("Roll back cancelled: nothing changed.")),
            None,
            [confirm_box, status],
            queue=False,
            **PRIVATE,
        )

        def on_rollback(target, request: gr.Request):
            key = _key(request)
            try:
                message = core.rollback(key, int(target))
                tone = "done"
            except Exception as err:  # shown as a message; logged
                message, tone = _explain(err), "error"
            return (gr.update(visible=False), _status(message, tone), *views.sessions(key))

        confirm_yes.click(
            on_rollback,
            [rollback_to],
            [confirm_box, status, *session_outputs],
            **PRIVATE,
            **LIGHT,
        )

        def on_import(path, request: gr.Request):
            key = _key(request)
            try:
                message, tone = core.import_history(key, path), "done"
            except Exception as err:  # shown as a message; logged
                return (_status(_explain(err), "error"), *[gr.skip()] * 7)
            return (_status(message, tone), *views.sessions(key))

        upload_history.upload(on_import, [upload_history], [status, *session_outputs], **PRIVATE,
                              **LIGHT)  # fmt: skip

        def on_export(target, request: gr.Request):
            key = _key(request)
            try:
                path = core.export_model(key, target)
            except Exception as err:  # shown as a message; logged
                return _status(_explain(err), "error"), gr.update(visible=False)
            chosen = int(target or 0)
            return (
                _status(f"The model after session {chosen} is ready to download below.", "done"),
                gr.update(value=str(path), visible=True),
            )

        export_btn.click(
            on_export,
            [export_version],
            [status, export_file],
            show_progress_on=[status],
            **GPU,
            **PRIVATE,
        )

        def on_load(request: gr.Request):
            return views.sessions(_key(request))

        demo.load(on_load, None, session_outputs, **PRIVATE, **LIGHT)

        def on_unload(request: gr.Request):
            core.close(_key(request))

        demo.unload(on_unload)

        compare_ui.wire(compare_tab, core, status, session_outputs, views, GPU)
        _api(core)
        compare_ui.add_api(core, GPU)

    demo.queue(default_concurrency_limit=4, max_size=256)
    return demo


# ---- the public API ----------------------------------------------------------------------------
def _api(core: AppCore) -> None:
    """Stable endpoints for scripts and tests: /train (streams events), /chat, /rollback,
    /sessions, /export_history, /import_history. Hidden components, public API names."""

    def _fail(err: Exception):
        raise gr.Error(str(err), print_exception=False)

    with gr.Column(visible=False):
        data = gr.Textbox(label="data")
        method = gr.Textbox(value="lorsu", label="method")
        shots = gr.Number(value=5, precision=0, label="shots")
        epochs = gr.Number(value=None, precision=0, label="epochs")
        settings = gr.JSON(value=None, label="settings")
        seed = gr.Number(value=None, precision=0, label="seed")
        event_out = gr.JSON(label="event")
        image = gr.File(label="image")  # opened by the app, like the Chat tab's
        question = gr.Textbox(value=PROBE_QUESTION, label="question")
        session = gr.Number(value=-1, precision=0, label="session")
        with_base = gr.Checkbox(value=True, label="with_base")
        answer_out = gr.Textbox(label="answer")
        base_out = gr.Textbox(label="base_answer")
        result = gr.JSON(label="result")
        history_in = gr.File(label="history")
        history_out = gr.File(label="history")
        buttons = [gr.Button(visible=False) for _ in range(6)]

    def api_train(data_name, method_name, shot_count, epoch_count, extra, seed_value=None,
                  request: gr.Request = None):  # fmt: skip
        """Train one session and stream its events as JSON: phase, scores, probes, step,
        metrics, then done (with the session's summary and its `command`), stopped or error.
        `seed`: empty for the session's number. `data` is an example
        domain name, or "uploaded" for this client's latest upload."""
        key = _key(request)
        core.arm(key)
        if extra is not None and not isinstance(extra, dict):
            _fail(UserError('settings must be a JSON object, e.g. {"heads": 2}.'))
        for event, _live in core.train(
            key,
            data_name or None,
            method_name or "lorsu",
            shot_count,
            epoch_count,
            extra or {},
            seed=seed_value,
        ):
            if isinstance(event, dict):
                _fail(UserError(event["message"]))
            payload = event.to_dict()
            if isinstance(event, Done):
                payload["session"] = {
                    k: event.record.summary()[k]
                    for k in ("index", "method", "target", "classes", "shots", "ti", "cc")
                }
                payload["session"]["accuracies"] = event.record.accuracies
                payload["session"]["command"] = event.record.extra.get("command")
            if isinstance(event, Stopped):
                payload["message"] = event.message
            yield payload

    def api_chat(image_path, question_text, version_value, base_too, request: gr.Request):
        """Ask the model version `session` (-1 = latest, 0 = base) about an image; streams
        (answer, base_answer)."""
        answer, base = "", ""
        try:
            for answer, base in core.chat(
                _key(request), image_path, question_text, version_value, base_too
            ):
                yield answer, base or ""
        except UserError as err:
            _fail(err)

    def api_rollback(target, request: gr.Request):
        """Keep sessions 1..session, drop the later ones exactly; returns /sessions."""
        try:
            message = core.rollback(_key(request), target)
        except UserError as err:
            _fail(err)
        return {"message": message, **core.sessions(_key(request))}

    def api_sessions(request: gr.Request):
        """This client's sessions, base accuracies and accuracy matrix."""
        return core.sessions(_key(request))

    def api_export(request: gr.Request):
        """This client's history as one file (safetensors with a JSON manifest)."""
        try:
            return str(core.export_history(_key(request)))
        except UserError as err:
            _fail(err)

    def api_import(path, request: gr.Request):
        """Replace this client's history with an uploaded history file; returns /sessions."""
        try:
            message = core.import_history(_key(request), path)
        except UserError as err:
            _fail(err)
        return {"message": message, **core.sessions(_key(request))}

    train_b, chat_b, rollback_b, sessions_b, export_b, import_b = buttons
    train_b.click(api_train, [data, method, shots, epochs, settings, seed], event_out,
                  api_name="train", **GPU)  # fmt: skip
    chat_b.click(api_chat, [image, question, session, with_base], [answer_out, base_out],
                 api_name="chat", **GPU)  # fmt: skip
    rollback_b.click(api_rollback, [session], result, api_name="rollback", **LIGHT)
    sessions_b.click(api_sessions, None, result, api_name="sessions", **LIGHT)
    export_b.click(api_export, None, history_out, api_name="export_history", **LIGHT)
    import_b.click(api_import, [history_in], result, api_name="import_history", **LIGHT)


# ---- small helpers -----------------------------------------------------------------------------
def _knob_names() -> list[str]:
    names: list[str] = []
    for method in METHODS:
        for name in method_settings(method):
            if name not in names and name != "epochs":
                names.append(name)
    return names


def _knob(name: str, method: str, bundle):
    label, info = text.KNOBS.get(name, (name.replace("_", " ").capitalize(), None))
    settings = method_settings(method)
    values = engine.settings_for(bundle, method)
    default = values.get(name)
    if default is None:  # a setting of another method: take its type from there
        default = next(method_settings(m)[name] for m in METHODS if name in method_settings(m))
    visible = name in settings
    if isinstance(default, bool):
        return gr.Checkbox(value=default, label=label, info=info, visible=visible)
    if isinstance(default, str):
        return gr.Textbox(value=default, label=label, info=info, visible=visible, max_lines=1)
    precision = 0 if isinstance(default, int) else None
    return gr.Number(value=default, label=label, info=info, precision=precision, visible=visible)


def _method_help(name: str) -> str:
    cls = METHODS.get(name)
    return text.METHODS_HELP.get(name) or (cls.summary if cls else "")


def _gallery_path(item) -> str:
    if isinstance(item, (list, tuple)):
        item = item[0]
    return str(item)


READER_CHOICES = [
    ("CLIP zero-shot (fast)", "clip"),
    ("The chat model: multiple choice", "mc"),
    ("The chat model: open answer", "open"),
]
QUESTION_EXAMPLES = [
    PROBE_QUESTION,
    "Is this a seven?",
    mc_prompt(DEFAULT_QUESTION, ["circle", "star", "heart", "arrow", "square"]),
]


def _chat_examples(core: AppCore) -> list[list]:
    examples = []
    for name in core.examples.names()[:4]:
        try:
            data = core.examples.get(name)
        except Exception:  # a broken example folder must not stop the app
            continue
        for probe_item in data.domain.test.items:
            if len(examples) >= 12:
                break
            if any(e[2] == (name, probe_item.label) for e in examples):
                continue
            if probe_item.source and Path(probe_item.source).exists():
                examples.append([probe_item.source, PROBE_QUESTION, (name, probe_item.label)])
            if sum(e[2][0] == name for e in examples) >= 4:
                break
    return [e[:1] for e in examples]


# ---- starting the app --------------------------------------------------------------------------
def create(
    model: str | None = None,
    domains_dir: str | None = None,
    control_dirs: list[str] | None = None,
    device: str | None = None,
    clip: str | None = None,
) -> gr.Blocks:
    bundle, notice = engine.load_model(
        model or env_model(default_model()), device=device, clip=clip
    )
    return build_app(AppCore(bundle, notice, domains_dir, control_dirs))


def launch(demo: gr.Blocks, host: str | None = None, port: int | None = None, **kwargs):
    from ..model import ASSETS_DIR

    return demo.launch(
        server_name=host,
        server_port=port,
        theme=gr.themes.Soft(primary_hue="blue", secondary_hue="amber"),
        css=CSS,
        allowed_paths=[str(ASSETS_DIR)],
        max_file_size="100mb",
        footer_links=["api"],
        **kwargs,
    )


def run(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    model = args.model or env_model(default_model())
    print(f"Loading {model}…", file=sys.stderr, flush=True)
    try:
        demo = create(model, args.domains, args.control, args.device, getattr(args, "clip", None))
    except BundleError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    host = args.host or os.environ.get("GRADIO_SERVER_NAME")
    port = args.port or (int(os.environ["GRADIO_SERVER_PORT"]) if _env_port() else None)
    launch(demo, host=host, port=port)
    return 0


def default_model() -> str:
    """`toy` (offline, CPU), except on a Hugging Face Space with a GPU, where the README's
    front matter preloads LLaVA-1.5-7B: then `llava-1.5-7b`. LORSU_MODEL / --model win."""
    if os.environ.get("SPACE_ID"):
        import torch

        if torch.cuda.is_available():
            return "llava-1.5-7b"
    return OFFLINE_PRESET


def _env_port() -> bool:
    return os.environ.get("GRADIO_SERVER_PORT", "").isdigit()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python app.py", description="The LoRSU demo app (Gradio)."
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))
