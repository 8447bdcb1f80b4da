"""Where one session's learning sits, and how much of it the chat reads (a development check).

    python -m lorsu_demo.toyworld.transfer --data DIR [--model toy] [--method lorsu] [--seed 0]

Runs one default 5-shot session on DIR, as `train --sessions 1 --shots 5` does, and reads the
target and control sets before and after it four ways:

- `clip`: CLIP's zero-shot reader (the final layer's class token through the projection);
- `read layer`: the same zero-shot reading of the tokens LLaVA reads (layer -2's patch tokens,
  mean-pooled, through the encoder's own final norm and projection): what of the session's
  learning reaches the layer the chat sees;
- `read layer 5-way`: that reading among the five options each image offers the chat (what a
  chat that read the read layer perfectly would score on its own test);
- `mc`: the chat model's 5-way multiple choice.

The shares printed at the end say how much of CLIP's gain reached the read layer, and how much of
the read layer's gain reached the chat's multiple choice.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from lorsu_demo.delta import applied
from lorsu_demo.evaluate import EvalSet, accuracy, class_text_features, percent
from lorsu_demo.history import History
from lorsu_demo.model import load_bundle
from lorsu_demo.runs import method_settings_for, plan_run, run_sessions
from lorsu_demo.toyworld.train import read_layer_embedding
from lorsu_demo.vqa import mc_accuracy, mc_options

READINGS = ("clip", "read layer", "read layer 5-way", "mc")


@torch.no_grad()
def read_layer_scores(bundle, eval_set: EvalSet, batch_size: int = 256) -> torch.Tensor:
    """[images, classes]: the read layer's embedding of each image against each class's text."""
    texts = class_text_features(
        bundle, eval_set.classes, eval_set.templates or bundle.caption_templates
    )
    pixels = eval_set.pixels(bundle)
    scores = []
    for start in range(0, len(pixels), batch_size):
        out = bundle.clip.vision_model(
            pixel_values=pixels[start : start + batch_size], output_hidden_states=True
        )
        scores.append(read_layer_embedding(bundle.clip, out.hidden_states) @ texts.T)
    return torch.cat(scores)


def accuracy_among_all(scores: torch.Tensor, eval_set: EvalSet) -> float:
    return percent(scores.argmax(1) == eval_set.targets)


def accuracy_among_options(scores: torch.Tensor, eval_set: EvalSet) -> float:
    """The reading restricted to each image's multiple-choice options (the same five the chat is
    offered): what a chat that read it perfectly would score on the chat's own test."""
    index = {c: i for i, c in enumerate(eval_set.classes)}
    right = []
    for row, item, (options, _) in zip(scores, eval_set.images.items, mc_options(eval_set)):
        best = options[int(row[[index[o] for o in options]].argmax())]
        right.append(best == item.label)
    return percent(torch.tensor(right))


def read_layer_accuracy(bundle, eval_set: EvalSet) -> float:
    return accuracy_among_all(read_layer_scores(bundle, eval_set), eval_set)


def read_layer_option_accuracy(bundle, eval_set: EvalSet) -> float:
    return accuracy_among_options(read_layer_scores(bundle, eval_set), eval_set)


def readings(bundle, eval_set: EvalSet) -> dict[str, float]:
    read_layer = read_layer_scores(bundle, eval_set)
    return {
        "clip": accuracy(bundle, eval_set, "clip"),
        "read layer": accuracy_among_all(read_layer, eval_set),
        "read layer 5-way": accuracy_among_options(read_layer, eval_set),
        "mc": accuracy(bundle, eval_set, "mc"),
    }


