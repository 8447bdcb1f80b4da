"""Session history: a stack of deltas over the untouched base model, saved as one file.

The file is a safetensors file: the tensors of every delta (and each method's carried state),
with a JSON manifest (format, version, model, metrics, a SHA-256 per tensor) in its metadata.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .delta import Delta, DeltaError, Patch, Region
from .evaluate import AccuracyMatrix

FORMAT = "lorsu-demo-history"
VERSION = 1


class HistoryError(ValueError):
    """A history file that cannot be used, with a message that says why."""


class _BadField(Exception):
    """A manifest field of the wrong type; `History.load` adds the file's name."""


@dataclass
class SessionRecord:
    index: int
    method: str
    settings: dict
    target: str
    classes: list[str]
    shots: int
    images: int
    seed: int
    delta: Delta
    accuracies: dict[str, float]
    ti: float
    cc: float
    controls: list[str]
    trained_sets: list[str]
    head_scores: list[list[float]] | None
    selected_heads: list[list[int]]
    layers_read: int
    fc1_density: list[float]
    trainable_params: int
    seconds: dict[str, float]
    curve: list[dict] = field(default_factory=list)
    carry: dict[str, torch.Tensor] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    created: float = field(default_factory=time.time)

    @property
    def delta_bytes(self) -> int:
        return self.delta.nbytes

    def summary(self) -> dict:
        """Everything but tensors, JSON-ready."""
        return {
            "index": self.index,
            "method": self.method,
            "settings": self.settings,
            "target": self.target,
            "classes": self.classes,
            "shots": self.shots,
            "images": self.images,
            "seed": self.seed,
            "target_acc": self.accuracies.get(self.target),
            "control_acc": _mean([self.accuracies[c] for c in self.controls]),
            "accuracies": self.accuracies,
            "ti": self.ti,
            "cc": self.cc,
            "controls": self.controls,
            "trained_sets": self.trained_sets,
            "head_scores": self.head_scores,
            "selected_heads": self.selected_heads,
            "layers_read": self.layers_read,
            "fc1_density": self.fc1_density,
            "trainable_params": self.trainable_params,
            "delta_bytes": self.delta_bytes,
            "changed_values": self.delta.changed_values,
            "seconds": self.seconds,
            "curve": self.curve,
            "extra": self.extra,
            "created": self.created,
        }


def _mean(values):
    return sum(values) / len(values) if values else None


