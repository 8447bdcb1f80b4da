"""Events of long operations. The CLI prints them, the UI draws them and the tests read them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Event:
    kind = "event"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **{k: v for k, v in asdict(self).items() if k != "record"}}


@dataclass
class Phase(Event):
    """A new phase began: "base", "scoring", "training", "evaluating", "merging"."""

    name: str
    message: str
    kind = "phase"


@dataclass
class Scores(Event):
    """Importance scores of the heads (layers x heads) and what the method selected."""

    head_scores: list[list[float]] | None
    selected_heads: list[list[int]]
    fc1_density: list[float]
    layers_read: int
    kind = "scores"


@dataclass
class Step(Event):
    step: int
    total: int
    epoch: int
    loss: float
    lr: float
    kind = "step"


@dataclass
class Metrics(Event):
    step: int
    accuracies: dict[str, float]
    target_acc: float
    control_acc: float
    ti: float
    cc: float
    kind = "metrics"


@dataclass
class Done(Event):
    """The session finished; `record` is the SessionRecord to append to the history."""

    message: str
    record: Any = field(default=None, repr=False)
    kind = "done"


@dataclass
class Stopped(Event):
    message: str
    kind = "stopped"