def mc_draws(bundle, eval_set: EvalSet, delta, draws: int, first=None) -> dict:
    """The chat's multiple choice before and after `delta` under `draws` draws of distractors
    (seeds 0..draws-1; seed 0 is what the app and the CLI ask): how much the draw moves TI.
    `first`, when given, is seed 0's (before, after), already read, so it is not read again."""
    seeds = range(1 if first else 0, draws)
    before = [mc_accuracy(bundle, eval_set, seed=s) for s in seeds]
    with applied(bundle.vision_state(), [delta]):
        after = [mc_accuracy(bundle, eval_set, seed=s) for s in seeds]
    if first:
        before.insert(0, first[0])
        after.insert(0, first[1])
    gains = [a - b for a, b in zip(after, before)]
    return {
        "before": before,
        "gain": gains,
        "before_mean": statistics.mean(before),
        "gain_mean": statistics.mean(gains),
        "gain_sd": statistics.stdev(gains) if draws > 1 else 0.0,
    }


def measure(
    model: str, data: str, method: str = "lorsu", seed: int = 0, shots: int = 5, draws: int = 0
) -> dict:
    bundle = load_bundle(model)
    plan = plan_run(bundle, data, None, 1, shots, seed)
    history = History(model=model)
    settings = method_settings_for(bundle, method, {})
    for _ in run_sessions(bundle, history, plan, method, settings, seed):
        pass
    sets = [plan.target, *plan.controls]
    bundle.clip.eval()
    before = {s.name: readings(bundle, s) for s in sets}
    with applied(bundle.vision_state(), [history.sessions[-1].delta]):
        after = {s.name: readings(bundle, s) for s in sets}
    target = plan.target.name
    gain = {r: after[target][r] - before[target][r] for r in READINGS}
    first = (before[target]["mc"], after[target]["mc"])
    drawn = (
        mc_draws(bundle, plan.target, history.sessions[-1].delta, draws, first) if draws else None
    )
    return {
        "mc_draws": drawn,
        "data": str(data),
        "method": method,
        "before": before,
        "after": after,
        "target_gain": gain,
        "read_layer_share_of_clip": gain["read layer"] / gain["clip"] if gain["clip"] else None,
        "mc_share_of_read_layer": gain["mc"] / gain["read layer"] if gain["read layer"] else None,
        "mc_share_of_read_layer_5way": gain["mc"] / gain["read layer 5-way"]
        if gain["read layer 5-way"]
        else None,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", default="toy")
    ap.add_argument("--method", default="lorsu")
    ap.add_argument("--seed", default=0, type=int)
    ap.add_argument(
        "--mc-draws",
        default=0,
        type=int,
        help="also read the target's multiple choice under this many draws of distractors",
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    result = measure(args.model, args.data, args.method, args.seed, draws=args.mc_draws)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.method} on {args.data}: accuracy before -> after (" + " / ".join(READINGS) + ")")
    for name in result["before"]:
        cells = [
            f"{result['before'][name][r]:.1f} -> {result['after'][name][r]:.1f}" for r in READINGS
        ]
        print(f"  {name}: {' / '.join(cells)}")
    share_rl, share_mc = result["read_layer_share_of_clip"], result["mc_share_of_read_layer"]
    print(
        "  read layer's share of CLIP's gain: "
        + ("-" if share_rl is None else f"{share_rl:.2f}")
        + "; the chat's (mc) share of the read layer's: "
        + ("-" if share_mc is None else f"{share_mc:.2f}")
    )
    if drawn := result["mc_draws"]:
        clip_gain = result["target_gain"]["clip"]
        print(
            f"  mc over {len(drawn['gain'])} draws of distractors: base "
            f"{drawn['before_mean']:.1f} ({min(drawn['before']):.1f}..{max(drawn['before']):.1f}), "
            f"TI {drawn['gain_mean']:+.1f} +- {drawn['gain_sd']:.1f} "
            f"({min(drawn['gain']):+.1f}..{max(drawn['gain']):+.1f}), the first draw's "
            f"{drawn['gain'][0]:+.1f}; mc/clip "
            + ("-" if not clip_gain else f"{drawn['gain_mean'] / clip_gain:.2f}")
        )


if __name__ == "__main__":
    main()
