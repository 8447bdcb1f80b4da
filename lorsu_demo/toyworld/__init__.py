"""The offline toy world: a tiny CLIP + LLaVA pair trained here from nothing, and its domains.

The base world is clean, printed-looking digits and filled shapes on light backgrounds; the
tiny models learn the class words there. Each example domain shows the same kinds of classes in
a style the image encoder never saw (real handwriting, seven-segment displays, pencil sketches),
which mirrors LoRSU's premise: the language side knows the words, the image encoder fails on the
new look. `data` makes every image (deterministic for a seed); `train` is the recipe that writes
`assets/`.
"""

from lorsu_demo.toyworld.data import (
    BASE_CLASSES,
    DIGITS,
    DOMAINS,
    IMAGE_SIZE,
    SHAPES,
    base_dataset,
    control_dataset,
    domain_dataset,
)

__all__ = [
    "BASE_CLASSES",
    "DIGITS",
    "DOMAINS",
    "IMAGE_SIZE",
    "SHAPES",
    "base_dataset",
    "control_dataset",
    "domain_dataset",
]
