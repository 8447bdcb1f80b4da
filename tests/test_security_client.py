"""Hostile input through the public API of a launched app (`gradio_client`), issue 10: bad chat
files get the app's own message (not Gradio's generic one), a crafted history is refused, and
another client's answers and the shared weights stay exactly as they were."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from bad_inputs import BAD_IMAGES, read_parts, valid_history, write_parts
from conftest_ui import make_core, serving
from gradio_client import Client, handle_file

QUESTION = "What is in this image?"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    core = make_core(tmp_path_factory.mktemp("security-client"))
    with serving(core, as_the_app=False) as url:
        yield core, url


def weights(core):
    return {k: v.detach().clone() for k, v in core.bundle.vision_state().items()}


def test_bad_files_and_crafted_histories_through_the_api(served, tmp_path):
    core, url = served
    image = str(Path(core.examples.folder) / "colours" / "test" / "red" / "000.png")
    victim, attacker = Client(url, verbose=False), Client(url, verbose=False)
    valid = valid_history(core, tmp_path / "valid.lorsu")
    assert victim.predict(handle_file(str(valid)), api_name="/import_history")["sessions"]
    before = [
        victim.predict(handle_file(image), QUESTION, v, True, api_name="/chat") for v in (0, 2)
    ]
    base = weights(core)

    for filename, data, expected in BAD_IMAGES.values():
        path = tmp_path / filename
        path.write_bytes(data)
        with pytest.raises(Exception, match=expected) as err:
            attacker.predict(handle_file(str(path)), QUESTION, -1, True, api_name="/chat")
        assert "upstream Gradio app has raised an exception" not in str(err.value)

    metadata, manifest, tensors = read_parts(valid)
    key = next(k for k in sorted(tensors) if k.endswith("/values"))
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    crafted = write_parts(tmp_path / "nan.lorsu", metadata, manifest, tensors)
    with pytest.raises(Exception, match="NaN or infinite values"):
        attacker.predict(handle_file(str(crafted)), api_name="/import_history")
    answer = attacker.predict(handle_file(image), QUESTION, -1, True, api_name="/chat")
    assert answer[0] == answer[1], "the attacker has no sessions: its answer is the base model's"

    assert all(torch.equal(base[k], v) for k, v in weights(core).items())
    after = [
        victim.predict(handle_file(image), QUESTION, v, True, api_name="/chat") for v in (0, 2)
    ]
    assert after == before
