"""Per-browser state and the example data, without Gradio.

Each browser gets a `Workspace`: its own history of sessions (a stack of deltas over the shared
model), its uploaded data, a stop flag. Workspaces live in a `Store` on the server, never in
`gr.State` (which deep-copies its value on every event). A workspace is keyed by Gradio's
`request.session_hash` (one page load) until the page attaches a browser key (a random token
kept in the browser's localStorage with `gr.BrowserState`): from then on that tab, its reloads
and the browser's other tabs share one workspace, which `DiskStore` keeps on disk so that it
survives a reload and a server restart, and sweeps after idle hours. Only the key ever reaches
the browser; histories and images stay on the server.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import secrets
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..data import DataError, Domain, Item, LabelledImages, load_domain
from ..evaluate import EvalSet
from ..history import History, HistoryError
from ..stack import FoldCache
from .engine import PROBES, Probe

log = logging.getLogger("lorsu_demo.ui")

IDLE_SECONDS = 6 * 3600
PROBE_POOL = 30  # images answered once per session to pick the probes from
PROBE_POOL_PER_CLASS = 3
# A browser key: what `new_browser_key` makes (32 bytes, URL-safe base64). Anything else a
# browser sends is ignored and replaced, so a key never names a path or grows unbounded.
BROWSER_KEY = re.compile(r"[A-Za-z0-9_-]{43}")


def idle_seconds() -> float:
    """How long an untouched workspace is kept: LORSU_WORKSPACE_HOURS (default 6)."""
    raw = os.environ.get("LORSU_WORKSPACE_HOURS", "")
    try:
        hours = float(raw) if raw else IDLE_SECONDS / 3600
    except ValueError:
        log.warning("LORSU_WORKSPACE_HOURS=%r is not a number; keeping workspaces 6 hours", raw)
        hours = IDLE_SECONDS / 3600
    return max(0.0, hours) * 3600


def default_state_dir() -> Path:
    """LORSU_STATE_DIR, else $XDG_STATE_HOME/lorsu-demo (~/.local/state/lorsu-demo)."""
    if os.environ.get("LORSU_STATE_DIR"):
        return Path(os.environ["LORSU_STATE_DIR"]).expanduser()
    base = os.environ.get("XDG_STATE_HOME") or "~/.local/state"
    return Path(base).expanduser() / "lorsu-demo"


def browser_secret(state_dir: Path) -> str:
    """The secret `gr.BrowserState` encrypts the browser key with. It must not change across
    restarts, or every browser's stored key becomes unreadable: LORSU_BROWSER_SECRET, else a
    file in the state folder made once, readable by this user only (0600)."""
    if os.environ.get("LORSU_BROWSER_SECRET"):
        return os.environ["LORSU_BROWSER_SECRET"]
    path = Path(state_dir) / "browser-secret"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        secret = path.read_text().strip()
        if secret:
            return secret
        raise RuntimeError(
            f"{path} is empty: delete it (a new secret is made) or fill it."
        ) from None
    with os.fdopen(fd, "w") as handle:
        secret = secrets.token_urlsafe(32)
        handle.write(secret)
    return secret


def new_browser_key() -> str:
    return secrets.token_urlsafe(32)


def valid_browser_key(value) -> str | None:
    return value if isinstance(value, str) and BROWSER_KEY.fullmatch(value) else None


@dataclass
class Dataset:
    """Data a session can train on: a domain and its test set as an EvalSet (pixels cached)."""

    name: str
    title: str
    domain: Domain
    target: EvalSet
    example: bool = False
    description: str = ""
    from_cards: bool = False  # made with the class cards: a reload puts the cards back

    @classmethod
    def of(
        cls,
        domain: Domain,
        title: str,
        example: bool = False,
        description: str = "",
        from_cards: bool = False,
    ):
        target = EvalSet(domain.name, domain.test, domain.classes, domain.templates)
        return cls(domain.name, title, domain, target, example, description, from_cards)

    def card_images(self) -> dict[str, list]:
        """Every kept image of each class (train, then test), as the class cards held them."""
        cards: dict[str, list] = {label: [] for label in self.classes}
        for item in [*self.domain.train.items, *self.domain.test.items]:
            cards.setdefault(item.label, []).append(item.image)
        return cards

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
        """What the probe table shows before a session: the pool's first images, of different
        classes."""
        return self.probe_pool()[:count]

    def probe_pool(self, per_class: int = PROBE_POOL_PER_CLASS, most: int = PROBE_POOL) -> list:
        """Test images a session picks its probes from (`engine.pick_probes`), the same ones
        every time: round by round, the next test image of each class, with classes in an
        order that spreads the first `PROBES` over the class list."""
        classes = self.domain.test.classes
        if not classes:
            return []
        spread = sorted({round(i * len(classes) / PROBES) for i in range(PROBES)})
        order = list(dict.fromkeys(classes[min(i, len(classes) - 1)] for i in spread))
        order += [label for label in classes if label not in order]
        by_class = {label: [] for label in order}
        for item in self.domain.test.items:
            by_class[item.label].append(item)
        pool = []
        for round_ in range(per_class):
            for label in order:
                if round_ < len(by_class[label]):
                    pool.append(Probe(by_class[label][round_].image, label))
        return pool[:most]


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
    persistent: bool = False  # keyed by a browser key, kept on disk (see DiskStore)
    runner: str | None = None  # the page (session_hash) whose session is running
    # The Chat tab's version picker, and a session a reload cut short (its inputs, to put
    # back on the page and say what happened); both kept on disk with the workspace.
    chat_version: int | None = None
    interrupted: dict | None = None

    def touch(self) -> None:
        self.seen = time.time()

    def empty(self) -> bool:
        """Nothing worth keeping: no sessions, uploads, picked data or note."""
        return not (len(self.history) or self.uploads or self.selected or self.interrupted)


class DiskStore:
    """Workspaces on disk, one folder each, named by a digest of the browser key (the key
    itself is never written): `meta.json`, `history.lorsu` (the history file format, checked
    on load as an upload is), and `uploads/<n>/` (the upload's images as PNG and a manifest)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def folder(self, key: str) -> Path:
        return self.root / hashlib.sha256(key.encode()).hexdigest()[:32]

    def save(self, ws: Workspace, history: bool = True) -> None:
        """Write the workspace; `history=False` only its small state (the history file can be
        large, and a picked version or a note does not change it)."""
        folder = self.folder(ws.key)
        folder.mkdir(parents=True, exist_ok=True)
        if history or not (folder / "history.lorsu").exists():
            ws.history.save(folder / "history.lorsu")
        names = []
        for index, (name, data) in enumerate(ws.uploads.items()):
            names.append(name)
            where = folder / "uploads" / str(index)
            if (
                not (where / "manifest.json").exists()
                or _read_json(where / "manifest.json").get("name") != name
            ):
                _write_upload(where, data)
        for stale in (folder / "uploads").glob("*") if (folder / "uploads").is_dir() else []:
            if not stale.name.isdigit() or int(stale.name) >= len(names):
                shutil.rmtree(stale, ignore_errors=True)
        meta = {
            "seen": ws.seen,
            "selected": ws.selected,
            "uploads": names,
            "uploads_made": ws.uploads_made,
            "chat_version": ws.chat_version,
            "interrupted": ws.interrupted,
        }
        _write_json(folder / "meta.json", meta)

    def load(self, key: str, check=None) -> Workspace | None:
        """The workspace saved under `key`, or None when there is none (or it cannot be used:
        then it is logged and removed, and the browser starts afresh). `check(history)` may
        raise HistoryError, e.g. when the history was made on another model."""
        folder = self.folder(key)
        if not (folder / "meta.json").exists():
            return None
        try:
            meta = _read_json(folder / "meta.json")
            history = History.load(folder / "history.lorsu")
            if check is not None:
                check(history)
            uploads = {}
            for index, name in enumerate(meta.get("uploads", [])):
                uploads[name] = _read_upload(folder / "uploads" / str(index))
        except (HistoryError, DataError, OSError, ValueError, KeyError, TypeError) as err:
            log.warning("a saved workspace could not be read (%s); starting afresh", err)
            shutil.rmtree(folder, ignore_errors=True)
            return None
        ws = Workspace(key, history, uploads=uploads, persistent=True)
        selected = meta.get("selected")
        ws.selected = selected if isinstance(selected, str) else None
        ws.uploads_made = int(meta.get("uploads_made") or len(uploads))
        version = meta.get("chat_version")
        ws.chat_version = version if isinstance(version, int) else None
        ws.interrupted = (
            meta.get("interrupted") if isinstance(meta.get("interrupted"), dict) else None
        )
        return ws

    def sweep(self, idle: float, keep=()) -> int:
        """Remove workspaces untouched for `idle` seconds (except the folders in `keep`)."""
        if not self.root.is_dir():
            return 0
        cutoff, removed = time.time() - idle, 0
        for folder in self.root.iterdir():
            if not folder.is_dir() or folder in keep:
                continue
            meta = folder / "meta.json"
            try:
                seen = float(_read_json(meta).get("seen", 0))
            except (OSError, ValueError, TypeError, AttributeError):
                seen = folder.stat().st_mtime
            if seen < cutoff:
                shutil.rmtree(folder, ignore_errors=True)
                removed += 1
        return removed


def _write_json(path: Path, value) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value))
    tmp.replace(path)  # a crash mid-write leaves the old file, never half of one


