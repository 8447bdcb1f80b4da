"""The Gradio app: teach, watch, chat, roll back.

This module wires the page together: `build_app(core)` lays out the tabs (one module each:
`tab_teach`, `tab_chat`, `tab_sessions`, `compare`) and the public API (`api`), all driven by
`AppCore` (see `core.py`); `main` is `python app.py` and `python -m lorsu_demo app`. All model
work shares one queue lane (`concurrency_id="gpu"`: one at a time, several on ZeroGPU);
per-browser state lives in `core.store`: each page attaches on load to its browser's workspace
through a key kept in the browser (`gr.BrowserState`), so a reload or a server restart finds the
sessions, uploads and chat version again (see `workspace.py`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import gradio as gr

from ..model import OFFLINE_PRESET, BundleError, bundle_info, env_model
from . import api, engine, tab_chat, tab_sessions, tab_teach, text
from . import compare as compare_ui
from .cli import add_arguments
from .common import GPU, LIGHT, PRIVATE, Views, key_of, status_line
from .core import AppCore
from .style import CSS

log = logging.getLogger("lorsu_demo.ui")
RELOAD_WAIT = 20.0  # seconds a reloaded page waits for the session it cut short to stop
READY = "Ready: pick example data or upload images (step 1), then press Train."
LOADING = "Loading the model… the page works in a moment (a Train press waits for it)."


def build_app(core: AppCore) -> gr.Blocks:
    views = Views(core)
    bundle = core.info  # the page can be built and served before the model is loaded
    GPU["concurrency_limit"] = engine.lane_width(bundle)

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
        # The browser keeps only this key (encrypted in localStorage); the workspace it names
        # stays on the server. Key and secret are fixed, so a restart can still read it.
        browser_key = gr.BrowserState(
            None, storage_key="lorsu-workspace", secret=core.browser_secret()
        )
        served_loading = not core.ready
        status = gr.HTML(
            status_line(LOADING, "busy") if served_loading else status_line(READY),
            elem_id="lorsu-status",
        )

        # "wrap": on a phone every tab stays in view (the default hides some behind "...").
        with gr.Tabs(elem_id="lorsu-tabs", overflow_behavior="wrap"):
            with gr.Tab("1 · Teach & watch", id="train"):
                teach = tab_teach.build(core, views)
            with gr.Tab("2 · Chat", id="chat"):
                chat = tab_chat.build(core)
            with gr.Tab("3 · Sessions", id="sessions"):
                sessions = tab_sessions.build(core)
            with gr.Tab("4 · Compare", id="compare"):
                compare_tab = compare_ui.build_tab(core)
            with gr.Tab("How it works", id="how"):
                gr.Markdown(text.HOW)

        # Every view of the history at once: the Sessions tab and the Chat tab's version picker.
        session_outputs = sessions.outputs(chat.version)
        tab_teach.wire(teach, core, views, status, session_outputs)
        tab_chat.wire(chat, core, status)
        tab_sessions.wire(sessions, core, views, status, session_outputs)

        restored = tab_teach.restore_outputs(teach)

        def on_load(stored_key, request: gr.Request):
            page = key_of(request)
            key, ws = core.attach(page, stored_key)
            waited = time.monotonic()
            while ws.busy and ws.runner != page and time.monotonic() - waited < RELOAD_WAIT:
                # A reload mid-session: the old page's session stops at its next step.
                yield key, status_line("Stopping the session the reload cut short…", "busy"), \
                    *[gr.skip()] * (len(session_outputs) + len(restored))  # fmt: skip
                time.sleep(0.25)
            note = core.take_interrupted(page)
            outputs = list(views.sessions(page))
            if ws.chat_version is not None and ws.chat_version <= len(ws.history):
                outputs[3] = {**outputs[3], "value": ws.chat_version}  # the chat's picker
            if note:
                message = status_line(note["message"], "stopped")
            elif ws.busy:
                message = status_line("A session is running in another tab of this browser.")
            elif len(ws.history) or ws.uploads:
                n = len(ws.history)
                message = status_line(
                    f"Welcome back: your {n} session{'s' if n != 1 else ''} and your data are "
                    "as you left them."
                )
            else:
                message = status_line(READY) if served_loading else gr.skip()
            yield key, message, *outputs, *tab_teach.restore(core, views, teach, ws, note)

        demo.load(
            on_load,
            [browser_key],
            [browser_key, status, *session_outputs, *restored],
            # The status line stays readable (it says the model is loading, while it loads):
            # the pending overlay goes on the Teach tab's restored controls only.
            show_progress_on=list(restored),
            **PRIVATE,
            **LIGHT,
        )

        # While a Train press waits for the model lane, the status line says where it stands
        # (Gradio's own overlay shows its queue, not how long our sessions take).
        queue_timer = gr.Timer(1.0, active=False)

        def on_wait(request: gr.Request):
            note = core.queue_note(key_of(request))
            if note is None:
                return gr.skip(), gr.Timer(active=False)
            return status_line(note, "busy"), gr.skip()

        teach.train_btn.click(
            lambda: gr.Timer(active=True), None, queue_timer, queue=False, **PRIVATE
        )
        queue_timer.tick(
            on_wait, None, [status, queue_timer], show_progress="hidden", **PRIVATE, **LIGHT
        )

        # A roll back or a history upload changes the model under the Teach tab's results:
        # they are cleared there (the Sessions tab has the history's own numbers).
        stale = [teach.metrics, teach.curves, teach.scores]
        sessions.confirm_yes.click(
            lambda: views.cleared("Rolled back: the last results shown here were removed."),
            None, stale, queue=False, **PRIVATE,
        )  # fmt: skip
        sessions.upload_history.upload(
            lambda: views.cleared("A history file was loaded: train a session to see TI and CC."),
            None, stale, queue=False, **PRIVATE,
        )  # fmt: skip

        def on_version(value, request: gr.Request):
            core.set_chat_version(key_of(request), value)

        chat.version.change(on_version, [chat.version], None, queue=False, **PRIVATE)

        def on_unload(request: gr.Request):
            core.close(key_of(request))

        demo.unload(on_unload)

        compare_ui.wire(compare_tab, core, status, session_outputs, views, GPU)
        api.add_api(core)
        compare_ui.add_api(core, GPU)

    demo.queue(default_concurrency_limit=4, max_size=256)
    return demo


# ---- starting the app --------------------------------------------------------------------------
def create(
    model: str | None = None,
    domains_dir: str | None = None,
    control_dirs: list[str] | None = None,
    device: str | None = None,
    clip: str | None = None,
    *,
    load_later: bool = False,
) -> gr.Blocks:
    """The app for `model`. `load_later`: where the model is a bundle folder (the offline
    toy), build the page from its config files alone and leave the weights to
    `demo.lorsu_core.load(demo.lorsu_loader)`, so that the page is served while they load."""
    model = model or env_model(default_model())

    def loader():
        return engine.load_model(model, device=device, clip=clip)

    info = bundle_info(model, device=device, clip=clip) if load_later else None
    if info is None:
        core = AppCore(*loader(), domains_dir, control_dirs)
    else:
        core = AppCore(None, None, domains_dir, control_dirs, info=info)
    demo = build_app(core)
    demo.lorsu_core, demo.lorsu_loader = core, loader
    return demo


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
    clip = getattr(args, "clip", None)
    try:
        demo = create(model, args.domains, args.control, args.device, clip, load_later=True)
    except BundleError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    host = args.host or os.environ.get("GRADIO_SERVER_NAME")
    port = args.port or (int(os.environ["GRADIO_SERVER_PORT"]) if _env_port() else None)
    core = demo.lorsu_core
    if core.ready:
        log.info("Model loaded; %s.", text.READY_LOG)
        launch(demo, host=host, port=port)
        return 0
    # Served first, loaded after: the page is up while most of transformers imports and the
    # weights load, and whatever needs the model waits for it.
    launch(demo, host=host, port=port, prevent_thread_lock=True)
    started = time.perf_counter()
    try:
        core.load(demo.lorsu_loader)
    except BundleError as err:
        print(f"error: {err}", file=sys.stderr)
        demo.close()
        return 2
    log.info("Model loaded in %.1f s; %s.", time.perf_counter() - started, text.READY_LOG)
    demo.block_thread()
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
