"""The app's actions without a server: uploads, sessions, stop, chat, rollback, history files.

Everything here goes through `AppCore` (what every button and API endpoint calls) on
`tiny-random` with colour-square example domains written to a temp folder.
"""

import io
import json
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from conftest_ui import FAST, colour_image, make_core
from PIL import Image

from lorsu_demo.data import DataError
from lorsu_demo.events import Done, Scores, Step, Stopped
from lorsu_demo.history import History
from lorsu_demo.ui import engine, figures, uploads
from lorsu_demo.ui.core import UserError
from lorsu_demo.ui.uploads import Card
from lorsu_demo.vqa import names_class

QUESTION = "What is in this image?"


@pytest.fixture(scope="module")
def core(tmp_path_factory):
    return make_core(tmp_path_factory.mktemp("ui-core"))


def weights(core):
    return {k: v.detach().clone() for k, v in core.bundle.vision_state().items()}


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def run(core, key, data="colours", method="lorsu", shots=4, epochs=2, **settings):
    return list(core.train(key, data, method, shots, epochs, {**FAST, **settings}))


def test_train_streams_events_and_saves_one_session(core):
    before = weights(core)
    pairs = run(core, "train")
    events = [event for event, _ in pairs]
    kinds = [getattr(e, "kind", None) for e in events]
    assert kinds[0] == "phase" and isinstance(events[-1], Done)
    assert sum(isinstance(e, Step) for e in events) == 2 * 3  # 12 images, batch 4, 2 epochs
    assert any(isinstance(e, Scores) for e in events) and "probes" in kinds
    live = pairs[-1][1]
    assert live.tone == "done" and live.status.startswith("Done: session 1 saved")
    assert live.ti is not None and live.cc is not None and len(live.losses) == 6
    assert live.reader == "clip"  # the cards say what measured them
    assert set(live.answers) == {"base", "before", "after"}
    # the probes were picked from the pool among the images the model answered wrong
    pool = core.examples.get("colours").probe_pool()
    picked = next(e for e in events if getattr(e, "picked", None) is not None).picked
    assert len(live.probes) == len(picked) == 5 and set(picked) <= set(range(len(pool)))
    assert [p.label for p in live.probes] == [pool[i].label for i in picked]
    said = engine.probe_answers(core.bundle, pool, [])  # the base model: session 1
    assert live.answers["before"] == [said[i] for i in picked]
    wrong = sum(not names_class(a, p.label) for a, p in zip(said, pool))
    shown = sum(not names_class(said[i], pool[i].label) for i in picked)
    assert shown == min(5, wrong)
    ws = core.workspace("train")
    assert len(ws.history) == 1 and not ws.busy
    # the record carries every example domain and the control set (for the matrix)
    assert {"colours", "mixes", "control:control"} <= set(ws.history.sessions[0].accuracies)
    assert same(before, weights(core)), "the shared model must be left exactly as it was"
    assert not core.bundle.lock.locked()


def test_the_reader_is_chosen_per_history(core):
    key = "reader"
    events = list(core.train(key, "colours", "lorsu", 4, 1, FAST, reader="mc"))
    assert isinstance(events[-1][0], Done)
    record = core.workspace(key).history.sessions[0]
    assert record.extra["reader"] == "mc"
    # another reader would mix base accuracies read two ways: refused, nothing saved
    event, live = list(core.train(key, "colours", "lorsu", 4, 1, FAST, reader="clip"))[-1]
    assert live.tone == "error" and "'mc' reader" in live.status
    assert len(core.workspace(key).history) == 1 and not core.bundle.lock.locked()
    event, live = list(core.train(key, "colours", "lorsu", 4, 1, FAST, reader="pixels"))[-1]
    assert live.tone == "error" and "Unknown reader" in live.status


