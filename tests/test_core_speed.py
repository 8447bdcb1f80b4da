"""What the CPU speed-ups keep: cached text features equal fresh ones, the thread policy
follows its settings, and a seeded toy session is reproduced bit for bit."""

import json

import torch

from lorsu_demo import cli
from lorsu_demo.history import History
from lorsu_demo.model import limit_cpu_threads


def test_cached_text_features_equal_fresh_ones(bundle):
    texts = ["a photo of a red.", "a photo of a blue."]
    bundle.text_cache.clear()
    first = bundle.text_features(texts)
    assert tuple(texts) in bundle.text_cache
    first.add_(1.0)  # a caller changing its copy does not change the cache
    again = bundle.text_features(texts)
    bundle.text_cache.clear()
    fresh = bundle.text_features(texts)
    assert torch.equal(again, fresh) and not torch.equal(first, fresh)


def test_thread_policy_follows_its_settings(bundle, monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setenv("LORSU_THREADS", "2")
        limit_cpu_threads(bundle)
        assert torch.get_num_threads() == 2
        monkeypatch.delenv("LORSU_THREADS")
        limit_cpu_threads(bundle)  # a small encoder on the CPU: one thread
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        limit_cpu_threads(bundle)  # the user's setting wins
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_seeded_toy_session_is_reproduced_bit_for_bit(tmp_path, capsys):
    runs = []
    for name in ("a", "b"):
        argv = ["train", "--data", "assets/domains/seven-segment", "--shots", "2"]
        argv += ["--epochs", "2", "--seed", "3", "--out", str(tmp_path / name), "--json"]
        assert cli.main(argv) == 0, capsys.readouterr().err
        runs.append(json.loads(capsys.readouterr().out))
        history = History.load(tmp_path / name / "history.lorsu")
        runs[-1]["delta"] = history.sessions[0].delta
    a, b = runs
    assert a["sessions"][0]["ti"] == b["sessions"][0]["ti"]
    assert a["delta"].keys() == b["delta"].keys()
    assert all(torch.equal(a["delta"][k].values, b["delta"][k].values) for k in a["delta"])
    assert any(bool(p.values.abs().sum()) for p in a["delta"].values())


def test_the_colour_constants_made_once_give_the_same_pixels():
    """The hue rotation and grey weights are made once, not per image: the same values."""
    from lorsu_demo.data import _grey, _rotate_hue

    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(1))
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    for turns in (-0.08, 0.0, 0.05):
        angle = 2 * torch.pi * turns
        cos, sin = (
            float(torch.tensor(angle, dtype=torch.float64).cos()),
            float(torch.tensor(angle, dtype=torch.float64).sin()),
        )
        rotate = torch.tensor([[1.0, 0, 0], [0, cos, -sin], [0, sin, cos]])
        matrix = torch.linalg.inv(to_yiq) @ rotate @ to_yiq
        expected = torch.einsum("ij,jhw->ihw", matrix, image)
        assert torch.equal(_rotate_hue(image, turns), expected), turns
    weights = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
    assert torch.equal(_grey(image), (image * weights).sum(0, keepdim=True))


def test_the_untouched_models_accuracy_is_measured_once_per_set(bundle, monkeypatch):
    """Every user's first session measures the same base accuracies: once per set's content and
    reader. Another set, another reader's key, or changed weights measure again."""
    from conftest import colour_set

    from lorsu_demo import evaluate
    from lorsu_demo.evaluate import EvalSet, base_accuracy

    calls = []
    real = evaluate.accuracies

    def counting(bundle, eval_sets, reader="clip"):
        calls.extend(s.name for s in eval_sets)
        return real(bundle, eval_sets, reader)

    monkeypatch.setattr(evaluate, "accuracies", counting)
    bundle.base_cache.clear()
    classes = ["red", "green", "blue"]
    one = EvalSet("t", colour_set("test", 2, seed=2, classes=classes), classes)
    same = EvalSet("t", colour_set("test", 2, seed=2, classes=classes), classes)  # a copy
    other = EvalSet("t", colour_set("test", 2, seed=5, classes=classes), classes)
    first = base_accuracy(bundle, one)
    assert base_accuracy(bundle, same) == first and calls == ["t"]
    base_accuracy(bundle, other)
    assert len(calls) == 2  # same name, other images: measured
    weight = bundle.vision_state()["projection.weight"]
    saved = weight.detach().clone()
    try:
        weight.data.mul_(-1.0)
        flipped = base_accuracy(bundle, one)
        assert len(calls) == 3  # changed weights miss the cache
        assert flipped == real(bundle, [one])["t"]
    finally:
        weight.data.copy_(saved)
    assert base_accuracy(bundle, one) == first and len(calls) == 3


