"""The public API: /train, /chat, /rollback, /sessions, /export_history, /import_history.

Hidden components with public API names, for scripts and tests; each client has its own
workspace (its `session_hash`), like a browser tab.
"""

from __future__ import annotations

import gradio as gr

from ..events import Done, Stopped
from .common import GPU, LIGHT, key_of
from .core import AppCore, UserError
from .engine import PROBE_QUESTION


def add_api(core: AppCore) -> None:
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
        key = key_of(request)
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
                key_of(request), image_path, question_text, version_value, base_too
            ):
                yield answer, base or ""
        except UserError as err:
            _fail(err)

    def api_rollback(target, request: gr.Request):
        """Keep sessions 1..session, drop the later ones exactly; returns /sessions."""
        try:
            message = core.rollback(key_of(request), target)
        except UserError as err:
            _fail(err)
        return {"message": message, **core.sessions(key_of(request))}

    def api_sessions(request: gr.Request):
        """This client's sessions, base accuracies and accuracy matrix."""
        return core.sessions(key_of(request))

    def api_export(request: gr.Request):
        """This client's history as one file (safetensors with a JSON manifest)."""
        try:
            return str(core.export_history(key_of(request)))
        except UserError as err:
            _fail(err)

    def api_import(path, request: gr.Request):
        """Replace this client's history with an uploaded history file; returns /sessions."""
        try:
            message = core.import_history(key_of(request), path)
        except UserError as err:
            _fail(err)
        return {"message": message, **core.sessions(key_of(request))}

    train_b, chat_b, rollback_b, sessions_b, export_b, import_b = buttons
    train_b.click(api_train, [data, method, shots, epochs, settings, seed], event_out,
                  api_name="train", **GPU)  # fmt: skip
    chat_b.click(api_chat, [image, question, session, with_base], [answer_out, base_out],
                 api_name="chat", **GPU)  # fmt: skip
    rollback_b.click(api_rollback, [session], result, api_name="rollback", **LIGHT)
    sessions_b.click(api_sessions, None, result, api_name="sessions", **LIGHT)
    export_b.click(api_export, None, history_out, api_name="export_history", **LIGHT)
    import_b.click(api_import, [history_in], result, api_name="import_history", **LIGHT)
