"""Per-class confidence as bars, in HTML (no Gradio).

HTML rather than a chart image: its text takes the page's own colour (`currentColor`), so it
reads in light and dark mode, the background stays transparent, and the rows reflow to a
phone's width at the page's font size. Two bars per class: the adapted version and the base.
"""

from __future__ import annotations

from html import escape

from ..vqa import LETTERS, display_name

ADAPTED = "#2563eb"
BASE = "#9ca3af"
SHOWN = 10  # rows at most: the classes either version finds most likely


def _percent(p: float) -> str:
    value = 100 * p
    if 0 < value < 0.5:
        return "<1%"
    if 99.5 <= value < 100:
        return ">99%"
    return f"{value:.0f}%"


def _bar(p: float, colour: str, who: str) -> str:
    width = max(0.0, min(100.0, 100 * p))
    return (
        '<div style="display:flex;align-items:center;gap:6px;min-width:0">'
        '<div style="flex:1;height:10px;border-radius:5px;min-width:0;'
        'background:color-mix(in srgb, currentColor 12%, transparent)">'
        f'<div class="lorsu-conf-bar" data-who="{who}" data-p="{p:.6f}" '
        f'style="width:{width:.1f}%;height:100%;border-radius:5px;background:{colour}"></div>'
        "</div>"
        f'<span style="width:3.2em;text-align:right;font-variant-numeric:tabular-nums">'
        f"{_percent(p)}</span></div>"
    )


def _rows(names: list[str], adapted: list[float], base: list[float] | None, shown: int) -> str:
    both = base if base is not None else adapted
    order = sorted(range(len(names)), key=lambda i: -max(adapted[i], both[i]))[:shown]
    top = max(range(len(names)), key=lambda i: adapted[i])
    out = []
    for i in order:
        weight = "700" if i == top else "400"
        bars = _bar(adapted[i], ADAPTED, "adapted")
        if base is not None:
            bars += _bar(base[i], BASE, "base")
        out.append(
            f'<div class="lorsu-conf-row" data-class="{escape(names[i])}" '
            'style="display:grid;grid-template-columns:minmax(4.5em,32%) 1fr;gap:8px;'
            'align-items:center;padding:3px 0">'
            f'<div style="font-weight:{weight};overflow-wrap:anywhere">{escape(names[i])}</div>'
            f'<div style="display:flex;flex-direction:column;gap:2px">{bars}</div></div>'
        )
    rest = len(names) - len(order)
    if rest > 0:
        share = sum(adapted[i] for i in range(len(names)) if i not in order)
        out.append(
            f'<div style="opacity:.75;font-size:.9em">{rest} more classes, '
            f"{_percent(share)} together (adapted)</div>"
        )
    return "".join(out)


def _swatch(colour: str) -> str:
    return (
        f'<span style="display:inline-block;width:.9em;height:.9em;border-radius:3px;'
        f'background:{colour};vertical-align:-.1em;margin:0 4px 0 10px"></span>'
    )


def confidence_html(result: dict, shown: int = SHOWN) -> str:
    """`result`: `AppCore.confidence`'s dict (readings as `Reading.to_dict()`)."""
    readings = result["readings"]
    adapted, base = readings["adapted"], readings.get("base")
    version = result.get("version", 0)
    legend = _swatch(ADAPTED) + (
        f"Adapted (session {int(version)})" if version else "Version 0 (no sessions)"
    )
    if base is not None:
        legend += _swatch(BASE) + "Base model"
    classes = adapted["classes"]
    clip_note = (
        f"CLIP zero-shot: the probability of each of {len(classes)} classes "
        f"({escape(result.get('source', 'the classes'))})"
    )
    letters = [f"{LETTERS[i]}. {display_name(o)}" for i, o in enumerate(adapted["options"])]
    mc_note = (
        "Chat model, multiple choice: the probability of each option's letter as its first "
        "word"
        + (
            " (the five classes CLIP finds most likely are the options)"
            if len(adapted["options"]) < len(classes)
            else ""
        )
    )
    question = escape(adapted["prompt"]).replace("\n", "<br>")
    return (
        '<div class="lorsu-conf" style="background:transparent;color:inherit;font-size:14px">'
        f'<div style="margin-bottom:6px">{legend}</div>'
        f'<div class="lorsu-conf-clip" style="margin:8px 0 4px;font-weight:600">{clip_note}</div>'
        + _rows(
            [display_name(c) for c in classes],
            adapted["clip"],
            base["clip"] if base else None,
            shown,
        )
        + f'<div class="lorsu-conf-mc" style="margin:12px 0 4px;font-weight:600">{mc_note}</div>'
        + _rows(letters, adapted["mc"], base["mc"] if base else None, shown)
        + '<details style="margin-top:6px;font-size:.9em;opacity:.85"><summary>The question '
        f"asked</summary><div>{question}</div></details></div>"
    )
