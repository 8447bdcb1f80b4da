"""The Teach & watch tab: pick or upload images, train a session, watch it learn.

`build` lays the tab out (inside the caller's `gr.Tab`); `wire` connects it once every tab
exists, because a finished session also refreshes the Sessions tab (`session_outputs`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import gradio as gr

from ..events import Done, Metrics, Phase, Scores, Step
from ..methods import METHODS, method_settings
from . import engine, own_examples, text
from . import takeaway as takeaway_ui
from .common import GPU, LIGHT, PRIVATE, Views, explain, key_of, status_line
from .core import AppCore
from .engine import PROBES, ProbeAnswers
from .uploads import Card

CARDS = 8
PLOT_EVERY = 0.35  # seconds between re-drawn curves while training (at least)
STATUS_EVERY = 0.3  # seconds between status-only updates while training


@dataclass
class TeachTab:
    example: gr.Radio
    names: list[gr.Textbox]
    galleries: list[gr.Gallery]
    boxes: list[gr.Group]
    shown: gr.State
    add_card: gr.Button
    use_cards: gr.Button
    zip_file: gr.File
    named_files: gr.File
    use_files: gr.Button
    data_info: gr.Markdown
    data_table: gr.Dataframe
    data_gallery: gr.Gallery
    method: gr.Dropdown
    method_help: gr.Markdown
    shots: gr.Slider
    epochs: gr.Slider
    seed: gr.Number
    knobs: list
    reader: gr.Radio
    also: gr.Checkbox
    train_btn: gr.Button
    stop_btn: gr.Button
    metrics: gr.HTML
    readings: gr.Markdown
    curves: gr.Plot
    scores: gr.Plot
    probes: gr.HTML
    extras: takeaway_ui.SessionExtras
    knob_names: list[str]
    own: list[own_examples.OwnExample]


def build(core: AppCore, views: Views) -> TeachTab:
    bundle = core.info  # the page can be built before the model is loaded
    knob_names = _knob_names()
    defaults = engine.settings_for(bundle, "lorsu")
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
                    if bundle.labels:
                        gr.Markdown(text.known_names(bundle.labels), elem_classes="lorsu-small")
                    names, galleries, boxes, own = [], [], [], []
                    for i in range(CARDS):
                        with gr.Group(visible=i < 2) as box:
                            names.append(
                                gr.Textbox(
                                    label=f"Class {i + 1}",
                                    placeholder=(
                                        "class name, e.g. " + text.example_names(bundle.labels)[0]
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
                                    elem_id=f"lorsu-card-{i}",
                                )
                            )
                            own.append(own_examples.build(core, i))
                        boxes.append(box)
                    shown = gr.State(2)
                    with gr.Row():
                        add_card = gr.Button("+ Add a class", size="sm")
                        use_cards = gr.Button("Use these images", variant="primary")
                with gr.Tab("Zip or named files", id="files"):
                    if bundle.labels:
                        gr.Markdown(text.known_names(bundle.labels), elem_classes="lorsu-small")
                    gr.Markdown(text.upload_zip(bundle.labels), elem_classes="lorsu-small")
                    zip_file = gr.File(label="Zip of class folders", file_types=[".zip"])
                    gr.Markdown(text.upload_files(bundle.labels), elem_classes="lorsu-small")
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
                shots = gr.Slider(1, 50, value=5, step=1, label="Shots (images per class)")
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

        # Train and Stop head the live view: pressing Train, the status line (sticky, at the
        # top) and the TI/CC cards just below are in one view.
        with gr.Column(scale=3, min_width=420, elem_id="lorsu-live"):
            gr.Markdown("### 3 · Train and watch it learn")
            with gr.Row():
                train_btn = gr.Button("Train", variant="primary", elem_id="lorsu-train", scale=2)
                stop_btn = gr.Button(
                    "Stop", variant="stop", interactive=False, elem_id="lorsu-stop"
                )
            metrics = gr.HTML(views.metrics(), elem_id="lorsu-metrics")
            readings = takeaway_ui.build_readings()
            gr.Markdown(text.LIVE, elem_classes="lorsu-small")
            curves = gr.Plot(views.curves(), format="png", show_label=False, elem_id="lorsu-curves")
            gr.Markdown(text.HEATMAP, elem_classes="lorsu-small")
            scores = gr.Plot(
                views.scores(), format="png", show_label=False, elem_id="lorsu-heatmap"
            )
            gr.Markdown(text.PROBES, elem_classes="lorsu-small")
            probes = gr.HTML(views.probes([]), elem_id="lorsu-probes")
            extras = takeaway_ui.build_session_extras(readings)
    return TeachTab(
        example=example,
        names=names,
        galleries=galleries,
        boxes=boxes,
        shown=shown,
        add_card=add_card,
        use_cards=use_cards,
        zip_file=zip_file,
        named_files=named_files,
        use_files=use_files,
        data_info=data_info,
        data_table=data_table,
        data_gallery=data_gallery,
        method=method,
        method_help=method_help,
        shots=shots,
        epochs=epochs,
        seed=seed,
        knobs=knobs,
        reader=reader,
        also=also,
        train_btn=train_btn,
        stop_btn=stop_btn,
        metrics=metrics,
        readings=readings,
        curves=curves,
        scores=scores,
        probes=probes,
        extras=extras,
        knob_names=knob_names,
        own=own,
    )


def wire(tab: TeachTab, core: AppCore, views: Views, status, session_outputs: list) -> None:
    """Connect the tab's events; `status` is the page's status line."""
    knob_names = tab.knob_names
    example = tab.example
    names = tab.names
    galleries = tab.galleries
    boxes = tab.boxes
    shown = tab.shown
    add_card = tab.add_card
    use_cards = tab.use_cards
    zip_file = tab.zip_file
    named_files = tab.named_files
    use_files = tab.use_files
    data_info = tab.data_info
    data_table = tab.data_table
    data_gallery = tab.data_gallery
    method = tab.method
    method_help = tab.method_help
    shots = tab.shots
    epochs = tab.epochs
    seed = tab.seed
    knobs = tab.knobs
    reader = tab.reader
    also = tab.also
    train_btn = tab.train_btn
    stop_btn = tab.stop_btn
    metrics = tab.metrics
    curves = tab.curves
    scores = tab.scores
    probes = tab.probes
    extras = tab.extras

    def show_data(data):
        return data_view(views, data)

    # New data clears the last session's TI/CC, curves and heatmap: they were of other data.
    data_outputs = [status, data_info, data_table, data_gallery, shots, probes, metrics, curves,
                    scores]  # fmt: skip

    def on_example(name, request: gr.Request):
        if not name:
            return [gr.skip()] * len(data_outputs)
        try:
            return show_data(core.select(key_of(request), name))
        except Exception as err:  # shown as a message; logged
            return [status_line(explain(err), "error")] + [gr.skip()] * (len(data_outputs) - 1)

    # .input, not .change: the page sets these itself when it restores a workspace (on load),
    # and that must not re-run the handler over the restored values.
    example.input(on_example, [example], data_outputs, **PRIVATE, **LIGHT)

    def on_add_card(count):
        count = min(CARDS, count + 1)
        return [count] + [gr.update(visible=i < count) for i in range(CARDS)]

    add_card.click(on_add_card, [shown], [shown, *boxes], queue=False, **PRIVATE)

    def on_upload(cards=(), zip_path=None, files=(), request: gr.Request = None):
        try:
            data = core.upload(key_of(request), cards, zip_path, files or [])
        except Exception as err:  # shown as a message; logged
            return [status_line(explain(err), "error")] + [gr.skip()] * len(data_outputs)
        return [*show_data(data), gr.update(value=None)]

    def on_cards(values: dict, request: gr.Request):
        cards = [
            Card(values[names[i]] or "", [_gallery_path(g) for g in values[galleries[i]] or []])
            for i in range(CARDS)
        ]
        return on_upload(cards=cards, request=request)

    use_cards.click(on_cards, {*names, *galleries}, [*data_outputs, example], **PRIVATE, **LIGHT)

    def on_files(zip_path, files, request: gr.Request):
        return on_upload(zip_path=zip_path, files=[str(f) for f in files or []], request=request)

    use_files.click(on_files, [zip_file, named_files], [*data_outputs, example], **PRIVATE,
                    **LIGHT)  # fmt: skip

    def on_method(name):
        return method_view(core.info, name, knob_names)

    method.input(on_method, [method], [method_help, epochs, *knobs], queue=False, **PRIVATE)

    def on_arm(request: gr.Request):
        core.arm(key_of(request))
        return (
            status_line(
                "Waiting for the model: it runs one job at a time (queue position on the right)…",
                "busy",
            ),
            gr.update(interactive=False),
            gr.update(interactive=True),
        )

    def on_train(values: dict, request: gr.Request):
        key = key_of(request)
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
                    status_line(live.status, live.tone),
                    views.metrics(live),
                    views.curves(live),
                    views.scores(None),
                    views.probes(live.probes[:PROBES], {}),
                    *buttons,
                    *[gr.skip()] * 7,
                )
                continue
            if not started:  # refused before it began: the last session's view stays
                yield (status_line(live.status, live.tone), *[gr.skip()] * 4, *buttons,
                       *[gr.skip()] * 7)  # fmt: skip
                continue
            # A redraw (matplotlib, then Gradio's PNG) can cost more than a training
            # step: space them by a multiple of what the last one cost, so that drawing
            # takes at most about a fifth of the session. Only steps and measurements
            # change the curves; a phase, the head scores or the probes do not.
            now = time.monotonic()
            spacing = max(PLOT_EVERY, 4 * draw_cost)
            step_due = isinstance(event, Step) and now - drawn > spacing
            redraw = final or isinstance(event, Metrics) or step_due
            if isinstance(event, Step) and not redraw and now - said < STATUS_EVERY:
                continue  # every update costs Gradio a round of work: not one per step
            said = now
            if final and live.saved is None:  # stopped or failed: nothing of it is kept
                yield (status_line(live.status, live.tone), *views.cleared(live.status),
                       gr.skip(), *buttons, *[gr.skip()] * 7)  # fmt: skip
                continue
            yield (
                status_line(live.status, live.tone),
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

    def on_stop(request: gr.Request):
        return status_line(core.stop(key_of(request)), "stopped")

    stop_btn.click(on_stop, None, [status], queue=False, **PRIVATE)
    own_examples.wire(tab.own, tab.names, tab.galleries, tab.example, core, status)


# ---- views ---------------------------------------------------------------------------------------
def shots_update(most: int):
    """The shots slider for data with at most `most` training images in its smallest class.
    Gradio refuses a slider whose maximum is not above its minimum (1), so data of one training
    image per class (two images per class, one kept to test on) gets a fixed slider at 1."""
    return gr.update(maximum=max(2, most), value=min(5, most), interactive=most > 1)


def data_view(views: Views, data) -> tuple:
    """(status, data info, table, gallery, shots, probes, metrics, curves, heatmap) for a
    picked or uploaded dataset: the last session's results are cleared (other data)."""
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
        status_line(f"Data ready: {data.title}. Press Train (step 2).", "info"),
        info,
        gr.update(value=rows, visible=True),
        gr.update(value=sample, visible=True),
        shots_update(most),
        views.probes(data.probes()),
        *views.cleared(f"New data picked ({data.title}): train a session to see its TI and CC."),
    )


