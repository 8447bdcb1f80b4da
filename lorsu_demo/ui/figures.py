"""What the app draws: matplotlib figures and small HTML blocks, without Gradio.

Figures are made with `matplotlib.figure.Figure` (not pyplot), so nothing accumulates in a global
registry while many users train.
"""

from __future__ import annotations

import base64
import html
import io
import math

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from PIL import Image  # noqa: E402

from ..vqa import names_class  # noqa: E402

INK = "#1f2937"
MUTED = "#6b7280"
TARGET = "#2563eb"
CONTROL = "#d97706"
SELECTED = "#dc2626"
UNREAD = "#9ca3af"
DPI = 110


def pretty(name: str) -> str:
    """A set name as people read it ("control:control" -> "control")."""
    if name.startswith("control:"):
        rest = name.split(":", 1)[1]
        return "control" if rest in ("control", "") else f"control: {rest}"
    return name


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=DPI)
    figure.set_facecolor("white")
    return figure


def _message(figure: Figure, text: str) -> Figure:
    axes = figure.add_subplot(111)
    axes.axis("off")
    axes.text(0.5, 0.5, text, ha="center", va="center", color=MUTED, fontsize=11, wrap=True)
    return figure


# ---- the session's curves --------------------------------------------------------------------
def epoch_means(
    losses: list[tuple[int, float]], epochs: list[int]
) -> tuple[list[int], list[float]]:
    """(last step of each epoch, that epoch's mean loss), for the epochs seen so far."""
    groups: dict[int, list[tuple[int, float]]] = {}
    for (step, loss), epoch in zip(losses, epochs):
        groups.setdefault(epoch, []).append((step, loss))
    ends = [points[-1][0] for points in groups.values()]
    means = [sum(loss for _, loss in points) / len(points) for points in groups.values()]
    return ends, means


def curves_figure(
    losses: list[tuple[int, float]],
    accuracy: list[dict],
    total: int | None,
    base_target: float | None = None,
    base_control: float | None = None,
    epochs: list[int] | None = None,
) -> Figure:
    """Loss per step (left) and target/control accuracy at the evaluation points (right).

    With `epochs` (the epoch of each step) the line is each epoch's mean loss and the steps are
    drawn faint: an epoch's last batch is often small (50 images in batches of 16 end with 2),
    and its loss alone dips, which made the per-step line a sawtooth."""
    figure = _figure(7.6, 2.7)
    loss_axes, acc_axes = figure.subplots(1, 2)
    right = max(1, total or (losses[-1][0] if losses else 1))
    title = "Training loss (lower = better fit)"
    if losses and epochs and len(epochs) == len(losses) and len(set(epochs)) > 1:
        steps, values = zip(*losses)
        loss_axes.plot(steps, values, color=INK, lw=0.8, alpha=0.25)
        ends, means = epoch_means(losses, epochs)
        loss_axes.plot(ends, means, color=INK, lw=1.8, marker="." if len(ends) < 30 else None)
        title = "Training loss per epoch (faint: each step)"
    elif losses:
        steps, values = zip(*losses)
        loss_axes.plot(steps, values, color=INK, lw=1.6, marker="." if len(steps) < 30 else None)
    else:
        loss_axes.text(0.5, 0.5, "appears when training starts", ha="center", va="center",
                       color=MUTED, transform=loss_axes.transAxes)  # fmt: skip
    loss_axes.set_title(title, fontsize=10, color=INK)
    loss_axes.set_xlabel("step", fontsize=9)
    loss_axes.set_xlim(0, right)

    for key, colour, label, base in (
        ("target", TARGET, "target (new data)", base_target),
        ("control", CONTROL, "control (what it knew)", base_control),
    ):
        points = [(p["step"], p[key]) for p in accuracy if _finite(p.get(key))]
        if points:
            steps, values = zip(*points)
            acc_axes.plot(steps, values, color=colour, lw=2, marker="o", ms=4, label=label)
        if _finite(base):
            acc_axes.axhline(base, color=colour, lw=1, ls="--", alpha=0.6)
    acc_axes.set_ylim(-2, 102)
    acc_axes.set_xlim(0, right)
    acc_axes.set_title("Test accuracy % (dashed: base model)", fontsize=10, color=INK)
    acc_axes.set_xlabel("step", fontsize=9)
    if any(_finite(p.get("target")) for p in accuracy):
        acc_axes.legend(fontsize=8, loc="lower right", frameon=False)
    for axes in (loss_axes, acc_axes):
        axes.tick_params(labelsize=8)
        axes.grid(alpha=0.25)
        for side in ("top", "right"):
            axes.spines[side].set_visible(False)
    figure.tight_layout()
    return figure


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


