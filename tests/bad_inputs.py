"""Bad inputs an attacker (or an unlucky user) sends, built in memory; shared by the security
tests and `scripts/security_table.py`, which writes docs/security.md from the same cases."""

from __future__ import annotations

import io
import json
import random
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from lorsu_demo.history import _digest


def png(size=(32, 32), colour=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


def noisy_png(seed=0, size=32) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3)).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims `width` x `height` (CRC fixed): a decompression bomb, or
    a huge image, as far as any check before decoding can tell."""
    data = bytearray(png())
    header = struct.pack(">II", width, height)
    data[16:24] = header
    crc = zlib.crc32(bytes(data[12:29]))
    data[29:33] = struct.pack(">I", crc)
    return bytes(data)


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


# name -> (file name, bytes, what the message must say)
BAD_IMAGES = {
    "zero bytes": ("empty.png", b"", "empty"),
    "text": ("notes.png", b"just some words\n" * 20, "not an image"),
    "HTML": ("page.png", b"<!doctype html><html><body><script>x()</script></body></html>", "not an image"),
    "PDF": ("doc.pdf", b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n", "not an image"),
    "decompression bomb (100000x100000 header)": ("bomb.png", png_claiming(100_000, 100_000), "decompression bomb"),
    "9000x9000 PNG header": ("big.png", png_claiming(9000, 9000), "too large"),
    "truncated PNG": ("cut.png", png()[:60], "damaged or truncated"),
    "SVG": ("vector.svg", b"<svg xmlns='http://www.w3.org/2000/svg'/>", "not an image"),
}  # fmt: skip


def zip_of(entries: dict[str, bytes], compress=zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compress) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def damaged_zip() -> bytes:
    """A zip whose second entry's deflate stream is garbage (its header is intact): reading
    it raises zlib.error inside zipfile."""
    entries = {"cat/1.png": noisy_png(1), "cat/2.png": noisy_png(2), "dog/1.png": noisy_png(3)}
    data = bytearray(zip_of(entries))
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as archive:
        info = archive.getinfo("cat/2.png")
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data[start : start + 16] = b"\xff" * 16
    return bytes(data)


def valid_history(core, path):
    """A real two-session history of the app's model, saved to `path`: LoRSU on one example
    domain (row and mask regions), then full fine-tuning on the other (dense regions). Trained
    through the library, as the app's worker does, and saved as the app exports it."""
    from lorsu_demo.history import History
    from lorsu_demo.methods import make_method
    from lorsu_demo.session import run_session

    history = History(model=dict(core.bundle.source))
    for seed, (name, method) in enumerate((("colours", "lorsu"), ("mixes", "full")), 1):
        data = core.examples.get(name)
        settings = {"lr": 1e-2, "epochs": 1, "batch_size": 4}
        events = run_session(
            core.bundle,
            history,
            make_method(method, **settings),
            data.session_images(3, seed),
            target=data.target,
            controls=list(core.controls),
            seed=seed,
        )
        history.append(list(events)[-1].record)
    return history.save(path)


# ---- reading and rewriting a history file, checksums recomputed --------------------------
def read_parts(path: Path) -> tuple[dict, dict, dict]:
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata())
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    return metadata, json.loads(metadata["manifest"]), tensors


def write_parts(path: Path, metadata: dict, manifest, tensors: dict) -> Path:
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if isinstance(manifest, dict) and isinstance(manifest.get("sha256"), dict):
        manifest["sha256"] = {k: _digest(v) for k, v in tensors.items()}
    save_file(tensors, str(path), metadata={**metadata, "manifest": json.dumps(manifest)})
    return path


JUNK = [None, True, -1, 0, 2**40, 1e308, float("nan"), "x", "", "é" * 5000, [], {}, [1, "a"],
        {"a": None}, [[1.5]]]  # fmt: skip