def test_stop_between_steps_leaves_no_session(core):
    before = weights(core)
    key = "stop"
    core.arm(key)
    seen = []
    for event, _ in core.train(key, "colours", "lorsu", 4, 5, FAST):
        seen.append((event, _))
        if isinstance(event, Step) and event.step == 2:
            assert "Stopping" in core.stop(key)
    event, live = seen[-1]
    assert isinstance(event, Stopped) and live.tone == "stopped"
    assert "nothing changed" in live.status
    assert len(core.workspace(key).history) == 0 and not core.workspace(key).busy
    assert same(before, weights(core)) and not core.bundle.lock.locked()
    # a stop pressed while the session waits in the queue stops it before it starts
    core.arm(key)
    core.stop(key)
    pairs = list(core.train(key, "colours", "lorsu", 4, 1, FAST))
    assert pairs[-1][1].status == "Stopped before it started: nothing changed."
    core.arm(key)
    assert isinstance(run(core, key, epochs=1)[-1][0], Done)


def test_closing_the_generator_leaves_no_session(core):
    """What a cancelled Gradio event does: close the handler's generator mid-session."""
    before = weights(core)
    events = core.train("closed", "colours", "lorsu", 4, 5, FAST)
    for event, _ in events:
        if isinstance(event, Step) and event.step == 3:
            break
    events.close()
    ws = core.workspace("closed")
    assert len(ws.history) == 0 and not ws.busy
    assert same(before, weights(core)) and not core.bundle.lock.locked()


def test_refusals_are_messages_not_tracebacks(core):
    def last(*args, **kwargs):
        pairs = list(core.train(*args, **kwargs))
        assert len(pairs) == 1 and pairs[0][1].tone == "error"
        return pairs[0][1].status

    assert "Pick example data" in last("refuse", None, "lorsu", 5, 1)
    assert "no example domain" in last("refuse", "nope", "lorsu", 5, 1)
    assert "Unknown method" in last("refuse", "colours", "magic", 5, 1)
    assert "must be a number" in last("refuse", "colours", "lorsu", 5, 1, {"lr": "fast"})
    assert "at least one shot" in last("refuse", "colours", "lorsu", 0, 1)
    # a method's own check, raised inside the session: still a message, nothing saved
    pairs = list(core.train("refuse", "colours", "lorsu", 2, 1, {**FAST, "heads": 99}))
    assert pairs[-1][1].tone == "error" and "heads must be between" in pairs[-1][1].status
    assert len(core.workspace("refuse").history) == 0 and not core.bundle.lock.locked()
    ws = core.workspace("refuse")
    ws.busy = True
    try:
        assert "already running" in last("refuse", "colours", "lorsu", 5, 1)
        with pytest.raises(UserError, match="stop it"):
            core.rollback("refuse", 0)
    finally:
        ws.busy = False


def test_chat_versions_and_rollback_restore_answers_exactly(core):
    key = "chat"
    folder = Path(core.examples.folder) / "colours" / "test"
    images = [str(p) for p in sorted(folder.rglob("*.png"))]

    def ask(version, image):
        return list(core.chat(key, image, QUESTION, version, True))[-1]

    run(core, key, lr=1e-2, epochs=3)
    first = {image: ask(1, image)[0] for image in images}
    base = {image: ask(0, image)[0] for image in images}
    changed = [i for i in images if first[i] != base[i]]
    assert changed, "session 1 should change at least one answer of the random model"
    answer, base_answer = ask(-1, changed[0])
    assert answer == first[changed[0]] and base_answer == base[changed[0]]
    run(core, key, data="mixes", method="full", lr=1e-2)
    assert len(core.workspace(key).history) == 2
    before = weights(core)
    message = core.rollback(key, 1)
    assert message == "Rolled back to session 1: session 2 removed exactly."
    assert {i: ask(None, i)[0] for i in images} == first
    assert same(before, weights(core))
    assert core.rollback(key, 1).startswith("Nothing to roll back")
    with pytest.raises(UserError, match="no session 5"):
        core.rollback(key, 5)
    streamed = list(core.chat(key, changed[0], QUESTION, 1, False))
    assert streamed[-1] == (first[changed[0]], None) and len(streamed) >= 1


