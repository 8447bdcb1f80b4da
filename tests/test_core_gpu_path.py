"""The GPU speed path, checked on the CPU: bf16 autocast over fp32 master weights stays close
to fp32, reading each step's loss one step late changes nothing but the timing, and
`bench session` reports the counted TFLOPs, the achieved rate and the fraction of a peak."""

import pytest
import torch
from conftest import colour_set

from lorsu_demo import bench
from lorsu_demo.evaluate import EvalSet
from lorsu_demo.events import Done, Step
from lorsu_demo.history import History
from lorsu_demo.methods import make_method
from lorsu_demo.session import run_session

FAST = {"lr": 1e-2, "epochs": 3, "batch_size": 4}
CLASSES = ["red", "green", "blue"]


def session(bundle, method=None, **kwargs):
    train = colour_set("train", 4, seed=1, classes=CLASSES)
    target = EvalSet("target", colour_set("test", 2, seed=2, classes=CLASSES), CLASSES)
    method = method or make_method("lorsu", **FAST)
    return run_session(bundle, History(), method, train, target=target, seed=3, **kwargs)


def record(events):
    return [e for e in events if isinstance(e, Done)][0].record


def test_bf16_autocast_keeps_fp32_weights_and_stays_close_to_fp32(bundle):
    base = {k: v.detach().clone() for k, v in bundle.vision_state().items()}
    full = record(session(bundle))
    half = record(session(bundle, autocast="bf16"))
    # the weights (master copies) and so the deltas stay fp32
    assert all(p.values.dtype == torch.float32 for p in half.delta.values())
    assert all(torch.equal(base[k], v) for k, v in bundle.vision_state().items())
    # The first loss differs only by the bf16 forward's rounding: within 2%.
    first_full, first_half = full.curve[0]["loss"], half.curve[0]["loss"]
    assert first_half != first_full  # bf16 really ran
    assert abs(first_half - first_full) <= 0.02 * abs(first_full)
    # The session's update points the same way: cosine above 0.9 over every changed value.
    moved_full = torch.cat([(full.delta[k].values - full.delta[k].region.read(base[k])).flatten()
                            for k in full.delta])  # fmt: skip
    moved_half = torch.cat([(half.delta[k].values - half.delta[k].region.read(base[k])).flatten()
                            for k in full.delta])  # fmt: skip
    cosine = torch.nn.functional.cosine_similarity(moved_full, moved_half, dim=0)
    assert cosine > 0.9, float(cosine)
    with pytest.raises(ValueError, match="bf16"):
        list(session(bundle, autocast="fp16"))


def test_losses_read_one_step_late_are_the_same_losses(bundle):
    method = make_method("lorsu", **FAST)
    steps_done = []
    real_after = method.after_step

    def counting(lr):
        steps_done.append(lr)
        real_after(lr)

    method.after_step = counting
    seen = []
    events = []
    for event in session(bundle, method, sync_each_step=False, eval_points=2):
        events.append(event)
        if isinstance(event, Step):
            seen.append((event.step, len(steps_done)))
    lazy = record(events)
    eager = record(session(bundle))
    total = lazy.curve[-1]["step"]
    assert [s for s, _ in seen] == list(range(1, total + 1))
    late = [(s, n) for s, n in seen if n == s + 1]
    # every step's loss is read after the next step was queued, except before a measurement
    # (step 6 of 12: the live point) and at the end
    assert {s for s, n in seen if n == s} == {total // 2, total}
    assert len(late) == total - 2
    assert lazy.curve == eager.curve
    assert all(torch.equal(lazy.delta[k].values, eager.delta[k].values) for k in eager.delta)


def test_session_bench_reports_counted_and_achieved_tflops(bundle):
    from lorsu_demo.model import load_bundle

    def factory(encoder_fp32=True):
        return bundle if encoder_fp32 else load_bundle("tiny-random")

    result = bench.time_sessions(
        "tiny-random", "cpu", ["lorsu"], images=9, classes=3, epochs=1, batch_size=4,
        factory=factory, autocast="bf16", peak=1.0, precision_check=False,
    )  # fmt: skip
    row = result["methods"]["lorsu"]
    assert result["autocast"] == "bf16" and result["peak_tflops"] == 1.0
    assert row["counted_tflops"] > 0 and row["achieved_tflops_per_s"] > 0
    assert row["ideal_fraction"] == pytest.approx(
        row["counted_tflops"] / row["seconds"] / 1.0, rel=1e-2
    )
    assert bench.peak_tflops("NVIDIA H200") == bench.peak_tflops("NVIDIA H100 80GB HBM3") > 900
    assert bench.peak_tflops("some other card") is None
