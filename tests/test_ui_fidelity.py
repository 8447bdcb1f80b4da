"""CC beside the other sets, and KeepLoRA's free dimensions, as the app shows them (issue 11)."""

import pytest
from conftest_ui import FAST, make_core

from lorsu_demo.events import Done


@pytest.fixture(scope="module")
def core(tmp_path_factory):
    return make_core(tmp_path_factory.mktemp("ui-fidelity"))


def test_a_session_reports_every_other_set_beside_cc(core):
    pairs = list(core.train("others", "colours", "lorsu", 4, 2, {**FAST, "lr": 5e-2}))
    event, live = pairs[-1]
    assert isinstance(event, Done)
    record = event.record
    others = record.extra["others"]
    # The other example domain is measured and reported; the target and the control are not.
    assert set(others["sets"]) == {"mixes"}
    mixes = others["sets"]["mixes"]
    base = core.workspace("others").history.base["mixes"]
    assert mixes["change"] == pytest.approx(record.accuracies["mixes"] - base)
    assert others["worst"] == "mixes" and others["worst_change"] == mixes["change"]
    assert f"worst mixes {mixes['change']:+.1f}" in live.status
    row = core.table_rows("others")[0]
    assert row[8] == f"mixes {mixes['change']:+.1f}"


def test_keeplora_free_dimensions_are_shown(core):
    event, live = list(core.train("free", "colours", "keeplora", 4, 1, FAST))[-1]
    assert isinstance(event, Done)
    free = event.record.extra["free_dims_after"]
    assert len(free) == core.bundle.num_layers
    shown = " · ".join(
        f"L{l} {'/'.join(str(n) for n in row.values())}" for l, row in enumerate(free)
    )
    assert f"Free dimensions left (q/k/v/out per layer): {shown}." in live.status


def test_dac_keeps_its_authors_setting_in_the_app(core):
    from lorsu_demo.ui import engine, text

    # tiny-random's preset sets lr 1e-3 for LoRSU; DAC keeps its authors' 2e-3.
    assert core.bundle.defaults["lr"] != 2e-3
    values = engine.settings_for(core.bundle, "dac")
    assert (values["iterations"], values["batch_size"], values["lr"]) == (500, 32, 2e-3)
    assert engine.planned_steps(12, values) == 500
    assert engine.planned_steps(12, {**values, "iterations": 0, "epochs": 2}) == 2 * 1  # 12 / 32
    assert "500 steps of 32 images" in text.METHODS_HELP["dac"]
