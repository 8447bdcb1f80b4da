"""`bench classroom`: the app started on a free port, clients training at once through /train,
the figures written into the benchmarks page (a small class on tiny-random here)."""

import json

from conftest_ui import write_world

from lorsu_demo import cli
from lorsu_demo.bench_classroom import END, START, classroom, doc_block, write_doc


def test_two_clients_train_at_once_through_the_public_api(tmp_path):
    domains, control = write_world(tmp_path)
    result = classroom(
        clients=2,
        data="colours",
        shots=2,
        epochs=1,
        settings={"batch_size": 4},
        model="tiny-random",
        domains=str(domains),
        control=[str(control)],
        timeout=600,
    )
    assert result["finished"] == 2 and result["failed"] == 0, result["errors"]
    assert 0 < result["first_s"] <= result["median_s"] <= result["last_s"]
    assert len(result["ti"]) == 1  # same data, shots and seed: both clients got one session
    assert result["served_after_s"] > 0


def test_the_figures_replace_their_block_in_the_page(tmp_path):
    page = tmp_path / "benchmarks.md"
    page.write_text("# Benchmarks\n\nSomething else.\n")
    result = {
        "clients": 30, "finished": 30, "failed": 0, "last_s": 80.5, "median_s": 41.0,
        "first_s": 3.1, "served_after_s": 9.0, "cpus": 2, "load_average": [1.0, 1.0, 1.0],
        "session": {"method": "lorsu", "shots": 5, "data": "seven-segment"},
    }  # fmt: skip
    write_doc(page, doc_block(result, "python -m lorsu_demo bench classroom --clients 30", "now"))
    first = page.read_text()
    assert "Something else." in first and first.count(START) == 1
    assert "**Last client done after 80.5 s**, median 41.0 s" in first and ": met." in first
    result["last_s"] = 95.0
    write_doc(page, doc_block(result, "python -m lorsu_demo bench classroom --clients 30", "now"))
    second = page.read_text()
    assert second.count(START) == second.count(END) == 1
    assert "after 95.0 s" in second and "not met" in second and "80.5" not in second


def test_the_command_prints_json_and_writes_the_page(tmp_path, capsys, monkeypatch):
    domains, control = write_world(tmp_path)
    page = tmp_path / "page.md"
    argv = ["bench", "classroom", "--clients", "1", "--data", "mixes", "--shots", "2"]
    argv += ["--epochs", "1", "--settings", '{"batch_size": 4}', "--model", "tiny-random"]
    argv += ["--domains", str(domains), "--control", str(control), "--doc", str(page), "--json"]
    assert cli.main(argv) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["finished"] == 1 and printed["session"]["data"] == "mixes"
    text = page.read_text()
    assert "--clients 1 --data mixes --shots 2 --epochs 1" in text
    assert f"after {printed['last_s']} s" in text


def test_bench_start_reports_each_run_and_the_median(monkeypatch):
    """`bench start`: one app per run, each stopped after its first 200; runs and median."""
    from lorsu_demo import bench_classroom

    started, stopped = [], []

    class App:
        log = type("Log", (), {"close": lambda self: None})()

        def terminate(self):
            stopped.append(1)

        def wait(self):
            return 0

    def start_app(port, state, model, domains):
        started.append((port, state))
        return App()

    times = iter([9.0, 7.5, 8.25])
    monkeypatch.setattr(bench_classroom, "start_app", start_app)
    later = iter([3.0, 2.5, 4.0])
    monkeypatch.setattr(bench_classroom, "wait_until_served", lambda process, port: next(times))
    monkeypatch.setattr(bench_classroom, "wait_until_ready", lambda process, log: next(later))
    result = bench_classroom.time_to_serve(runs=3)
    assert result == {
        "runs": [9.0, 7.5, 8.25],
        "median": 8.25,
        "min": 7.5,
        "ready": {"runs": [12.0, 10.0, 12.25], "median": 12.0, "min": 10.0},
    }
    assert len(started) == len(stopped) == 3
    assert len({state for _, state in started}) == 3  # a state folder of its own each time
