"""The Chat tab: an image and a question to any version of the history, beside the base model."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from html import escape
from pathlib import Path

import gradio as gr

from ..vqa import DEFAULT_QUESTION, mc_prompt
from . import bars, figures, text
from .common import GPU, PRIVATE, key_of, status_line
from .core import AppCore, UserError
from .engine import PROBE_QUESTION

log = logging.getLogger("lorsu_demo.ui")

QUESTION_EXAMPLES = [
    PROBE_QUESTION,
    "Is this a seven?",
    mc_prompt(DEFAULT_QUESTION, ["circle", "star", "heart", "arrow", "square"]),
]


@dataclass
class ChatTab:
    chat_image: gr.File
    chat_preview: gr.Image
    question: gr.Textbox
    version: gr.Dropdown
    with_base: gr.Checkbox
    ask_btn: gr.Button
    adapted_out: gr.Textbox
    base_out: gr.Textbox
    confidence: gr.HTML


def build(core: AppCore) -> ChatTab:
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
            with_base = gr.Checkbox(value=True, label="Also ask the untouched base model")
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
            gr.Markdown("**How sure is each model?**")
            confidence = gr.HTML(
                '<div class="lorsu-small">Ask about an image to see each class\'s '
                "probability, for your version and the base model.</div>",
                elem_id="lorsu-confidence",
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
    return ChatTab(
        chat_image=chat_image,
        chat_preview=chat_preview,
        question=question,
        version=version,
        with_base=with_base,
        ask_btn=ask_btn,
        adapted_out=adapted_out,
        base_out=base_out,
        confidence=confidence,
    )


def wire(tab: ChatTab, core: AppCore, status) -> None:
    chat_image = tab.chat_image
    chat_preview = tab.chat_preview
    question = tab.question
    version = tab.version
    with_base = tab.with_base
    ask_btn = tab.ask_btn
    adapted_out = tab.adapted_out
    base_out = tab.base_out
    confidence = tab.confidence

    def on_ask(image, question_text, version_value, base_too, request: gr.Request):
        key = key_of(request)
        try:
            chosen = core.version(core.workspace(key), version_value)
            who = "the base model" if chosen == 0 else f"session {chosen}"
            yield status_line(f"Asking {who}…", "busy"), "", "", ""
            sure = ""
            # one model call: the answers as they grow, then how sure each model is
            for which, value in core.ask(key, image, question_text, chosen, base_too):
                if which == "adapted":
                    yield gr.skip(), value, gr.skip(), gr.skip()
                elif which == "base":
                    yield status_line("Reading how sure each model is…", "busy"), gr.skip(), \
                        value, gr.skip()  # fmt: skip
                elif which == "confidence":
                    sure = bars.confidence_html(value)
                else:  # the answers stand; only the bars are missing
                    sure = f'<div class="lorsu-small">{escape(value)}</div>'
            yield status_line(f"Answered by {who}.", "done"), gr.skip(), gr.skip(), sure
        except UserError as err:
            yield status_line(str(err), "error"), gr.skip(), gr.skip(), gr.skip()
        except Exception as err:
            log.exception("chat failed")
            yield status_line(f"The model could not answer ({type(err).__name__}).", "error"), \
                gr.skip(), gr.skip(), gr.skip()  # fmt: skip

    def on_chat_image(path):
        """Show the chosen image as the model will see it, or say why it cannot be used."""
        if not path:
            return None, gr.skip()
        try:
            shown = figures.for_display(core.chat_image(path))
            return shown, status_line("Image ready: ask a question.", "info")
        except UserError as err:
            return None, status_line(str(err), "error")

    chat_image.change(on_chat_image, [chat_image], [chat_preview, status], **PRIVATE)

    chat_inputs = [chat_image, question, version, with_base]
    for trigger in (ask_btn.click, question.submit):
        trigger(
            on_ask,
            chat_inputs,
            [status, adapted_out, base_out, confidence],
            show_progress="full",
            show_progress_on=[status],
            **GPU,
            **PRIVATE,
        )


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