@dataclass
class History:
    model: dict = field(default_factory=dict)  # how to load the base model again (bundle.source)
    base: dict[str, float] = field(default_factory=dict)  # accuracies of the untouched model
    sessions: list[SessionRecord] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.sessions)

    def deltas(self, upto: int | None = None) -> list[Delta]:
        """The deltas of sessions 1..upto (all when None); 0 is the base model."""
        upto = len(self.sessions) if upto is None else upto
        self._check_index(upto)
        return [s.delta for s in self.sessions[:upto]]

    def _check_index(self, index: int) -> None:
        if not 0 <= index <= len(self.sessions):
            raise HistoryError(
                f"There is no session {index}: choose 0 (the base model) to {len(self.sessions)}."
            )

    def append(self, record: SessionRecord) -> None:
        if record.index != len(self.sessions) + 1:
            raise HistoryError(
                f"session {record.index} does not follow session {len(self.sessions)}"
            )
        for name, value in record.extra.get("base", {}).items():
            self.base.setdefault(name, value)
        self.sessions.append(record)

    def rollback(self, index: int) -> list[SessionRecord]:
        """Keep sessions 1..index; return the ones dropped."""
        self._check_index(index)
        dropped = self.sessions[index:]
        del self.sessions[index:]
        return dropped

    def accuracies_after(self, index: int) -> dict[str, float]:
        self._check_index(index)
        return (
            dict(self.base) if index == 0 else {**self.base, **self.sessions[index - 1].accuracies}
        )

    def carry_for(self, method: str) -> dict[str, torch.Tensor]:
        for record in reversed(self.sessions):
            if record.method == method and record.carry:
                return record.carry
        return {}

    def matrix(self) -> AccuracyMatrix:
        trained = {}
        rows = []
        for record in self.sessions:
            for name in record.trained_sets:
                trained.setdefault(name, record.index)
            rows.append(record.accuracies)
        return AccuracyMatrix.from_history(self.base, rows, trained)

    def table(self) -> list[dict]:
        return [
            {
                "session": s.index,
                "method": s.method,
                "target": s.target,
                "classes": ", ".join(s.classes),
                "shots": s.shots,
                "target_acc": s.accuracies.get(s.target),
                "ti": s.ti,
                "cc": s.cc,
                "delta_kb": s.delta_bytes / 1024,
                "seconds": sum(s.seconds.values()),
            }
            for s in self.sessions
        ]

    # ---- one file -------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        path = Path(path)
        tensors: dict[str, torch.Tensor] = {}
        sessions = []
        for record in self.sessions:
            prefix = f"s{record.index}"
            delta_index = {}
            for name, patch in record.delta.items():
                region = patch.region
                key = f"{prefix}/delta/{name}"
                tensors[f"{key}/values"] = patch.values
                if region.rows is not None:
                    tensors[f"{key}/rows"] = region.rows
                if region.bits is not None:
                    tensors[f"{key}/bits"] = region.bits
                delta_index[name] = {"kind": region.kind, "shape": list(region.shape)}
            for name, tensor in record.carry.items():
                tensors[f"{prefix}/carry/{name}"] = tensor
            sessions.append(
                {**record.summary(), "delta": delta_index, "carry": sorted(record.carry)}
            )
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        manifest = {
            "model": self.model,
            "base": self.base,
            "sessions": sessions,
            "sha256": {k: _digest(v) for k, v in tensors.items()},
        }
        metadata = {"format": FORMAT, "version": str(VERSION), "manifest": json.dumps(manifest)}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=metadata)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> History:
        path = Path(path)
        name = path.name
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                if metadata.get("format") != FORMAT:
                    raise HistoryError(f"{name} is not a lorsu-demo history file.")
                if metadata.get("version") != str(VERSION):
                    raise HistoryError(
                        f"{name} has history format version {metadata.get('version')}; this "
                        f"lorsu-demo reads version {VERSION}. Use a matching lorsu-demo release."
                    )
                manifest = json.loads(metadata["manifest"])
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except HistoryError:
            raise
        except FileNotFoundError as err:
            raise HistoryError(f"{path} does not exist.") from err
        except (SafetensorError, OSError, json.JSONDecodeError, KeyError, ValueError) as err:
            raise HistoryError(
                f"{name} is damaged, truncated or not a lorsu-demo history file ({_short(err)})."
            ) from err
        try:
            return cls._from_manifest(manifest, tensors, name)
        except HistoryError:  # already says what is wrong; a ValueError too, so not wrapped again
            raise
        except _BadField as err:
            raise HistoryError(f"{name} has an inconsistent manifest: {err}") from None
        except DeltaError as err:
            raise HistoryError(f"{name} is damaged or crafted: {err}") from None
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
            raise HistoryError(f"{name} has an inconsistent manifest ({_short(err)}).") from None

    @classmethod
    def _from_manifest(cls, manifest: dict, tensors: dict, name: str) -> History:
        """Every field and tensor checked before a record is built, so a history that loads
        can be listed, charted and applied (`Delta.check` again against the model)."""
        _expect(manifest, dict, "the manifest")
        digests = _expect(manifest.get("sha256"), dict, "sha256")
        if set(digests) != set(tensors):
            raise HistoryError(f"{name} is damaged: its tensors do not match its manifest.")
        for key, tensor in tensors.items():
            if _digest(tensor) != digests[key]:
                raise HistoryError(f"{name} is damaged: tensor {_clip(key)} fails its checksum.")
        history = cls(
            model=_expect(manifest.get("model"), dict, "model"),
            base=_scores(manifest.get("base"), "base"),
        )
        fields = set(SessionRecord.__dataclass_fields__)
        sessions = _expect(manifest.get("sessions"), list, "sessions")
        for number, entry in enumerate(sessions, 1):
            _check_entry(entry, number)
            prefix = f"s{number}"
            delta = Delta()
            for param, info in entry["delta"].items():
                where = f"session {number}, parameter {_clip(param)}"
                _expect(info, dict, where)
                key = f"{prefix}/delta/{param}"
                shape = _expect(info.get("shape"), list, f"{where} shape")
                region = Region(
                    info.get("kind"),
                    tuple(shape),
                    rows=tensors.get(f"{key}/rows"),
                    bits=tensors.get(f"{key}/bits"),
                )
                values = tensors.get(f"{key}/values")
                region.check(values, where)
                delta[param] = Patch(region, values)
            carry = {}
            for c in entry["carry"]:
                tensor = tensors.get(f"{prefix}/carry/{c}")
                if tensor is None or not tensor.is_floating_point() or tensor.dim() > 4:
                    raise HistoryError(f"{name}: session {number} carries a bad tensor {_clip(c)}.")
                if not bool(torch.isfinite(tensor).all()):
                    raise HistoryError(f"{name}: session {number} carries NaN or infinite values.")
                carry[c] = tensor
            values = {k: v for k, v in entry.items() if k in fields}
            history.append(SessionRecord(**{**values, "delta": delta, "carry": carry}))
        return history