def test_freed_cpu_memory_is_kept_for_the_next_step():
    """On glibc, malloc keeps freed blocks for the next step instead of handing them back to
    the system and faulting fresh pages in (once per process)."""
    import ctypes
    import resource
    import sys

    from lorsu_demo.model import keep_freed_cpu_memory

    first = keep_freed_cpu_memory()
    assert keep_freed_cpu_memory() is first
    if not sys.platform.startswith("linux") or not hasattr(ctypes.CDLL("libc.so.6"), "mallopt"):
        return
    assert first
    x = torch.randn(64, 17, 512)

    def step():  # a forward's activations (8 x 2.2 MB), freed together by the backward
        live = [x * 1.5 for _ in range(8)]
        del live

    for _ in range(3):
        step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        step()
    # glibc's defaults trim the freed 18 MB every step: 4,320 faults a step on the dev VM.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults < 8 * 540


def test_evaluations_skip_the_last_layers_unread_rows_with_the_same_features(bundle):
    """Without gradients the last layer's output projection and MLP run for the first rows
    only (the pooled class token reads nothing else): the features are bit-identical to the
    whole forward's, for any batch size."""
    from lorsu_demo.model import class_token_pooled

    def whole(pixels):
        pooled = bundle.vision(pixel_values=pixels).pooler_output
        return torch.nn.functional.normalize(bundle.clip.visual_projection(pooled), dim=-1)

    size = bundle.image_size
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        # as after any chat: transformers has put its output-capturing hooks on every layer
        bundle.vision(pixel_values=torch.zeros(1, 3, size, size), output_hidden_states=True)
        assert any(m._forward_hooks for m in bundle.vision.modules())
        for n in (1, 2, 3, 5, 16, 64):
            pixels = torch.randn(n, 3, size, size, generator=generator)
            assert class_token_pooled(bundle.vision, pixels) is not None
            assert torch.equal(bundle.image_features(pixels), whole(pixels)), n
    # Gradients, hooks or a method's own modules in the layer: the whole layer, as before.
    pixels = torch.randn(4, 3, size, size, generator=generator)
    assert class_token_pooled(bundle.vision, pixels) is None
    last = bundle.layers[-1]
    with torch.no_grad():
        handle = last.mlp.fc1.register_forward_hook(lambda *args: None)
        try:
            assert class_token_pooled(bundle.vision, pixels) is None
        finally:
            handle.remove()
        original = last.mlp.fc1
        last.mlp.fc1 = type("Experts", (torch.nn.Module,), {"forward": original.forward})()
        try:
            assert class_token_pooled(bundle.vision, pixels) is None
        finally:
            last.mlp.fc1 = original
        assert class_token_pooled(bundle.vision, pixels) is not None


def test_the_batched_augmentation_is_the_per_image_one_bit_for_bit():
    """`Augment()(batch)` draws what `one` draws image by image, in the same order, and gives
    the same pixels (the colour transforms run on the whole batch)."""
    from lorsu_demo.data import Augment

    augment = Augment()
    for seed in range(60):
        n, size = 1 + seed % 17, (32, 48)[seed % 2]
        pixels = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1000 + seed))
        one, batch = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        expected = torch.stack([augment.one(image, one) for image in pixels])
        assert torch.equal(augment(pixels, batch), expected), seed
        assert torch.equal(one.get_state(), batch.get_state())  # the same draws