def test_chat_refuses_bad_input_with_messages(core, tmp_path):
    with pytest.raises(UserError, match="Add an image"):
        list(core.chat("bad", None, QUESTION))
    image = tmp_path / "ok.png"
    colour_image(__import__("numpy").random.default_rng(0), (0,)).save(image)
    with pytest.raises(UserError, match="Type a question"):
        list(core.chat("bad", str(image), "  "))
    with pytest.raises(UserError, match="no session 3"):
        list(core.chat("bad", str(image), QUESTION, 3))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a picture")
    with pytest.raises(UserError, match="not an image"):
        list(core.chat("bad", str(broken), QUESTION))


def test_history_file_round_trip_and_bad_uploads(core, tmp_path):
    run(core, "saver", lr=1e-2)
    path = core.export_history("saver")
    assert path.exists() and path.suffix == ".lorsu"
    assert core.import_history("loader", str(path)) == f"Loaded 1 session from {path.name}."
    assert core.sessions("loader")["sessions"] == core.sessions("saver")["sessions"]
    image = Path(core.examples.folder) / "colours" / "test" / "red" / "000.png"
    assert (
        list(core.chat("loader", str(image), QUESTION))[-1]
        == list(core.chat("saver", str(image), QUESTION))[-1]
    )

    junk = tmp_path / "notes.txt"
    junk.write_text("hello")
    with pytest.raises(UserError, match="not a lorsu-demo history file"):
        core.import_history("loader", str(junk))
    cut = tmp_path / "cut.lorsu"
    cut.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(UserError, match="damaged|truncated"):
        core.import_history("loader", str(cut))
    other = History.load(path)
    other.model = {**other.model, "model": "llava-1.5-7b"}
    other.save(tmp_path / "other.lorsu")
    with pytest.raises(UserError, match="made on the model 'llava-1.5-7b'"):
        core.import_history("loader", str(tmp_path / "other.lorsu"))
    with pytest.raises(UserError, match="Nothing to download"):
        core.export_history("nobody")
    assert len(core.workspace("loader").history) == 1, "a failed upload changes nothing"


def test_model_export_is_a_loadable_folder(core, tmp_path):
    run(core, "export", lr=1e-2)
    path = core.export_model("export", 1)
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        manifest = json.loads(archive.read("tiny-random-session1/bundle.json"))
        archive.extractall(tmp_path)
    assert manifest["format"] == "lorsu-demo-bundle" and manifest["clip"] == "clip"
    assert "tiny-random-session1/model.safetensors" in names
    from lorsu_demo.delta import applied
    from lorsu_demo.model import load_bundle

    loaded = load_bundle(str(tmp_path / "tiny-random-session1"), device="cpu")
    state = core.bundle.vision_state()
    with applied(state, core.workspace("export").history.deltas(1)):
        name = "vision.encoder.layers.0.mlp.fc1.weight"
        assert torch.equal(loaded.vision_state()[name], state[name])


def test_gpu_workers_take_and_give_picklable_values(core):
    """ZeroGPU runs workers in a forked process: what goes in and out must pickle, and a
    worker must hand the session back as a record instead of changing the main process."""
    data = core.examples.get("colours")
    history = History(model=core.bundle.source)
    args = (history, "lorsu", {**FAST, "epochs": 1}, data.session_images(3, 1), data.target,
            core.controls, [], data.probes(), 1, 3)  # fmt: skip
    args = pickle.loads(pickle.dumps(args))
    events = [pickle.loads(pickle.dumps(e)) for e in engine.session_worker(*args)]
    assert isinstance(events[-1], Done) and len(history) == 0
    history.append(events[-1].record)
    deltas = pickle.loads(pickle.dumps(history.deltas()))
    image = data.domain.test.items[0].image
    said = [
        pickle.loads(pickle.dumps(x)) for x in engine.chat_worker(image, QUESTION, deltas, True)
    ]
    assert said[-1][0] == "base" and any(which == "adapted" for which, _ in said)


def test_sessions_summary_and_tables(core):
    run(core, "table", lr=1e-2)
    info = core.sessions("table")
    assert info["sessions"][0]["session"] == 1 and info["model"] == "tiny-random"
    assert "colours" in info["accuracy_matrix"]["sets"]
    assert core.version_choices("table")[-1] == ("1 · after lorsu on colours", 1)
    row = core.table_rows("table")[0]
    assert row[:3] == [1, "lorsu", "colours"] and row[6].startswith(("+", "-"))