def _read_json(path: Path) -> dict:
    value = json.loads(path.read_text())
    if not isinstance(value, dict):
        raise ValueError(f"{path.name} is not a JSON object")
    return value


def _write_upload(where: Path, data: Dataset) -> None:
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True)
    parts = {}
    for part, images in (("train", data.domain.train), ("test", data.domain.test)):
        rows = []
        for i, item in enumerate(images.items):
            file = f"{part}-{i:05d}.png"
            item.image.save(where / file)
            rows.append([file, item.label, item.source])
        parts[part] = rows
    manifest = {"name": data.name, "title": data.title, "description": data.description}
    manifest["from_cards"] = data.from_cards
    _write_json(where / "manifest.json", {**manifest, **parts})


def _read_upload(where: Path) -> Dataset:
    manifest = _read_json(where / "manifest.json")
    parts = {}
    for part in ("train", "test"):
        items = []
        for file, label, source in manifest[part]:
            with Image.open(where / Path(file).name) as image:
                image.load()
                items.append(Item(image.copy(), str(label), str(source)))
        parts[part] = LabelledImages(f"{manifest['name']}/{part}", items)
    domain = Domain(str(manifest["name"]), parts["train"], parts["test"])
    return Dataset.of(
        domain,
        str(manifest["title"]),
        description=str(manifest["description"]),
        from_cards=manifest.get("from_cards") is True,
    )


