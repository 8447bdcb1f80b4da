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