def test_flat_adam_is_torchs_foreach_adam_bit_for_bit():
    """One flat buffer for all trainable entries, the same arithmetic element by element:
    parameters bit-identical to torch's foreach Adam step after step, under a schedule, with
    masked entries left out, and when a tensor gets no gradient for a while (Adam skips it,
    its step count stays behind)."""
    from lorsu_demo.session import FlatAdam

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        generator = torch.Generator().manual_seed(0)
        shapes = [(512, 128), (512,), (64, 128), (128, 64), (128,), (64, 64)]
        start = [torch.randn(s, generator=generator) * 0.05 for s in shapes]
        ours = [torch.nn.Parameter(t.clone()) for t in start]
        theirs = [torch.nn.Parameter(t.clone()) for t in start]
        assert FlatAdam.applies(ours)
        # A method's masks (fc1's entries, a LoRA factor's rows): the masked entries get zero
        # gradients, so Adam leaves them as they are; the flat buffer leaves them out.
        entries = torch.rand(shapes[0], generator=generator) < 0.1
        rows = torch.zeros(shapes[3][0], 1)
        rows[16:48] = 1
        masks = {0: entries.float(), 3: rows}
        flat = FlatAdam(ours, lr=7e-4, masks={ours[i]: m for i, m in masks.items()})
        assert len(flat.flat) < sum(p.numel() for p in ours)
        reference = torch.optim.Adam(theirs, lr=7e-4, weight_decay=0.0, foreach=True)
        schedules = [
            torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1 / (1 + s)) for o in (flat, reference)
        ]
        for step in range(12):
            for params in (ours, theirs):
                for i, p in enumerate(params):
                    skipped = i == 3 and 4 <= step < 7  # no gradient for three steps
                    g = torch.Generator().manual_seed(100 * step + i)
                    p.grad = None if skipped else torch.randn(p.shape, generator=g) * 1e-3
                    if p.grad is not None and i in masks:  # as Method.shape_gradients does
                        p.grad.mul_(masks[i])
            flat.step()
            reference.step()
            for schedule in schedules:
                schedule.step()
            assert all(torch.equal(a, b) for a, b in zip(ours, theirs)), step
        # Not where the elements could fall in other vector chunks, nor on more threads.
        assert not FlatAdam.applies([torch.nn.Parameter(torch.zeros(100))])
        torch.set_num_threads(2)
        assert not FlatAdam.applies(ours)
    finally:
        torch.set_num_threads(before)


def test_images_at_the_models_size_skip_the_processor_with_the_same_pixels(bundle):
    """RGB images already at the model's size: the processor's resize and crop change nothing,
    its rescale is done for all at once, bit-identical; anything else goes to the processor."""
    import numpy as np
    from PIL import Image

    from lorsu_demo.data import _unit_pixels_as_is, to_unit_pixels

    processor = bundle.clip_image_processor
    side = bundle.image_size
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(40)
    ]
    images += [Image.new("RGB", (side, side), (255, 255, 255)), Image.new("RGB", (side, side))]

    def processed(pictures):
        out = processor(images=pictures, do_normalize=False, return_tensors="pt")
        return out["pixel_values"].float()

    fast = _unit_pixels_as_is(images, processor)
    assert fast is not None and torch.equal(fast, processed(images))
    other = Image.fromarray(rng.integers(0, 256, (side + 8, side - 3, 3), dtype=np.uint8))
    grey = Image.fromarray(rng.integers(0, 256, (side, side), dtype=np.uint8))
    for odd in (other, grey, images[0].convert("RGBA")):
        assert _unit_pixels_as_is([*images[:3], odd], processor) is None
        assert torch.equal(
            to_unit_pixels([*images[:3], odd], processor), processed([*images[:3], odd])
        )


def _session_trace(
    bundle, method, train, target, controls, monkeypatch, eval_threads, reader="clip"
):
    """A seeded session's events (steps and live points) and record."""
    from lorsu_demo.events import Done, Metrics, Phase, Step
    from lorsu_demo.methods import make_method
    from lorsu_demo.session import run_session

    monkeypatch.setenv("LORSU_EVAL_THREADS", str(eval_threads))
    events, record = [], None
    method = make_method(method, lr=1e-3, epochs=3, batch_size=4)
    for event in run_session(
        bundle, History(), method, train, target=target, controls=controls, seed=5, reader=reader
    ):
        if isinstance(event, Step):
            events.append(("step", event.step))
        elif isinstance(event, Metrics):
            events.append(("metrics", event.step, event.accuracies, event.ti, event.cc))
        elif isinstance(event, Phase):
            events.append(("phase", event.name))
        elif isinstance(event, Done):
            record = event.record
    return events, record


