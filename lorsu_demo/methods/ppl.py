"""LoRSU-Ppl (SPEC section 3): LoRSU trained with the VLM's own answer loss.

The loss is the cross-entropy of the answer "This is a {class}" after the prompt
"<image>\\nBased on the image, respond to this question with a short answer: {question}",
backpropagated through the frozen LLM and projector into the encoder (`vqa.answer_loss`, the
"ppl" objective). The head scores and fc1 masks come from the gradient of that same loss.
Only the layers LLaVA reads are adapted (0..L-2 for LLaVA-1.5, which reads layer -2): the last
layer cannot change an answer, so the answer loss gives it no gradient. The q/k/v biases stay
frozen and there is no LoRA on CLIP's visual projection (the VLM never uses it).
"""

from __future__ import annotations

from ..vqa import DEFAULT_QUESTION
from . import register
from .lorsu import LoRSU


@register
class LoRSUPpl(LoRSU):
    name = "lorsu-ppl"
    summary = "LoRSU trained with the VLM's answer loss through the frozen LLM (far more compute)"
    # llm_chunk: images per pass through the LLM (memory only; the gradient is the same).
    defaults = {**LoRSU.defaults, "question": DEFAULT_QUESTION, "llm_chunk": 4}
    objective = "ppl"
    train_biases = False
    train_projection = False

    def adapted_layers(self, bundle) -> list[int]:
        return list(range(bundle.layers_read_by_vlm))

    def attention_count(self, rows: int, width: int, out_rows: int) -> int:
        """Their LLaVA code counts q, k and v apart: 3 x min(mask size, r * 2D) per layer."""
        return 3 * min(rows * width, self.hp["rank"] * (width + out_rows))