def mutate(rng: random.Random, metadata, manifest, tensors) -> tuple[str, object]:
    """One random mutation, in place; returns (what was done, raw bytes or None)."""
    keys = sorted(tensors)
    value_keys = [k for k in keys if k.endswith("/values")]
    kind = rng.choice(
        ["value", "value", "rows", "bits", "shape", "dtype", "count", "field", "field",
         "param", "drop", "kind", "order", "meta", "carry", "bytes", "bytes"]
    )  # fmt: skip
    sessions = manifest["sessions"]
    entry = rng.choice(sessions)
    if kind == "value":
        key = rng.choice(value_keys)
        flat = tensors[key].reshape(-1).clone()
        bad = rng.choice([float("nan"), float("inf"), -float("inf"), 1e30, -3e38, 0.0])
        for _ in range(rng.randint(1, 3)):
            flat[rng.randrange(len(flat))] = bad
        tensors[key] = flat.reshape(tensors[key].shape)
        return f"value {bad}", None
    if kind == "rows":
        candidates = [k for k in keys if k.endswith("/rows")]
        if candidates:
            key = rng.choice(candidates)
            rows = tensors[key].clone()
            how = rng.choice(["big", "negative", "repeat", "reverse", "float", "2d"])
            if how == "big":
                rows[rng.randrange(len(rows))] = 10**6
            elif how == "negative":
                rows[0] = -1
            elif how == "repeat" and len(rows) > 1:
                rows[1] = rows[0]
            elif how == "reverse":
                rows = rows.flip(0)
            elif how == "float":
                rows = rows.float()
            else:
                rows = rows.reshape(1, -1)
            tensors[key] = rows
            return f"rows {how}", None
    if kind == "bits":
        candidates = [k for k in keys if k.endswith("/bits")]
        if candidates:
            key = rng.choice(candidates)
            bits = tensors[key].clone()
            how = rng.choice(["short", "long", "flip", "tail", "dtype"])
            if how == "short":
                bits = bits[:-1]
            elif how == "long":
                bits = torch.cat([bits, torch.tensor([255], dtype=torch.uint8)])
            elif how == "flip":
                bits[rng.randrange(len(bits))] ^= 1 << rng.randrange(8)
            elif how == "tail":
                bits[-1] = 255
            else:
                bits = bits.to(torch.int32)
            tensors[key] = bits
            return f"bits {how}", None
    if kind == "shape":
        param = rng.choice(sorted(entry["delta"]))
        shape = entry["delta"][param]["shape"]
        how = rng.choice(["grow", "zero", "neg", "float", "drop", "huge", "str"])
        if how == "grow":
            shape[rng.randrange(len(shape))] += 1
        elif how == "zero":
            shape[0] = 0
        elif how == "neg":
            shape[0] = -shape[0]
        elif how == "float":
            shape[0] = float(shape[0])
        elif how == "drop":
            shape.pop()
        elif how == "huge":
            shape[0] = 2**40
        else:
            entry["delta"][param]["shape"] = "big"
        return f"shape {how}", None
    if kind == "dtype":
        key = rng.choice(value_keys)
        dtype = rng.choice([torch.int32, torch.bool, torch.float16, torch.bfloat16, torch.float64])
        tensors[key] = tensors[key].to(dtype)
        return f"dtype {dtype}", None
    if kind == "count":
        key = rng.choice(value_keys)
        flat = tensors[key].reshape(-1)
        tensors[key] = flat[:-1] if rng.random() < 0.5 else torch.cat([flat, flat[:1]])
        return "value count", None
    if kind == "field":
        field = rng.choice(sorted(entry))
        entry[field] = rng.choice(JUNK)
        return f"field {field}", None
    if kind == "param":
        old = rng.choice(sorted(entry["delta"]))
        new = rng.choice(["vision.nothing", "x" * 5000, "projection.weight", old + "."])
        entry["delta"][new] = entry["delta"].pop(old)
        prefix = f"s{entry['index']}/delta/"
        for suffix in ("values", "rows", "bits"):
            if f"{prefix}{old}/{suffix}" in tensors:
                tensors[f"{prefix}{new}/{suffix}"] = tensors.pop(f"{prefix}{old}/{suffix}")
        return f"param {new[:20]}", None
    if kind == "drop":
        tensors.pop(rng.choice(keys))
        return "tensor dropped", None
    if kind == "kind":
        param = rng.choice(sorted(entry["delta"]))
        entry["delta"][param]["kind"] = rng.choice(["rows", "mask", "dense", "lora", 7])
        return "region kind", None
    if kind == "order":
        sessions.reverse()
        return "sessions reordered", None
    if kind == "meta":
        top = rng.choice(["model", "base", "sessions", "sha256"])
        manifest[top] = rng.choice(JUNK)
        return f"manifest {top}", None
    if kind == "carry":
        entry["carry"] = rng.choice([["ghost"], ["x" * 3000], "carry", [1]])
        return "carry", None
    # Raw bytes, checksums not recomputed: the safetensors header or a checksum must notice.
    return "bytes", b""


def raw_mutation(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    how = rng.choice(["flip", "cut", "insert", "zero-header"])
    if how == "flip":
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif how == "cut":
        data = data[: rng.randrange(len(data))]
    elif how == "insert":
        at = rng.randrange(len(data))
        data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    else:
        data[:8] = bytes(8)
    return bytes(data)


def fuzz(core, valid_file, folder, cases: int, seed: int, model_unchanged) -> list[tuple]:
    """Import `cases` random mutations of `valid_file` into three workspaces; for each loaded
    one, also list its sessions and apply its whole stack (what chat and train do). Returns
    (case, mutation, message, model_unchanged()) per case; a message is the refusal's text."""
    from lorsu_demo.delta import applied
    from lorsu_demo.ui.core import UserError

    metadata, manifest, tensors = read_parts(valid_file)
    rng = random.Random(seed)
    outcomes = []
    for case in range(cases):
        path = Path(folder) / f"case{case}.lorsu"
        man = json.loads(json.dumps(manifest))
        tens = {k: v.clone() for k, v in tensors.items()}
        what, raw = mutate(rng, dict(metadata), man, tens)
        if raw is not None:
            path.write_bytes(raw_mutation(rng, valid_file.read_bytes()))
        else:
            write_parts(path, metadata, man, tens)
        key = f"fuzz{case % 3}"
        try:
            message = core.import_history(key, str(path))
        except UserError as err:
            message = str(err)
        else:
            core.sessions(key), core.table_rows(key), core.version_choices(key)
            with applied(core.bundle.vision_state(), core.workspace(key).history.deltas()):
                pass
        outcomes.append((case, what, message, model_unchanged()))
    return outcomes