# ---- checking a manifest -------------------------------------------------------------------
def _clip(text, limit: int = 60) -> str:
    """Names from a file go into messages shortened: a crafted file's 5,000-character key must
    not become a 5,000-character message."""
    text = str(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _short(err: Exception) -> str:
    return _clip(f"{type(err).__name__}: {err}", 120)


def _expect(value, kind, what: str):
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        name = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise _BadField(f"its {what} is {type(value).__name__}, not {name}.")
    return value


def _number(value, what: str) -> float:
    return _expect(value, (int, float), what)


def _scores(value, what: str) -> dict:
    """{set name: accuracy}: names are text, accuracies numbers (NaN allowed, it means none)."""
    _expect(value, dict, what)
    for key, score in value.items():
        _number(score, f"{what} of {_clip(key)}")
    return value


def _strings(value, what: str) -> list:
    for item in _expect(value, list, what):
        _expect(item, str, f"{what} entry")
    return value


# Fields the app reads back (tables, charts, the next session), with the type each must have.
_ENTRY_TYPES = {
    "method": str,
    "settings": dict,
    "target": str,
    "shots": int,
    "images": int,
    "seed": int,
    "controls": list,
    "trained_sets": list,
    "selected_heads": list,
    "layers_read": int,
    "fc1_density": list,
    "trainable_params": int,
    "curve": list,
    "extra": dict,
    "delta": dict,
    "carry": list,
}


def _check_entry(entry, number: int) -> None:
    where = f"session {number}"
    _expect(entry, dict, where)
    if entry.get("index") != number or isinstance(entry.get("index"), bool):
        raise _BadField(f"its session {number} is numbered {_clip(entry.get('index'))!r}.")
    for key, kind in _ENTRY_TYPES.items():
        _expect(entry.get(key), kind, f"{where} {key}")
    _strings(entry["classes"], f"{where} classes")
    _strings(entry["controls"], f"{where} controls")
    _strings(entry["trained_sets"], f"{where} trained sets")
    _strings(entry["carry"], f"{where} carry")
    _scores(entry.get("accuracies"), f"{where} accuracies")
    _scores(entry.get("seconds"), f"{where} seconds")
    _number(entry.get("ti"), f"{where} TI")
    _number(entry.get("cc"), f"{where} CC")
    if entry.get("created") is not None:
        _number(entry["created"], f"{where} created")
    if entry.get("head_scores") is not None:
        _expect(entry["head_scores"], list, f"{where} head scores")
    _scores(entry["extra"].get("base", {}), f"{where} base accuracies")
    reader = entry["extra"].get("reader", "clip")
    _expect(reader, str, f"{where} reader")
    for point in entry["curve"]:
        _expect(point, dict, f"{where} curve point")


def _digest(tensor: torch.Tensor) -> str:
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(data).hexdigest()
