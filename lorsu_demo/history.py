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

from .delta import Delta, Patch, Region
from .evaluate import AccuracyMatrix

FORMAT = "lorsu-demo-history"
VERSION = 1


class HistoryError(ValueError):
    """A history file that cannot be used, with a message that says why."""


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
                f"{name} is damaged, truncated or not a lorsu-demo history file ({err})."
            ) from err
        try:
            return cls._from_manifest(manifest, tensors, name)
        except (KeyError, TypeError, ValueError) as err:
            raise HistoryError(f"{name} has an inconsistent manifest ({err}).") from err

    @classmethod
    def _from_manifest(cls, manifest: dict, tensors: dict, name: str) -> History:
        digests = manifest["sha256"]
        if set(digests) != set(tensors):
            raise HistoryError(f"{name} is damaged: its tensors do not match its manifest.")
        for key, tensor in tensors.items():
            if _digest(tensor) != digests[key]:
                raise HistoryError(f"{name} is damaged: tensor {key} fails its checksum.")
        history = cls(model=manifest["model"], base=manifest["base"])
        fields = set(SessionRecord.__dataclass_fields__)
        for entry in manifest["sessions"]:
            prefix = f"s{entry['index']}"
            delta = Delta()
            for param, info in entry["delta"].items():
                key = f"{prefix}/delta/{param}"
                region = Region(
                    info["kind"],
                    tuple(info["shape"]),
                    rows=tensors.get(f"{key}/rows"),
                    bits=tensors.get(f"{key}/bits"),
                )
                delta[param] = Patch(region, tensors[f"{key}/values"])
            carry = {c: tensors[f"{prefix}/carry/{c}"] for c in entry["carry"]}
            values = {k: v for k, v in entry.items() if k in fields}
            history.append(SessionRecord(**{**values, "delta": delta, "carry": carry}))
        return history


def _digest(tensor: torch.Tensor) -> str:
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(data).hexdigest()