def test_workspaces_are_separate_and_dropped_on_close(core):
    run(core, "alice", epochs=1)
    assert len(core.workspace("alice").history) == 1
    assert len(core.workspace("bob").history) == 0
    core.close("alice")
    assert "alice" not in core.store
    assert len(core.workspace("alice").history) == 0
    # a tab closed mid-session: the session stops, nothing is kept, the workspace goes
    events = core.train("carol", "colours", "lorsu", 4, 5, FAST)
    for event, _ in events:
        if isinstance(event, Step):
            core.close("carol")
            assert "carol" in core.store
    assert "carol" not in core.store and not core.bundle.lock.locked()


# ---- uploads ---------------------------------------------------------------------------------
def save(tmp_path, name, channels=(0,), seed=0):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    colour_image(__import__("numpy").random.default_rng(seed), channels).save(path)
    return str(path)


def test_class_cards(core, tmp_path):
    reds = [save(tmp_path, f"r{i}.png", (0,), i) for i in range(3)]
    blues = [save(tmp_path, f"b{i}.png", (2,), i) for i in range(3)]
    data = core.upload("cards", [Card("Red", reds), Card("blue_ish", blues), Card("", [])])
    assert data.name == "my images 1" and data.classes == ["Red", "blue ish"]
    assert len(data.domain.train) + len(data.domain.test) == 6 and data.domain.test.items
    assert core.workspace("cards").selected == "my images 1"
    # a session trains on it; the next upload gets a new name (its base is measured anew)
    assert isinstance(run(core, "cards", data="uploaded", shots=2, epochs=1)[-1][0], Done)
    again = core.upload("cards", [Card("red", reds), Card("blue", blues)])
    assert again.name == "my images 2"

    cases = [
        ([Card("red", reds)], "Only one class"),
        ([Card("red", reds), Card("", blues)], "Empty label"),
        ([Card("red", reds), Card("Red", blues)], "both called"),
        ([Card("red", reds), Card("blue", [])], "has no images"),
        ([Card("red", reds), Card("blue", blues[:1])], "only one image"),
        ([], "Nothing to use yet"),
    ]
    for cards, message in cases:
        with pytest.raises(UserError, match=message):
            core.upload("cards-bad", cards)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(UserError, match="broken.png"):
        core.upload("cards-bad", [Card("red", reds), Card("blue", [*blues, str(broken)])])


def zip_of(entries: dict[str, bytes]) -> io.BytesIO:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer


def png(channels=(0,), seed=0) -> bytes:
    buffer = io.BytesIO()
    colour_image(__import__("numpy").random.default_rng(seed), channels).save(buffer, "PNG")
    return buffer.getvalue()


def test_zip_uploads(core, tmp_path):
    path = tmp_path / "ok.zip"
    entries = {f"pets/{c}/{i}.png": png(ch, i) for c, ch in (("cat", (0,)), ("dog", (1,)))
               for i in range(3)}  # fmt: skip
    entries["pets/README.md"] = b"hello"
    entries["__MACOSX/pets/._cat"] = b"junk"
    path.write_bytes(zip_of(entries).getvalue())
    data = core.upload("zip", zip_path=str(path))
    assert data.classes == ["cat", "dog"]

    split = tmp_path / "split.zip"
    split.write_bytes(
        zip_of(
            {
                f"{s}/{c}/{i}.png": png(ch, i)
                for s in ("train", "test")
                for c, ch in (("cat", (0,)), ("dog", (1,)))
                for i in range(2)
            }  # fmt: skip
        ).getvalue()
    )
    data = core.upload("zip", zip_path=str(split))
    assert len(data.domain.train) == 4 and len(data.domain.test) == 4

    bad = {
        "loose.zip": ({"a.png": png(), "b.png": png()}, "not inside a class folder"),
        "text.zip": ({"cat/a.png": png(), "dog/notes.exe": b"MZ"}, "not a PNG"),
        "one.zip": ({"cat/a.png": png(), "cat/b.png": png()}, "Only one class"),
        "empty.zip": ({"README.md": b"x"}, "holds no images"),
        "fake.zip": ({"cat/a.png": b"nope", "dog/b.png": png()}, "not an image"),
    }
    for name, (content, message) in bad.items():
        (tmp_path / name).write_bytes(zip_of(content).getvalue())
        with pytest.raises(UserError, match=message):
            core.upload("zip-bad", zip_path=str(tmp_path / name))
    (tmp_path / "not.zip").write_bytes(b"plain text")
    with pytest.raises(UserError, match="not a readable zip"):
        core.upload("zip-bad", zip_path=str(tmp_path / "not.zip"))