def test_live_points_measured_aside_match_those_measured_in_line(
    bundle, train_set, eval_sets, monkeypatch
):
    """On two evaluation threads the live points are measured on a frozen copy while training
    goes on, under CLIP's reader and the chat's: the same accuracies at the same steps, the
    same final record, bit for bit, and every point reported, in order, before the merge."""
    from lorsu_demo.model import Bundle

    copies = []
    real_copy = Bundle.frozen_copy
    monkeypatch.setattr(Bundle, "frozen_copy", lambda self: copies.append(1) or real_copy(self))
    target, control = eval_sets
    for method, reader in (("lorsu", "clip"), ("full", "clip"), ("lorsu", "mc")):
        args = (bundle, method, train_set, target, [control], monkeypatch)
        copies.clear()
        inline = _session_trace(*args, 1, reader)
        assert not copies  # one thread: measured in place
        aside = _session_trace(*args, 2, reader)
        assert len(copies) == len([e for e in aside[0] if e[0] == "metrics"]) - 2  # the live ones
        metrics_inline = [e for e in inline[0] if e[0] == "metrics"]
        metrics_aside = [e for e in aside[0] if e[0] == "metrics"]
        assert metrics_inline == metrics_aside and len(metrics_aside) >= 3, method
        steps = [e[1] for e in metrics_aside]
        assert steps == sorted(steps)
        # every live point is reported after its own step and before the update is merged
        order = [e[:2] for e in aside[0]]
        for step in steps[1:-1]:
            assert order.index(("step", step)) < order.index(("metrics", step))
            assert order.index(("metrics", step)) < order.index(("phase", "merging"))
        a, b = inline[1], aside[1]
        assert a.accuracies == b.accuracies and a.extra["live"] == b.extra["live"]
        assert a.delta.keys() == b.delta.keys()
        assert all(torch.equal(a.delta[k].values, b.delta[k].values) for k in a.delta)


def test_a_frozen_copy_reads_as_the_model_did_when_it_was_made(bundle, eval_sets):
    from lorsu_demo.evaluate import clip_predictions_many
    from lorsu_demo.vqa import mc_correct

    target, control = eval_sets
    pixels = target.pixels(bundle)
    frozen = bundle.frozen_copy()
    now, answers = bundle.image_features(pixels), mc_correct(bundle, target)
    assert torch.equal(frozen.image_features(pixels), now)
    assert frozen.clip.vision_model is frozen.vlm.model.vision_tower  # still one tower
    assert frozen.vision is not bundle.vision
    weight = bundle.vision_state()["projection.weight"]
    tower = bundle.vision_state()["vision.encoder.layers.0.mlp.fc1.weight"]
    saved = weight.detach().clone(), tower.detach().clone()
    try:
        weight.data.mul_(-1.0)  # training moves on; the copy does not
        tower.data.mul_(-1.0)
        assert torch.equal(frozen.image_features(pixels), now)
        assert torch.equal(mc_correct(frozen, target), answers)
        assert not torch.equal(bundle.image_features(pixels), now)
    finally:
        weight.data.copy_(saved[0])
        tower.data.copy_(saved[1])
    # the batches shared among two threads give the predictions one thread gives
    one = clip_predictions_many(bundle, [target, control], batch_size=3, workers=1)
    two = clip_predictions_many(bundle, [target, control], batch_size=3, workers=2)
    assert all(torch.equal(x, y) for x, y in zip(one, two))


def test_a_method_with_its_own_modules_is_measured_in_line(bundle, monkeypatch):
    """A hook or module of a method's own (DAC's router keeps its gates between calls) would be
    shared by a copy and by threads: such an encoder is measured on one thread, in place."""
    from lorsu_demo.evaluate import evaluation_workers

    monkeypatch.setenv("LORSU_EVAL_THREADS", "2")
    assert evaluation_workers(bundle) == 2 and bundle.frozen_copy() is not None
    handle = bundle.vision.encoder.layers[0].register_forward_pre_hook(lambda m, a: None)
    try:
        assert evaluation_workers(bundle) == 1
        assert bundle.frozen_copy() is None
    finally:
        handle.remove()
    assert evaluation_workers(bundle) == 2


