"""`python -m lorsu_demo app`: registers itself in `lorsu_demo.cli.EXTENSIONS` on import.

Importing this module does not import Gradio; the app is imported only when the command runs.
"""

from __future__ import annotations

from .. import cli as _cli
from ..model import OFFLINE_PRESET


def add_app_command(commands) -> None:
    parser = commands.add_parser(
        "app", help="serve the Gradio app (teach, watch, chat, roll back) in a browser"
    )
    add_arguments(parser)
    parser.set_defaults(func=_run)


def add_arguments(parser) -> None:
    """The app's options, for `python -m lorsu_demo app` and `python app.py` alike (here, so
    that registering the subcommand does not import gradio)."""
    parser.add_argument(
        "--model",
        default=None,
        help=f"preset, bundle folder or LLaVA folder (default: $LORSU_MODEL or {OFFLINE_PRESET})",
    )
    _cli.add_clip_argument(parser)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--domains", default=None, help="folder of example domains")
    parser.add_argument("--control", action="append", help="control set folder (repeatable)")
    parser.add_argument(
        "--host", default=None, help="address to serve on (default: $GRADIO_SERVER_NAME)"
    )
    parser.add_argument(
        "--port", type=int, default=None, help="port (default: $GRADIO_SERVER_PORT or 7860)"
    )


def _run(args) -> int:
    from .app import run

    return run(args)


if add_app_command not in _cli.EXTENSIONS:
    _cli.EXTENSIONS.append(add_app_command)
