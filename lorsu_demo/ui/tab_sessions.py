"""The Sessions tab: the table, the accuracy matrix, roll back, history and model files."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from . import takeaway as takeaway_ui
from . import text
from .common import GPU, LIGHT, PRIVATE, Views, explain, key_of, status_line
from .core import TABLE_HEADERS, AppCore


@dataclass
class SessionsTab:
    table: gr.Dataframe
    matrix: gr.Plot
    matrix_summary: gr.Markdown
    rollback_to: gr.Dropdown
    rollback_btn: gr.Button
    confirm_box: gr.Group
    confirm_text: gr.Markdown
    confirm_yes: gr.Button
    confirm_no: gr.Button
    download_history: gr.DownloadButton
    upload_history: gr.UploadButton
    tables: gr.File
    export_version: gr.Dropdown
    export_btn: gr.Button
    export_file: gr.File

    def outputs(self, version) -> list:
        """What `Views.sessions` fills, in its order (`version` is the Chat tab's picker)."""
        return [
            self.table,
            self.matrix,
            self.matrix_summary,
            version,
            self.rollback_to,
            self.export_version,
            self.download_history,
        ]


def build(core: AppCore) -> SessionsTab:
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
            confirm_yes = gr.Button("Yes, roll back", variant="stop", elem_id="lorsu-confirm-yes")
            confirm_no = gr.Button("Cancel", elem_id="lorsu-confirm-no")
    gr.Markdown("#### Keep your work")
    with gr.Row():
        download_history = gr.DownloadButton(
            "Download history file",
            value=None,
            interactive=False,
            elem_id="lorsu-download",
        )
        upload_history = gr.UploadButton("Upload a history file", elem_id="lorsu-upload-history")
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
    return SessionsTab(
        table=table,
        matrix=matrix,
        matrix_summary=matrix_summary,
        rollback_to=rollback_to,
        rollback_btn=rollback_btn,
        confirm_box=confirm_box,
        confirm_text=confirm_text,
        confirm_yes=confirm_yes,
        confirm_no=confirm_no,
        download_history=download_history,
        upload_history=upload_history,
        tables=tables,
        export_version=export_version,
        export_btn=export_btn,
        export_file=export_file,
    )


def wire(tab: SessionsTab, core: AppCore, views: Views, status, session_outputs: list) -> None:
    table = tab.table
    rollback_to = tab.rollback_to
    rollback_btn = tab.rollback_btn
    confirm_box = tab.confirm_box
    confirm_text = tab.confirm_text
    confirm_yes = tab.confirm_yes
    confirm_no = tab.confirm_no
    upload_history = tab.upload_history
    tables = tab.tables
    export_version = tab.export_version
    export_btn = tab.export_btn
    export_file = tab.export_file

    def on_rollback_ask(target, request: gr.Request):
        ws = core.workspace(key_of(request))
        latest = len(ws.history)
        if target is None or int(target) >= latest:
            return (
                gr.update(visible=False),
                "",
                status_line(
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
        lambda: (gr.update(visible=False), status_line("Roll back cancelled: nothing changed.")),
        None,
        [confirm_box, status],
        queue=False,
        **PRIVATE,
    )

    def on_rollback(target, request: gr.Request):
        key = key_of(request)
        try:
            message = core.rollback(key, int(target))
            tone = "done"
        except Exception as err:  # shown as a message; logged
            message, tone = explain(err), "error"
        return (gr.update(visible=False), status_line(message, tone), *views.sessions(key))

    confirm_yes.click(
        on_rollback,
        [rollback_to],
        [confirm_box, status, *session_outputs],
        **PRIVATE,
        **LIGHT,
    )

    def on_import(path, request: gr.Request):
        key = key_of(request)
        try:
            message, tone = core.import_history(key, path), "done"
        except Exception as err:  # shown as a message; logged
            return (status_line(explain(err), "error"), *[gr.skip()] * 7)
        return (status_line(message, tone), *views.sessions(key))

    upload_history.upload(on_import, [upload_history], [status, *session_outputs], **PRIVATE,
                          **LIGHT)  # fmt: skip

    def on_export(target, request: gr.Request):
        key = key_of(request)
        try:
            path = core.export_model(key, target)
        except Exception as err:  # shown as a message; logged
            return status_line(explain(err), "error"), gr.update(visible=False)
        chosen = int(target or 0)
        return (
            status_line(f"The model after session {chosen} is ready to download below.", "done"),
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
    takeaway_ui.wire_downloads(tables, core, table)