def test_named_files(core, tmp_path):
    files = [save(tmp_path / "n", f"{c}_{i:02d}.png", ch, i)
             for c, ch in (("stop_sign", (0,)), ("yield", (1,))) for i in range(3)]  # fmt: skip
    data = core.upload("named", files=files)
    assert data.classes == ["stop sign", "yield"]
    with pytest.raises(UserError, match="name files <class>_<anything>"):
        core.upload("named-bad", files=[*files, save(tmp_path, "photo.png")])
    with pytest.raises(DataError, match="too many"):
        uploads._count_check(uploads.MAX_UPLOAD_IMAGES + 1)


# ---- pieces of the view ----------------------------------------------------------------------
def test_figures_and_html():
    figure = figures.scores_figure(
        [[1.0, 2.0, 0.5], [0.0, 3.0, 1.0]], [[1], [1, 2]], [0.1, 0.1], 1, 2, 3, "lorsu"
    )
    ticks = [t.get_text() for t in figure.axes[0].get_yticklabels()]
    assert figure.axes and "not read" in ticks[-1]  # beside the row, not over its boxes
    assert not any("not read" in t for t in ticks[:-1]) and not figure.axes[0].texts
    assert figures.scores_figure(None, [[], []], [0.0, 0.0], 1, 2, 3, "lora").axes
    html = figures.metrics_html(12.5, -3.0, 80, 67.5, 40, 43)
    assert "+12.5" in html and "lorsu-good" in html and "lorsu-bad" in html
    assert "needs a control set" in figures.metrics_html(1.0, None)
    assert "needs a control set" not in figures.metrics_html(None, None, control=True)
    assert figures.names_class("it is a stop sign.", "stop sign")
    assert not figures.names_class("a stopwatch", "stop")
    probes = [engine.Probe(Image.new("RGB", (8, 8)), "red")]
    table = figures.probes_html(probes, {"base": ["a red"], "after": ["blue"]}, QUESTION)
    body = table.split("<tbody>")[1]
    assert body.count("&#10004;") == 1 and body.count("&#10008;") == 1 and "lorsu-wait" in body
    foot = table.split("<tfoot>")[1]
    assert foot.index("1 of 1 right") < foot.index("0 of 1 right")  # base, then after
    assert figures.pretty("control:control") == "control"
    # a sawtooth of small last batches becomes one point per epoch
    losses = [(1, 2.0), (2, 1.8), (3, 0.2), (4, 1.2), (5, 1.0), (6, 0.1)]
    ends, means = figures.epoch_means(losses, [1, 1, 1, 2, 2, 2])
    assert ends == [3, 6] and means == pytest.approx([4.0 / 3, 2.3 / 3])
    curves = figures.curves_figure(losses, [], 6, epochs=[1, 1, 1, 2, 2, 2])
    assert "per epoch" in curves.axes[0].get_title()
    small = Image.new("RGB", (32, 32), (200, 10, 10))
    small.putpixel((0, 0), (0, 0, 255))
    shown = figures.for_display(small)
    assert shown.size == (256, 256) and shown.getpixel((7, 7)) == (0, 0, 255)  # sharp pixels
    assert shown.getpixel((8, 8)) == (200, 10, 10)
    assert figures.for_display(Image.new("RGB", (300, 200))).size == (300, 200)


def test_settings_are_cleaned():
    assert engine.clean_settings("lorsu", {"heads": 3.0, "lr": "0.01", "nope": 1}) == {
        "heads": 3,
        "lr": 0.01,
    }
    for bad in ({"heads": 2.5}, {"lr": float("nan")}, {"lr": -1}, {"epochs": 0}):
        with pytest.raises(ValueError):
            engine.clean_settings("lorsu", bad)


