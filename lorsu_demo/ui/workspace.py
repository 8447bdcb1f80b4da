"""Per-browser-session state and the example data, without Gradio.

Each browser session (Gradio's `request.session_hash`) gets a `Workspace`: its own history of
sessions (a stack of deltas over the shared model), its uploaded data, a stop flag. Workspaces
live in a `Store` on the server, never in `gr.State` (which deep-copies its value on every event);
the app drops a workspace when its tab closes (`demo.unload`) and sweeps idle ones.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..data import DataError, Domain, LabelledImages, load_domain
from ..evaluate import EvalSet
from ..history import History
from ..stack import FoldCache
from .engine import Probe

IDLE_SECONDS = 6 * 3600
PROBES = 5


@dataclass
class Dataset:
    """Data a session can train on: a domain and its test set as an EvalSet (pixels cached)."""

    name: str
    title: str
    domain: Domain
    target: EvalSet
    example: bool = False
    description: str = ""

    @classmethod
    def of(cls, domain: Domain, title: str, example: bool = False, description: str = ""):
        target = EvalSet(domain.name, domain.test, domain.classes, domain.templates)
        return cls(domain.name, title, domain, target, example, description)

    @property
    def classes(self) -> list[str]:
        return self.domain.classes

    def max_shots(self) -> int:
        counts = self.domain.train.counts()
        return min(counts.values()) if counts else 0

    def session_images(self, shots: int, seed: int) -> LabelledImages:
        """`shots` training images per class, drawn with a seed (another session, other draws)."""
        rng = random.Random(seed)
        items = []
        for label in self.domain.train.classes:
            pool = [i for i in self.domain.train.items if i.label == label]
            rng.shuffle(pool)
            items += pool[:shots]
        return LabelledImages(f"{self.name} ({shots} per class)", items)

    def probes(self, count: int = PROBES) -> list[Probe]:
        """A few test images of different classes, the same ones every time."""
        classes = self.domain.test.classes
        if not classes:
            return []
        picks = sorted({round(i * len(classes) / count) for i in range(count)})
        probes = []
        for index in picks[:count]:
            label = classes[min(index, len(classes) - 1)]
            item = next(i for i in self.domain.test.items if i.label == label)
            probes.append(Probe(item.image, label))
        return probes


def read_title(folder: Path) -> tuple[str, str]:
    """(title, description) from a domain folder's README.md, when it has one."""
    readme = folder / "README.md"
    if not readme.exists():
        return folder.name, ""
    lines = [line.strip() for line in readme.read_text(errors="replace").splitlines()]
    title = next((line.lstrip("# ") for line in lines if line.startswith("#")), folder.name)
    body = []
    for line in lines[1:]:
        if not line and body:
            break
        if line and not line.startswith(("#", "-")):
            body.append(line)
    return title, " ".join(body)


class Examples:
    """The example domains (`assets/domains/*`), loaded on first use and shared read-only."""

    def __init__(self, folder: Path | None):
        self.folder = Path(folder) if folder else None
        self._loaded: dict[str, Dataset] = {}
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        if self.folder is None or not self.folder.is_dir():
            return []
        return sorted(
            p.name for p in self.folder.iterdir() if p.is_dir() and not p.name.startswith(".")
        )

    def titles(self) -> dict[str, str]:
        return {name: read_title(self.folder / name)[0] for name in self.names()}

    def get(self, name: str) -> Dataset:
        if name not in self.names():
            known = ", ".join(self.names()) or "none installed"
            raise DataError(f"There is no example domain {name!r} (examples: {known}).")
        with self._lock:
            if name not in self._loaded:
                folder = self.folder / name
                title, description = read_title(folder)
                domain = load_domain(folder)
                self._loaded[name] = Dataset.of(domain, title, True, description)
            return self._loaded[name]


@dataclass
class Workspace:
    key: str
    history: History
    uploads: dict[str, Dataset] = field(default_factory=dict)
    selected: str | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    busy: bool = False
    closed: bool = False  # its tab closed while a session ran; dropped when the session ends
    uploads_made: int = 0
    seen: float = field(default_factory=time.time)
    # The last comparison's sessions (not in the history until one is kept) and the history
    # they started from: {"start": ..., "records": {method: SessionRecord}}.
    compared: dict = field(default_factory=dict)
    # The history version last chatted with or exported, folded into one delta: a GPU call
    # ships and applies that instead of every session's delta (see lorsu_demo.stack).
    folds: FoldCache = field(default_factory=FoldCache)

    def touch(self) -> None:
        self.seen = time.time()


class Store:
    """Workspaces keyed by browser session."""

    def __init__(self, model_source: dict):
        self.model_source = dict(model_source)
        self._items: dict[str, Workspace] = {}
        self._lock = threading.Lock()

    def get(self, key: str | None) -> Workspace:
        key = key or "local"
        with self._lock:
            workspace = self._items.get(key)
            if workspace is None:
                workspace = Workspace(key, History(model=dict(self.model_source)))
                self._items[key] = workspace
            workspace.touch()
            return workspace

    def drop(self, key: str | None) -> None:
        with self._lock:
            workspace = self._items.get(key or "local")
            if workspace is not None and not workspace.busy:
                del self._items[key or "local"]
            elif workspace is not None:
                workspace.closed = True  # the running session stops and then drops it
                workspace.stop.set()

    def sweep(self, idle: float = IDLE_SECONDS) -> int:
        cutoff = time.time() - idle
        with self._lock:
            old = [k for k, w in self._items.items() if w.seen < cutoff and not w.busy]
            for key in old:
                del self._items[key]
            return len(old)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: str) -> bool:
        return key in self._items