# ---- what the method chose -------------------------------------------------------------------
def scores_figure(
    head_scores,
    selected_heads,
    fc1_density,
    layers_read: int,
    num_layers: int,
    num_heads: int,
    method: str = "",
) -> Figure:
    """Layers x heads importance (each layer scaled to its top head) with the selected heads
    boxed, the layers the VLM never reads greyed, and the share of fc1 weights trained."""
    height = max(2.6, 0.34 * num_layers + 1.5)
    figure = _figure(7.6, height)
    grid = figure.add_gridspec(1, 2, width_ratios=[3.0, 1.15], wspace=0.06)
    heat = figure.add_subplot(grid[0])
    bars = figure.add_subplot(grid[1], sharey=heat)

    if head_scores is not None:
        scores = np.asarray(head_scores, dtype=float)
        top = scores.max(axis=1, keepdims=True)
        scaled = np.divide(scores, top, out=np.zeros_like(scores), where=top > 0)
        heat.imshow(scaled, cmap="Blues", vmin=0, vmax=1, aspect="auto")
        heat.set_title("Head importance (each layer scaled to its top head)", fontsize=10,
                       color=INK)  # fmt: skip
    else:
        heat.imshow(np.zeros((num_layers, num_heads)), cmap="Greys", vmin=0, vmax=1, aspect="auto")
        title = "Head importance: appears when a session scores heads"
        if method:
            title = f"{method} does not score heads (no importance to show)"
        heat.set_title(title, fontsize=10, color=INK)
    chosen = 0
    for layer, heads in enumerate(selected_heads or []):
        for head in heads:
            chosen += 1
            heat.add_patch(Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False,
                                     edgecolor=SELECTED, lw=2.2, zorder=5))  # fmt: skip
    for layer in range(layers_read, num_layers):
        for axes in (heat, bars):
            axes.axhspan(layer - 0.5, layer + 0.5, color=UNREAD, alpha=0.55, lw=0, zorder=3)
    heat.set_xticks(range(num_heads), [str(h + 1) for h in range(num_heads)], fontsize=8)
    # The unread layers say so in their tick label, not over their cells, where a label would
    # hide the red boxes of the heads trained there.
    names = [
        f"layer {i + 1}" if i < layers_read else f"layer {i + 1}\nnot read"
        for i in range(num_layers)
    ]
    heat.set_yticks(range(num_layers), names, fontsize=8)
    heat.set_xlabel(
        f"attention head ({chosen} boxed in red = trained)" if chosen else "attention head",
        fontsize=9,
    )
    heat.set_xlim(-0.5, num_heads - 0.5)
    heat.set_ylim(num_layers - 0.5, -0.5)

    density = [100 * float(d) for d in (fc1_density or [0.0] * num_layers)]
    colours = [UNREAD if i >= layers_read else TARGET for i in range(len(density))]
    if any(density) or head_scores is not None:
        bars.barh(range(len(density)), density, color=colours, height=0.6)
        for i, value in enumerate(density):
            bars.text(value + 2, i, f"{value:.0f}%", va="center", fontsize=8, color=INK)
    elif method:
        bars.text(59, (num_layers - 1) / 2, "no sparse fc1 mask:\nsee the method's\ndescription",
                  ha="center", va="center", fontsize=8.5, color=MUTED)  # fmt: skip
    bars.set_xlim(0, 118)
    bars.set_xticks([0, 50, 100])
    bars.set_title("MLP (fc1) trained", fontsize=10, color=INK)
    bars.set_xlabel("% of each layer's fc1", fontsize=9)
    bars.tick_params(labelleft=False, labelsize=8)
    for side in ("top", "right"):
        bars.spines[side].set_visible(False)
    figure.subplots_adjust(left=0.1, right=0.97, top=1 - 0.42 / height, bottom=0.62 / height)
    return figure


def empty_scores_figure(num_layers: int, num_heads: int, layers_read: int) -> Figure:
    return scores_figure(None, None, None, layers_read, num_layers, num_heads)