def method_view(bundle, name: str, knob_names: list[str], given: dict | None = None) -> list:
    """(method help, epochs, *knobs) for a method: its settings shown, the rest hidden;
    `given` (a session's settings) overrides the defaults."""
    settings = method_settings(name)
    values = {**engine.settings_for(bundle, name), **(given or {})}
    updates = [
        gr.update(visible=knob in settings, value=values.get(knob))
        if knob in settings
        else gr.update(visible=False)
        for knob in knob_names
    ]
    return [_method_help(name), gr.update(value=int(values.get("epochs") or 5)), *updates]


def restore_outputs(tab: TeachTab) -> list:
    """What `restore` fills, in its order (the page's status line comes first, apart)."""
    return [
        tab.example,
        tab.data_info,
        tab.data_table,
        tab.data_gallery,
        tab.shots,
        tab.probes,
        tab.method,
        tab.method_help,
        tab.epochs,
        *tab.knobs,
        tab.seed,
        tab.reader,
        tab.also,
        tab.shown,
        *tab.boxes,
        *tab.names,
        *tab.galleries,
        *[card.pad for card in tab.own],
    ]


def restore(core: AppCore, views: Views, tab: TeachTab, ws, note: dict | None) -> list:
    """The tab as a returning browser left it: its data picked, and the inputs of a session
    a reload cut short (`note`, from `core.take_interrupted`) back in step 2."""
    values: dict[int, object] = {}  # by component; what is not set is skipped

    def put(components, new_values):
        values.update((id(c), v) for c, v in zip(components, new_values, strict=True))

    data = None
    if ws.selected:
        try:
            data = core.dataset(ws, None)
        except Exception:  # an example folder gone since: start without it
            data = None
    if data is not None:
        _, info, table, gallery, shots, probes, *_ = data_view(views, data)
        put(
            [tab.example, tab.data_info, tab.data_table, tab.data_gallery, tab.shots, tab.probes],
            [data.name if data.example else None, info, table, gallery, shots, probes],
        )
    if note and note.get("method") in METHODS:
        method = note["method"]
        put(
            [tab.method, tab.method_help, tab.epochs, *tab.knobs],
            [method, *method_view(core.bundle, method, tab.knob_names, note.get("settings") or {})],
        )
        if note.get("epochs"):
            put([tab.epochs], [gr.update(value=int(note["epochs"]))])
        if note.get("shots"):
            shots = values.get(id(tab.shots))
            shots = shots if isinstance(shots, dict) else gr.update()
            put([tab.shots], [{**shots, "value": int(note["shots"])}])
        put(
            [tab.seed, tab.reader, tab.also],
            [note.get("seed"), note.get("reader") or gr.skip(), bool(note.get("also"))],
        )
    if data is not None and data.example:  # the pads' paper and ink follow it, as on a pick
        put([card.pad for card in tab.own], own_examples.pad_updates(core, tab.own, data.name))
    if data is not None and data.from_cards:  # the cards as they were used, images as kept
        cards = list(data.card_images().items())[:CARDS]
        cards += [("", [])] * (CARDS - len(cards))
        shown = max(2, sum(1 for name, _ in cards if name))
        put([tab.shown], [shown])
        put(tab.boxes, [gr.update(visible=i < shown) for i in range(CARDS)])
        put(tab.names, [name for name, _ in cards])
        put(tab.galleries, [images or None for _, images in cards])
    return [values.get(id(c), gr.skip()) for c in restore_outputs(tab)]


# ---- helpers -----------------------------------------------------------------------------------
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
