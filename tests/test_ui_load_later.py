"""`python app.py` serves the page before the model is loaded: the page is built from the bundle
folder's config files (`model.bundle_info`), the weights load after the server is up, and
whatever needs the model waits for it."""

import threading
import urllib.request

import pytest
from conftest_ui import _TEMP  # noqa: F401 - sets Gradio's temp dir before gradio is imported

from lorsu_demo import model
from lorsu_demo.model import BundleError, bundle_info, load_bundle
from lorsu_demo.ui import engine
from lorsu_demo.ui.app import LOADING, READY, build_app, launch
from lorsu_demo.ui.common import GPU
from lorsu_demo.ui.core import AppCore, UserError


@pytest.fixture(scope="module")
def toy():
    return load_bundle("toy")


def test_the_info_read_from_config_files_is_the_loaded_bundle_s(toy):
    info = bundle_info("toy")
    for name in ("name", "device", "num_layers", "num_heads", "image_size", "layers_read_by_vlm"):
        assert getattr(info, name) == getattr(toy, name), name
    assert info.labels == toy.labels and info.defaults == toy.defaults
    assert info.control_dir == toy.control_dir
    # The estimate counts the layers' weight matrices: most of the encoder, never more.
    assert 0.8 * toy.encoder_parameters < info.encoder_parameters <= toy.encoder_parameters
    assert engine.pool_size(info) == engine.pool_size(toy)


def test_only_a_bundle_folder_loaded_as_it_is_is_shown_before_loading(tmp_path, monkeypatch):
    monkeypatch.delenv("LORSU_CLIP", raising=False)
    assert bundle_info("tiny-random") is None
    assert bundle_info("llava-1.5-7b") is None
    assert bundle_info("toy", clip=str(tmp_path)) is None  # another CLIP: loaded first
    assert bundle_info(str(tmp_path / "nothing-here")) is None
    (tmp_path / model.BUNDLE_FILE).write_text("{not json")
    assert bundle_info(str(tmp_path)) is None  # loading it gives the proper error


def _lazy_core(tmp_path):
    return AppCore(
        None,
        None,
        model.ASSETS_DIR / "domains",
        work_dir=tmp_path / "work",
        state_dir=tmp_path / "state",
        info=bundle_info("toy"),
    )


def _in_thread(fn, timeout=60):
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", fn()), daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "it waited for the model"
    return result["value"]


def test_the_page_is_served_while_the_model_loads_and_calls_wait_for_it(tmp_path, toy):
    saved = dict(engine._MODEL)
    core = _lazy_core(tmp_path)
    try:
        demo = _in_thread(lambda: build_app(core))  # never touches the model
        assert not core.ready and core.controls[0].name == "control:control"
        assert GPU["concurrency_limit"] == engine.lane_width(toy)
        launch(demo, host="127.0.0.1", prevent_thread_lock=True, quiet=True)
        try:
            page = urllib.request.urlopen(demo.local_url, timeout=30)
            assert page.status == 200
            config = urllib.request.urlopen(demo.local_url + "config", timeout=30).read()
            assert LOADING.split("…")[0].encode() in config and READY.encode() not in config

            got = {}
            waiter = threading.Thread(target=lambda: got.setdefault("bundle", core.bundle))
            waiter.start()
            waiter.join(0.5)
            assert waiter.is_alive()  # a call that needs the model waits for it

            core.load(lambda: (toy, None))
            waiter.join(30)
            assert got["bundle"] is toy and core.ready and core.info is toy
            assert engine._MODEL["pool"].qsize() == engine.pool_size(toy)
            key, ws = core.attach("page", None)
            assert len(ws.history) == 0 and ws.history.model == toy.source
        finally:
            demo.close()
    finally:
        engine._MODEL.clear()
        engine._MODEL.update(saved)


def test_a_model_that_fails_to_load_is_reported_to_every_waiting_call(tmp_path):
    saved = dict(engine._MODEL)
    core = _lazy_core(tmp_path)

    def broken():
        raise BundleError("the weights in toy/vlm are cut short")

    try:
        with pytest.raises(BundleError):
            core.load(broken)
        assert not core.ready
        with pytest.raises(UserError, match="could not be loaded.*cut short"):
            _ = core.bundle
        with pytest.raises(UserError, match="cut short"):
            core.attach("page", None)
    finally:
        engine._MODEL.clear()
        engine._MODEL.update(saved)


def test_a_core_needs_a_model_or_its_info():
    with pytest.raises(ValueError):
        AppCore(None)