def test_a_forked_worker_evaluates_on_its_own_thread(bundle, eval_sets, monkeypatch):
    """ZeroGPU forks its GPU workers from the server, whose evaluation pool already has
    threads: the child has none of them and must not hand jobs to the parent's pool (they
    would never run: the child would hang), nor start threads of its own (torch refuses to
    set up its thread pool in a new thread of a forked child, now and then)."""
    import os
    import pickle
    import select
    import signal

    from lorsu_demo.evaluate import clip_predictions_many, evaluation_workers

    monkeypatch.setenv("LORSU_EVAL_THREADS", "2")
    target, control = eval_sets
    assert evaluation_workers(bundle) == 2
    expected = clip_predictions_many(bundle, [target, control], batch_size=3, workers=2)
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # the forked worker
        try:
            assert evaluation_workers(bundle) == 1
            got = clip_predictions_many(bundle, [target, control], batch_size=3, workers=2)
            os.write(writer, pickle.dumps([g.tolist() for g in got]))
        except BaseException as error:  # said in the parent's failure
            os.write(writer, pickle.dumps(repr(error)))
        finally:
            os._exit(0)
    os.close(writer)
    try:
        ready, _, _ = select.select([reader], [], [], 60)
        assert ready, "the forked worker's evaluation did not finish within 60 s"
        data = b""
        while chunk := os.read(reader, 1 << 16):
            data += chunk
    finally:
        os.close(reader)
        os.kill(child, signal.SIGKILL)  # (a hung child would never exit)
        os.waitpid(child, 0)
    assert pickle.loads(data) == [e.tolist() for e in expected]


def test_evaluation_threads_only_where_a_core_is_left_over(bundle, monkeypatch):
    """Two threads while the sessions running leave a core free; one once they fill every
    core (a class on the app's CPU lanes), on a GPU, or with several torch threads."""
    from lorsu_demo import evaluate

    monkeypatch.delenv("LORSU_EVAL_THREADS", raising=False)
    monkeypatch.setattr(evaluate, "usable_cores", lambda: 2)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert evaluate.evaluation_workers(bundle) == 2
        evaluate.count_session(+1)
        assert evaluate.evaluation_workers(bundle) == 2  # one session, a core left over
        evaluate.count_session(+1)
        assert evaluate.evaluation_workers(bundle) == 1  # two sessions on two cores
        evaluate.count_session(-2)
        torch.set_num_threads(2)
        assert evaluate.evaluation_workers(bundle) == 1
    finally:
        torch.set_num_threads(before)
    assert evaluate.running_sessions() == 0


def test_a_stop_while_a_live_point_is_measured_aside_leaves_nothing(
    bundle, train_set, eval_sets, monkeypatch
):
    """Stopped right after a live point was handed to another thread (and, a second time,
    the generator closed there): the model is bit for bit what it was, the session no longer
    counts as running, and the next session runs as before."""
    from conftest import changed_keys, snapshot_model

    from lorsu_demo import evaluate
    from lorsu_demo.events import Step, Stopped
    from lorsu_demo.methods import make_method
    from lorsu_demo.session import run_session

    monkeypatch.setenv("LORSU_EVAL_THREADS", "2")
    target, control = eval_sets
    submitted = []
    real = evaluate.thread_pool

    def watching(workers):
        pool = real(workers)
        submit = pool.submit

        class Watched:
            def submit(self, *args):
                submitted.append(args)
                return submit(*args)

            def map(self, *args):
                return pool.map(*args)

        return Watched()

    monkeypatch.setattr("lorsu_demo.session.thread_pool", watching)
    before = snapshot_model(bundle)
    for how in ("stop", "close"):
        submitted.clear()
        method = make_method("lorsu", lr=1e-3, epochs=3, batch_size=4)
        events = run_session(
            bundle,
            History(),
            method,
            train_set,
            target=target,
            controls=[control],
            seed=5,
            should_stop=lambda how=how: bool(submitted) and how == "stop",
        )
        seen = []
        for event in events:
            seen.append(event)
            if how == "close" and isinstance(event, Step) and submitted:
                events.close()
                break
        assert submitted, "no live point was measured aside"
        if how == "stop":
            assert isinstance(seen[-1], Stopped)
        assert changed_keys(before, bundle) == set()
        assert evaluate.running_sessions() == 0
    again, _ = _session_trace(bundle, "lorsu", train_set, target, [control], monkeypatch, 2)
    assert [e for e in again if e[0] == "metrics"]
