"""Results to take away, on the page (Gradio): a session's two readings and its command line
(Copy as CLI) under the live view, and the sessions table and accuracy matrix as CSV and JSON
files in the Sessions tab. The content comes from `lorsu_demo.takeaway` (no Gradio)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass

import gradio as gr

from .. import takeaway
from .common import LIGHT, PRIVATE
from .core import history_file_before

READER_NAMES = {
    "clip": "CLIP zero-shot",
    "mc": "chat model, multiple choice",
    "open": "chat model, open answer",
}


@dataclass
class SessionExtras:
    readings: gr.Markdown
    command: gr.Code
    start_file: gr.File


def build_readings() -> gr.Markdown:
    """Beside TI and CC: the last session read both ways."""
    return gr.Markdown(elem_id="lorsu-readings", elem_classes="lorsu-small")


def build_session_extras(readings: gr.Markdown) -> SessionExtras:
    """Under the live view: the last session's command line (and its starting history)."""
    command = gr.Code(
        value="",
        language="shell",
        label="Copy as CLI: this command trains the same session again (same seed)",
        interactive=False,
        lines=2,
        elem_id="lorsu-command",
        visible=False,
    )
    start_file = gr.File(
        label="The history it starts from (for --start-from)",
        interactive=False,
        visible=False,
    )
    return SessionExtras(readings, command, start_file)


def readings_markdown(record) -> str:
    own = record.extra.get("reader", "clip")
    readings = {own: {"ti": record.ti, "cc": record.cc}, **record.extra.get("readings", {})}
    parts = [
        f"**{READER_NAMES.get(name, name)}**: TI {r['ti']:+.1f}, CC {r['cc']:+.1f}"
        for name, r in readings.items()
    ]
    return (
        f"Session {record.index} read "
        + ("two ways: " if len(parts) > 1 else "")
        + " · ".join(parts)
    )


def session_extras(core, key):
    """(readings, command, start file) for the workspace's latest session."""
    ws = core.workspace(key)
    if not ws.history.sessions:
        return "", gr.update(value="", visible=False), gr.update(value=None, visible=False)
    record = ws.history.sessions[-1]
    command = record.extra.get("command", "")
    start = gr.update(value=None, visible=False)
    if record.index > 1 and command:
        folder = core._folder(key) / "start"
        shutil.rmtree(folder, ignore_errors=True)
        path = takeaway.history_upto(ws.history, record.index - 1).save(
            folder / history_file_before(record.index)
        )
        start = gr.update(value=str(path), visible=True)
    return readings_markdown(record), gr.update(value=command, visible=bool(command)), start


def wire_session_extras(extras: SessionExtras, core, after) -> None:
    """Refresh after `after` (the Train event chain), whatever way the session ended."""

    def on_after(request: gr.Request):
        return session_extras(core, getattr(request, "session_hash", None))

    after.then(
        on_after, None, [extras.readings, extras.command, extras.start_file], **PRIVATE, **LIGHT
    )


def build_downloads() -> gr.File:
    return gr.File(
        label="Sessions table and accuracy matrix (CSV and JSON)",
        file_count="multiple",
        interactive=False,
        elem_id="lorsu-tables",
    )


def table_files(core, key) -> list[str] | None:
    ws = core.workspace(key)
    if not ws.history.sessions:
        return None
    folder = core._folder(key) / "tables"
    shutil.rmtree(folder, ignore_errors=True)
    stem = f"lorsu-{core.bundle.name}-{len(ws.history)}"
    return [str(p) for p in takeaway.write_tables(ws.history, folder, stem)]


def wire_downloads(files: gr.File, core, table) -> None:
    """The files follow the sessions table: whenever it changes, they are written again."""

    def on_table(request: gr.Request):
        return table_files(core, getattr(request, "session_hash", None))

    table.change(on_table, None, [files], **PRIVATE, **LIGHT)
