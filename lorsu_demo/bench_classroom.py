"""`python -m lorsu_demo bench classroom --clients 30`: a class training at once.

Starts the app (`python app.py`, the offline toy by default) on a free port with its own
temporary state folder, waits until it serves, then has `--clients` `gradio_client` clients,
each its own workspace like a browser tab, train one default session at the same moment
through the public API (`/train`). Prints, for the run, when the last client finished and the
median client's time (both from the common start), and writes them into
`docs/benchmarks.md` between the classroom markers (`--doc`, or `--no-doc`).

On a CPU the app runs one session at a time (one shared model, the GPU lane of width 1), so
the last client's time is about the sum of every client's session: the figure says what a
class of that size waits on this machine.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from .ui.text import READY_LOG
from .ui.zerogpu import cpu_lanes

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
START, END = "<!-- classroom:start -->", "<!-- classroom:end -->"
DEFAULTS = {"data": "seven-segment", "method": "lorsu", "shots": 5}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_app(
    port: int, state: Path, model: str | None, domains: str | None, control=None, lanes=None
):
    """`python app.py` on 127.0.0.1:port, its state and temp files under `state`; `lanes`:
    its LORSU_CPU_LANES (default: the app's own)."""
    env = dict(
        os.environ,
        GRADIO_ANALYTICS_ENABLED="False",
        GRADIO_TEMP_DIR=str(state / "gradio"),
        LORSU_STATE_DIR=str(state / "state"),
        TMPDIR=str(state / "tmp"),
    )
    if lanes:
        env["LORSU_CPU_LANES"] = str(lanes)
    (state / "tmp").mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(ROOT / "app.py"), "--host", "127.0.0.1", "--port", str(port)]
    if model:
        command += ["--model", model]
    if domains:
        command += ["--domains", str(domains)]
    for folder in control or []:
        command += ["--control", str(folder)]
    log = open(state / "app.log", "wb")  # noqa: SIM115 - closed with the process
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    process.log = log
    return process


def wait_until_served(process, port: int, timeout: float = 300) -> float:
    """Seconds until the app's page answers 200; raises if it exits or times out."""

    def served() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as answer:
                return answer.status == 200
        except OSError:
            return False

    return _wait_for(process, served, timeout, "serve")


def wait_until_ready(process, log_path: Path, timeout: float = 300) -> float:
    """Seconds until the app's log says the model is loaded (`ui.text.READY_LOG`), which is
    after the page is served where the page is served first; raises if it exits or times out."""
    return _wait_for(
        process, lambda: READY_LOG in log_path.read_text(errors="replace"), timeout, "load"
    )