class Store:
    """Workspaces by key: a page's `session_hash`, or the browser key it attached (`attach`);
    the latter are saved to `disk` (when there is one) and read back after a restart."""

    def __init__(self, model_source: dict, disk: DiskStore | None = None, check=None):
        self.model_source = dict(model_source)
        self.disk = disk
        self.check = check  # check(history) before a saved history is used again
        self._items: dict[str, Workspace] = {}
        self._alias: dict[str, str] = {}  # session_hash -> browser key
        self._lock = threading.RLock()

    def resolve(self, key: str | None) -> str:
        key = key or "local"
        return self._alias.get(key, key)

    def get(self, key: str | None) -> Workspace:
        with self._lock:
            key = self.resolve(key)
            workspace = self._items.get(key)
            if workspace is None:
                workspace = Workspace(key, History(model=dict(self.model_source)))
                self._items[key] = workspace
            workspace.touch()
            return workspace

    def attach(self, page: str | None, browser_key: str) -> Workspace:
        """From now on `page` (a session_hash) uses the workspace of `browser_key`, read from
        disk when this process has not seen it (a server restart)."""
        page = page or "local"
        with self._lock:
            own = self._items.get(page)
            if own is not None and not own.busy and page != browser_key:
                del self._items[page]  # what the page did before it attached (nothing, usually)
            self._alias[page] = browser_key
            workspace = self._items.get(browser_key)
            if workspace is None and self.disk is not None:
                workspace = self.disk.load(browser_key, self.check)
                if workspace is not None:
                    workspace.touch()
                    self.save(workspace, history=False)  # a visit restarts the idle clock
            if workspace is None:
                workspace = Workspace(browser_key, History(model=dict(self.model_source)))
            workspace.persistent = True
            self._items[browser_key] = workspace
            workspace.touch()
            return workspace

    def save(self, workspace: Workspace, history: bool = True) -> None:
        """Write a browser's workspace to disk (nothing for a page-only one)."""
        if not workspace.persistent or self.disk is None:
            return
        if workspace.empty() and not self.disk.folder(workspace.key).exists():
            return  # a page load alone writes nothing (a script reloading cannot fill the disk)
        with self._lock:
            try:
                self.disk.save(workspace, history)
            except OSError as err:  # a full disk must not break the page; the memory copy stays
                log.warning("workspace could not be saved: %s", err)

    def drop(self, key: str | None) -> None:
        """A page closed (or reloaded). A page-only workspace is forgotten; a browser's is
        saved and leaves memory once no page uses it. A session the page was running is
        stopped either way (`closed`: the session's end finishes the job)."""
        key = key or "local"
        with self._lock:
            target = self._alias.pop(key, key)
            workspace = self._items.get(target)
            if workspace is None:
                return
            if workspace.busy:
                if workspace.runner in (None, key, target):
                    workspace.closed = True  # the running session stops and then drops it
                    workspace.stop.set()
                return
            workspace.closed = False
            if workspace.persistent:
                self.save(workspace)
                if target in self._alias.values():
                    return  # another tab of the same browser still uses it
            del self._items[target]

    def sweep(self, idle: float = IDLE_SECONDS) -> int:
        cutoff = time.time() - idle
        with self._lock:
            old = [k for k, w in self._items.items() if w.seen < cutoff and not w.busy]
            for key in old:
                del self._items[key]
                for page in [p for p, k in self._alias.items() if k == key]:
                    del self._alias[page]
            removed = len(old)
            if self.disk is not None:
                keep = {self.disk.folder(k) for k, w in self._items.items() if w.persistent}
                removed += self.disk.sweep(idle, keep)
            return removed

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: str) -> bool:
        return self.resolve(key) in self._items