def test_missing_toy_model_falls_back_to_tiny_random(monkeypatch, tmp_path):
    from lorsu_demo import model

    monkeypatch.setattr(model, "ASSETS_DIR", tmp_path)
    monkeypatch.setattr(engine, "ASSETS_DIR", tmp_path)
    bundle, notice = engine.load_model("toy")
    assert bundle.name == "tiny-random" and "toy model is missing" in notice
    with pytest.raises(model.BundleError):
        engine.load_model(str(tmp_path / "nothing-here"))


def test_the_app_subcommand_is_registered():
    from lorsu_demo.cli import build_parser

    args = build_parser().parse_args(["app", "--model", "tiny-random", "--port", "7999"])
    assert args.command == "app" and args.model == "tiny-random" and args.port == 7999


def test_the_app_reads_accuracy_through_the_vlm_when_asked(core, monkeypatch):
    """LORSU_READER=mc makes the session's TI and CC come from the VLM's multiple-choice answers."""
    monkeypatch.setenv("LORSU_READER", "mc")
    data = core.examples.get("colours")
    history = History(model=core.bundle.source)
    args = (history, "lorsu", {**FAST, "epochs": 1}, data.session_images(3, 1), data.target,
            core.controls, [], [], 1, 3)  # fmt: skip
    record = list(engine.session_worker(*args))[-1].record
    assert record.extra["reader"] == "mc"
    assert all(0 <= v <= 100 for v in record.accuracies.values())


def test_two_images_per_class_give_a_valid_shots_slider(core, tmp_path):
    """Two images per class (one kept to test on) leave one shot: the slider must still be one
    Gradio accepts (maximum above minimum), fixed at that one shot."""
    from lorsu_demo.ui.tab_teach import shots_update

    reds = [save(tmp_path, f"r{i}.png", (0,), i) for i in range(2)]
    blues = [save(tmp_path, f"b{i}.png", (2,), i) for i in range(2)]
    data = core.upload("two-each", [Card("red", reds), Card("blue", blues)])
    most = data.max_shots()
    assert most == 1
    update = shots_update(most)
    assert update["maximum"] > 1 and update["value"] == 1 and update["interactive"] is False
    import gradio as gr  # Gradio's own check, which the old update (maximum 1) failed

    gr.Slider(1, update["maximum"], value=update["value"], step=1)
    assert shots_update(8)["maximum"] == 8 and shots_update(8)["interactive"] is True


def test_probes_are_picked_where_the_model_is_wrong_one_class_at_a_time():
    image = Image.new("RGB", (8, 8))
    pool = [engine.Probe(image, label) for label in "abcdeabcdeabcde"]
    right = {0: "an a", 2: "a c", 6: "a b", 12: "a c"}  # pool index: a right answer
    answers = [right.get(i, "no idea") for i in range(len(pool))]
    picked = engine.pick_probes(pool, answers, 5)
    assert picked == [1, 3, 4, 5, 7]  # wrong ones, a class each: b d e a c (c's first is right)
    # fewer wrong answers than probes: all wrong ones, then right ones fill in
    answers = ["right " + p.label for p in pool]
    answers[4] = answers[9] = "nothing"
    picked = engine.pick_probes(pool, answers, 5)
    assert {4, 9} <= set(picked) and len(picked) == 5
    assert {pool[i].label for i in picked if i not in (4, 9)} == {"a", "b", "c"}
    assert engine.pick_probes(pool[:2], ["x", "y"], 5) == [0, 1]


def test_the_probe_pool_spreads_classes_and_starts_with_what_is_shown(core):
    data = core.examples.get("colours")
    pool = data.probe_pool()
    classes = data.domain.test.classes
    assert data.probes() == pool[:5] and len({p.label for p in pool}) == len(classes)
    firsts = [p.label for p in pool[: len(classes)]]
    assert sorted(firsts) == sorted(classes)  # one of each class before a second of any
    assert len(pool) <= 30