# ---- sessions --------------------------------------------------------------------------------
def matrix_figure(matrix, boxes: list[tuple[int, str]] | None = None) -> Figure:
    """The accuracy matrix a[j, i]: rows = after session j (0 = base), columns = test sets.
    `boxes`: (session, set) cells to box, every set every session trained (default: the
    session that first trained each set)."""
    rows = matrix.rows
    sets = matrix.sets
    if not sets:
        return _message(_figure(7.0, 1.6), "No accuracies yet: train a session first.")
    values = np.array(rows, dtype=float)
    height = max(1.8, 0.42 * len(rows) + 1.3)
    width = min(11, max(5.0, 1.25 * len(sets) + 2.2))
    figure = _figure(width, height)
    axes = figure.add_subplot(111)
    shown = np.where(np.isfinite(values), values, np.nan)
    image = axes.imshow(shown, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    for j in range(values.shape[0]):
        for i in range(values.shape[1]):
            value = values[j, i]
            text = "—" if not math.isfinite(value) else f"{value:.0f}"
            colour = cell_ink(image.to_rgba(value)) if math.isfinite(value) else INK
            axes.text(i, j, text, ha="center", va="center", fontsize=9, color=colour)
    if boxes is None:
        boxes = [(session, name) for name, session in matrix.trained_at.items()]
    for session, name in boxes:
        if name in sets and 0 < session < len(rows):
            axes.add_patch(Rectangle((sets.index(name) - 0.5, session - 0.5), 1, 1, fill=False,
                                     edgecolor=INK, lw=2))  # fmt: skip
    labels = ["base model"] + [f"after session {j}" for j in range(1, len(rows))]
    axes.set_yticks(range(len(rows)), labels, fontsize=8.5)
    axes.set_xticks(range(len(sets)), [_wrap(pretty(s)) for s in sets], fontsize=8.5)
    axes.xaxis.tick_top()
    axes.set_title("Accuracy % on each test set (boxed: the sessions that trained it)",
                   fontsize=10, color=INK, pad=26)  # fmt: skip
    figure.tight_layout()
    return figure


def compare_figure(results: list[dict]) -> Figure:
    """TI against CC, one point per method (the paper's picture): filled, read with the
    session's reader; hollow, the same session read with the chat model's multiple choice."""
    figure = _figure(6.4, 4.2)
    if not results:
        return _message(figure, "Press Compare: one point per method will appear here.")
    axes = figure.add_subplot(111)
    colours = ["#2563eb", "#059669", "#d97706", "#dc2626", "#7c3aed", "#0891b2", "#be185d"]
    own = results[0].get("reader", "clip")
    second = next((k[3:] for r in results for k in r if k.startswith("ti_") and k[3:] != own), None)
    for i, row in enumerate(results):
        colour = colours[i % len(colours)]
        axes.scatter([row["cc"]], [row["ti"]], s=90, color=colour, zorder=3)
        axes.annotate(row["method"], (row["cc"], row["ti"]), textcoords="offset points",
                      xytext=(7, 5), fontsize=10, color=colour, fontweight="bold")  # fmt: skip
        if second and _finite(row.get(f"ti_{second}")) and _finite(row.get(f"cc_{second}")):
            x, y = row[f"cc_{second}"], row[f"ti_{second}"]
            axes.scatter([x], [y], s=90, facecolors="white", edgecolors=colour, lw=2, zorder=3)
            axes.plot([row["cc"], x], [row["ti"], y], color=colour, lw=0.8, ls=":", zorder=2)
    axes.axhline(0, color=MUTED, lw=0.8)
    axes.axvline(0, color=MUTED, lw=0.8)
    axes.set_xlabel("CC: control change (points; right is better)", fontsize=9.5)
    axes.set_ylabel("TI: target improvement (points)", fontsize=9.5)
    names = {"clip": "CLIP", "mc": "chat model, multiple choice", "open": "chat model, open"}
    title = f"Filled: read with {names.get(own, own)}"
    if second:
        title += f"; hollow: {names.get(second, second)}"
    axes.set_title(title, fontsize=9.5, color=INK)
    axes.margins(0.25)
    axes.grid(alpha=0.25)
    figure.tight_layout()
    return figure


def cell_ink(rgba) -> str:
    """Dark text on a light cell, white on a dark one (the deep red and green ends)."""
    r, g, b = (float(c) for c in rgba[:3])
    luminance = 0.2126 * r + 0.7152 * g + 0.0722 * b
    return INK if luminance > 0.45 else "white"


def _wrap(text: str, width: int = 14) -> str:
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + len(word) + 1 > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join([*lines, line])


# ---- HTML blocks -----------------------------------------------------------------------------
def _tone(value: float | None, forgetting: bool = False) -> str:
    if not _finite(value):
        return "none"
    if value > 0.5:
        return "good"
    if value < -0.5:
        return "bad"
    return "flat"


def metrics_html(
    ti: float | None,
    cc: float | None,
    target_now: float | None = None,
    target_base: float | None = None,
    control_now: float | None = None,
    control_base: float | None = None,
    note: str = "",
    control: bool | None = None,
) -> str:
    """TI and CC as large, colour-coded numbers with one line each on what they mean.
    `control`: whether the model has a control set (default: whether a control value is given)."""

    def number(value):
        return "—" if not _finite(value) else f"{value:+.1f}"

    def change(now, base):
        if not _finite(now) or not _finite(base):
            return ""
        return f"{base:.0f}% &rarr; {now:.0f}%"

    has_control = _finite(control_now) if control is None else control
    cc_text = (
        "Control Change: accuracy on what the model already knew, now minus before any "
        "session. Below zero means forgetting."
    )
    if not has_control:
        cc_text = "Control Change: needs a control set, and this model has none."
    blocks = [
        (
            "TI",
            number(ti),
            _tone(ti),
            change(target_now, target_base),
            "Target Improvement: accuracy on new test images of this data, now minus the "
            "base model's. Higher is better.",
            "ti",
        ),
        (
            "CC",
            number(cc) if has_control else "—",
            _tone(cc) if has_control else "none",
            change(control_now, control_base),
            cc_text,
            "cc",
        ),
    ]
    cards = "".join(
        f'<div class="lorsu-metric lorsu-{tone}" id="lorsu-{key}">'
        f'<div class="lorsu-metric-name">{name}</div>'
        f'<div class="lorsu-metric-value">{value}</div>'
        f'<div class="lorsu-metric-change">{detail}</div>'
        f'<div class="lorsu-metric-help">{help_text}</div></div>'
        for name, value, tone, detail, help_text, key in blocks
    )
    foot = f'<div class="lorsu-metric-note">{html.escape(note)}</div>' if note else ""
    return f'<div class="lorsu-metrics">{cards}</div>{foot}'


def for_display(image: Image.Image, side: int = 256) -> Image.Image:
    """A small image blown up by a whole factor with nearest-neighbour sampling, so a 32 px
    image shows its pixels sharp instead of a blurry or tiny preview; large images unchanged."""
    factor = side // max(image.size)
    if factor < 2:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def image_data_uri(image: Image.Image, size: int = 72) -> str:
    image = image.convert("RGB")
    scale = size / max(image.size)
    resample = Image.Resampling.NEAREST if max(image.size) <= 64 else Image.Resampling.LANCZOS
    image = image.resize(
        (max(1, round(image.width * scale)), max(1, round(image.height * scale))), resample
    )
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def probes_html(probes, answers: dict[str, list[str]], question: str) -> str:
    """A table: probe image, its class, and what each model version answered."""
    if not probes:
        return '<div class="lorsu-probes-empty">Pick data to see probe images here.</div>'
    columns = [
        ("base", "Base model"),
        ("before", "Before this session"),
        ("after", "After this session"),
    ]
    head = "".join(f"<th>{title}</th>" for _, title in columns)
    rows = []
    for index, probe in enumerate(probes):
        cells = []
        for key, _ in columns:
            values = answers.get(key)
            if values is None:
                cells.append('<td class="lorsu-wait">…</td>')
                continue
            text = values[index] if index < len(values) else ""
            ok = names_class(text, probe.label)
            mark = "&#10004;" if ok else "&#10008;"
            cells.append(
                f'<td class="{"lorsu-ok" if ok else "lorsu-no"}"><span class="lorsu-mark">'
                f"{mark}</span> {html.escape(text) or '<i>(nothing)</i>'}</td>"
            )
        rows.append(
            f'<tr><td><img src="{image_data_uri(probe.image)}" alt="{html.escape(probe.label)}">'
            f"</td><td><b>{html.escape(probe.label)}</b></td>{''.join(cells)}</tr>"
        )
    totals = []
    for key, _ in columns:
        values = answers.get(key)
        if values is None:
            totals.append("<td></td>")
            continue
        right = sum(names_class(v, p.label) for v, p in zip(values, probes))
        totals.append(f"<td><b>{right} of {len(probes)} right</b></td>")
    foot = f"<tfoot><tr><td></td><td></td>{''.join(totals)}</tr></tfoot>"
    return (
        f'<div class="lorsu-probes"><div class="lorsu-probe-q">Each model is asked '
        f"<q>{html.escape(question)}</q> about test images it never trained on "
        "(&#10004; = the answer names the right class).</div>"
        f"<table><thead><tr><th>Image</th><th>Class</th>{head}</tr></thead>"
        f"<tbody>{''.join(rows)}</tbody>{foot}</table></div>"
    )


def status_html(message: str, tone: str = "info") -> str:
    return f'<div class="lorsu-status lorsu-status-{tone}">{html.escape(message)}</div>'