def _wait_for(process, done, timeout: float, what: str) -> float:
    """Seconds until `done()`, polled every 0.1 s while the app runs."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        if done():
            return time.perf_counter() - started
        if process.poll() is not None:
            raise RuntimeError(f"the app exited with code {process.returncode}")
        time.sleep(0.1)
    raise RuntimeError(f"the app did not {what} within {timeout:.0f} s")


def one_client(url, request: dict, ready, start: threading.Event, out: dict, index: int):
    """One student: connect, wait for the common start, train one session, note when done."""
    from gradio_client import Client

    try:
        client = Client(url, verbose=False)
    except Exception as err:  # reported in the result, not raised from a thread
        out[index] = {"ok": False, "error": f"could not connect: {err!r}"[:300]}
        return
    finally:
        ready.release()
    start.wait()
    try:
        job = client.submit(
            request["data"],
            request["method"],
            request["shots"],
            request["epochs"],
            request["settings"],
            request["seed"],
            api_name="/train",
        )
        job.result()  # raises when the app answered with an error
        events = job.outputs()
        last = events[-1] if events else {}
        done = isinstance(last, dict) and last.get("kind") == "done"
        out[index] = {
            "ok": done,
            "finished": time.perf_counter(),
            "ti": last.get("session", {}).get("ti") if done else None,
            "error": None if done else str(last)[:300],
        }
    except Exception as err:
        out[index] = {"ok": False, "finished": time.perf_counter(), "error": repr(err)[:300]}


def classroom(
    clients: int = 30,
    data: str = "seven-segment",
    method: str = "lorsu",
    shots: int = 5,
    epochs: int | None = None,
    settings: dict | None = None,
    model: str | None = None,
    domains: str | None = None,
    control: list[str] | None = None,
    timeout: float = 1800,
    lanes: int | None = None,
) -> dict:
    """Run the classroom once; returns the figures (seconds from the common start)."""
    state = Path(tempfile.mkdtemp(prefix="lorsu-classroom-"))
    port = free_port()
    process = start_app(port, state, model, domains, control, lanes)
    try:
        served = wait_until_served(process, port)
        # A class comes in once the teacher's app is up: its model loaded (it loads after the
        # page is served).
        wait_until_ready(process, state / "app.log")
        url = f"http://127.0.0.1:{port}/"
        request = {
            "data": data,
            "method": method,
            "shots": shots,
            "epochs": epochs,
            "settings": settings,
            "seed": None,
        }
        start, out, ready = threading.Event(), {}, threading.Semaphore(0)
        threads = [
            threading.Thread(
                target=one_client, args=(url, request, ready, start, out, i), daemon=True
            )
            for i in range(clients)
        ]
        for thread in threads:
            thread.start()
        for _ in range(clients):  # every client connected (or failed to) before the bell
            ready.acquire(timeout=120)
        bell = time.perf_counter()
        start.set()
        for thread in threads:
            thread.join(timeout=max(1.0, timeout - (time.perf_counter() - bell)))
        results = [out.get(i, {"ok": False, "error": "no answer in time"}) for i in range(clients)]
        times = sorted(r["finished"] - bell for r in results if r.get("ok"))
        failed = [r.get("error") for r in results if not r.get("ok")]
        load = os.getloadavg()
        return {
            "clients": clients,
            "finished": len(times),
            "failed": len(failed),
            "errors": failed[:3],
            "last_s": round(times[-1], 1) if times else None,
            "median_s": round(statistics.median(times), 1) if times else None,
            "first_s": round(times[0], 1) if times else None,
            "served_after_s": round(served, 1),
            "session": {k: v for k, v in request.items() if k != "seed"},
            "model": model or "toy",
            "lanes": lanes or cpu_lanes(),  # what the app picks on this machine
            "cpus": os.cpu_count(),
            "load_average": [round(x, 2) for x in load],
            "ti": sorted({r.get("ti") for r in results if r.get("ok")}),
        }
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.log.close()
        shutil.rmtree(state, ignore_errors=True)


def doc_block(result: dict, command: str, when: str) -> str:
    met = result["last_s"] is not None and result["last_s"] <= 90 and not result["failed"]
    return "\n".join(
        [
            START,
            "```bash",
            command,
            "```",
            "",
            f"Measured {when} on this machine ({result['cpus']} CPU cores; load average "
            f"{result['load_average'][0]} at the end): {result['clients']} clients, each one "
            f"default session ({result['session']['method']}, {result['session']['shots']} "
            f"shots of {result['session']['data']}) through `/train` at once, "
            f"{result.get('lanes', 1)} lane(s) (LORSU_CPU_LANES). "
            f"**Last client done after {result['last_s']} s**, median {result['median_s']} s, "
            f"first {result['first_s']} s (from the common start); {result['finished']} "
            f"finished, {result['failed']} failed. The app served after "
            f"{result['served_after_s']} s. Target (last client within 90 s): "
            f"{'met' if met else 'not met'}.",
            END,
        ]
    )


def write_doc(path: Path, block: str) -> None:
    """Replace the classroom block of `path` (or append it under its own heading)."""
    text = path.read_text() if path.exists() else ""
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip("\n") + "\n\n### A classroom: many clients at once\n\n" + block + "\n"
    path.write_text(text)


def time_to_serve(runs: int = 3, model: str | None = None) -> dict:
    """`python app.py` started `runs` times, each on a free port with its own state folder:
    seconds from the start to the page's first HTTP 200 (polled every 0.1 s), and to the
    model being loaded (`ready`: the page is served first, then the weights load)."""
    import tempfile

    seconds, ready = [], []
    for _ in range(runs):
        with tempfile.TemporaryDirectory(prefix="lorsu-start-") as folder:
            port = free_port()
            process = start_app(port, Path(folder), model, None)
            try:
                served = wait_until_served(process, port)
                seconds.append(round(served, 2))
                later = wait_until_ready(process, Path(folder) / "app.log")
                ready.append(round(served + later, 2))
            finally:
                process.terminate()
                process.wait()
                process.log.close()
    return {**_spread(seconds), "ready": _spread(ready)}


def _spread(seconds: list[float]) -> dict:
    ordered = sorted(seconds)
    return {"runs": seconds, "median": ordered[len(ordered) // 2], "min": ordered[0]}


def cmd_start(args) -> int:
    result = time_to_serve(args.runs, args.model)
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


def add_start_command(kinds) -> None:
    sub = kinds.add_parser("start", help="seconds from `python app.py` to its first HTTP 200")
    sub.add_argument("--runs", type=int, default=3)
    sub.add_argument("--model", default=None, help="the app's --model (default: its own)")
    sub.add_argument("--json", action="store_true", help="one line of JSON")
    sub.set_defaults(func=cmd_start)


def add_classroom_command(kinds) -> None:
    sub = kinds.add_parser(
        "classroom", help="start the app and have N clients train one session each at once"
    )
    sub.add_argument("--clients", type=int, default=30)
    sub.add_argument(
        "--data", default="seven-segment", help="example domain (default: %(default)s)"
    )
    sub.add_argument("--method", default="lorsu")
    sub.add_argument("--shots", type=int, default=5)
    sub.add_argument("--epochs", type=int, default=None)
    sub.add_argument("--settings", default=None, help='JSON object, e.g. {"batch_size": 4}')
    sub.add_argument("--model", default=None, help="the app's --model (default: its own)")
    sub.add_argument("--domains", default=None, help="the app's --domains")
    sub.add_argument("--control", action="append", help="the app's --control (repeatable)")
    sub.add_argument(
        "--lanes", type=int, default=None, help="the app's LORSU_CPU_LANES (default: its own)"
    )
    sub.add_argument("--doc", default=str(DOC), help="where to write the figures")
    sub.add_argument("--no-doc", action="store_true", help="print only")
    sub.add_argument("--json", action="store_true", help="one line of JSON")
    sub.set_defaults(func=cmd_classroom)


def cmd_classroom(args) -> int:
    result = classroom(
        clients=args.clients,
        data=args.data,
        method=args.method,
        shots=args.shots,
        epochs=args.epochs,
        settings=json.loads(args.settings) if args.settings else None,
        model=args.model,
        domains=args.domains,
        control=args.control,
        lanes=args.lanes,
    )
    print(json.dumps(result, indent=None if args.json else 2))
    if not args.no_doc:
        command = f"python -m lorsu_demo bench classroom --clients {args.clients}"
        for flag in ("data", "method", "shots", "epochs", "settings", "model", "domains", "lanes"):
            value = getattr(args, flag)
            if value is not None and value != DEFAULTS.get(flag):
                command += f" --{flag} {value!r}" if flag == "settings" else f" --{flag} {value}"
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        write_doc(Path(args.doc), doc_block(result, command.strip(), when))
    return 0 if result["failed"] == 0 else 1
