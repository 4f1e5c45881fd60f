"""Load on the bot's webhook receiver: ``adapter-repair bot serve`` (uvicorn, SQLite queue) on
loopback takes RATE webhooks a second for SECONDS seconds, each a new commit of a model repo,
at each rate of ``--rates``; beside it, in the same run, a plain FastAPI endpoint that does
nothing under the same load: the ceiling of this machine with the load generator on it. The
send is paced by a clock (a slow answer does not slow the sending) and bounded (RATE x SECONDS
requests), from persistent connections. Reports the achieved rate (answers over the time to
the last answer), p50 / p99 / max latency (send to full answer), and checks that the jobs
recorded equal the webhooks accepted. Writes bench/results/bot_load.md (and .json).

    python bench/bot_load.py [--rates 100,500] [--seconds 10] [--queue-dir DIR]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import results_io

SECRET = "bench-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def body(i: int) -> bytes:
    sha = f"{i + 1:040x}"  # never all zeros (a deleted branch)
    repo = f"bench/lora-{i % 50}"
    return json.dumps(
        {
            "event": {"action": "update", "scope": "repo.content"},
            "repo": {
                "id": "0" * 24,
                "owner": {"id": "1" * 24},
                "headSha": sha,
                "name": repo,
                "private": False,
                "type": "model",
                "url": {"web": f"https://huggingface.co/{repo}"},
            },
            "webhook": {"id": "2" * 24, "version": 3},
            "updatedRefs": [{"ref": "refs/heads/main", "oldSha": "3" * 40, "newSha": sha}],
        }
    ).encode()


def wait_up(port: int, timeout: float = 60) -> None:
    end = time.time() + timeout
    while time.time() < end:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("the receiver did not come up")


PLAIN_APP = """
from fastapi import FastAPI, Request
app = FastAPI()

@app.post("/webhook")
async def webhook(request: Request) -> dict:
    await request.body()
    return {"status": "ok"}

@app.get("/health")
def health() -> dict:
    return {"status": "ok"}
"""


def start_server(kind: str, port: int, queue: str, tmp: str) -> subprocess.Popen[bytes]:
    """The bot's receiver (``bot serve``) or the plain do-nothing app, under uvicorn."""
    env = {**os.environ, "ADAPTER_REPAIR_WEBHOOK_SECRET": SECRET}
    if kind == "bot":
        cmd = [sys.executable, "-m", "adapter_repair.cli.main", "-q", "bot", "serve",
               "--port", str(port), "--queue", queue]  # fmt: skip
    else:
        app = os.path.join(tmp, "plain_app.py")
        with open(app, "w") as f:
            f.write(PLAIN_APP)
        cmd = [sys.executable, "-m", "uvicorn", "plain_app:app", "--app-dir", tmp,
               "--port", str(port), "--log-level", "warning"]  # fmt: skip
    return subprocess.Popen(cmd, env=env)


def load(port: int, rate: float, seconds: float, threads: int, offset: int) -> dict[str, object]:
    """Send ``rate`` x ``seconds`` webhooks paced by the clock; return what came back."""
    n = int(rate * seconds)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    done_at: list[float] = []
    lock = threading.Lock()
    local = threading.local()
    headers = {"Content-Type": "application/json", "X-Webhook-Secret": SECRET}

    def send(i: int) -> None:
        t0 = time.perf_counter()
        status = 0
        for _ in range(2):  # a kept-alive connection the server closed: once more, fresh
            conn = getattr(local, "conn", None)
            if conn is None:
                conn = local.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            try:
                conn.request("POST", "/webhook", body=body(offset + i), headers=headers)
                resp = conn.getresponse()
                resp.read()
                status = resp.status
                break
            except OSError:
                conn.close()
                local.conn = None
        t1 = time.perf_counter()
        with lock:
            latencies.append(t1 - t0)
            statuses[status] = statuses.get(status, 0) + 1
            done_at.append(t1)

    start = time.perf_counter()
    late = 0
    with ThreadPoolExecutor(threads) as pool:
        for i in range(n):
            due = start + i / rate
            wait = due - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            elif wait < -0.001:
                late += 1
            pool.submit(send, i)
    lat = sorted(latencies)
    answered = sum(v for k, v in statuses.items() if k)
    return {
        "offered /s": rate,
        "sent": n,
        "achieved /s": round(answered / (max(done_at) - start), 1),
        "sends behind the clock": late,
        "answers by status": {str(k): v for k, v in sorted(statuses.items())},
        "p50 ms": round(statistics.median(lat) * 1000, 2),
        "p99 ms": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1000, 2),
        "max ms": round(lat[-1] * 1000, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rates", default="100,500", help="webhooks a second, one run each")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--queue-dir", default=None, help="default: a temporary folder")
    ap.add_argument("--threads", type=int, default=64, help="senders in flight at most")
    args = ap.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    tmp = tempfile.mkdtemp(prefix="bot-load-")
    rows: list[dict[str, object]] = []
    for kind in ("plain", "bot"):
        for k, rate in enumerate(rates):
            queue = f"sqlite:///{args.queue_dir or tmp}/bot-{k}.db"
            port = free_port()
            server = start_server(kind, port, queue, tmp)
            try:
                wait_up(port)
                row: dict[str, object] = {"server": kind, **load(port, rate, args.seconds,
                                          args.threads, offset=k * 10**6)}  # fmt: skip
                if kind == "bot":
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health") as r:
                        health = json.loads(r.read())
                    statuses = row["answers by status"]
                    assert isinstance(statuses, dict)
                    row["accepted (202)"] = statuses.get("202", 0)
                    row["jobs recorded"] = health["jobs"]["queued"]
                    row["queue depth (jobs)"] = health["queue_depth"]
            finally:
                server.terminate()
                server.wait(10)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    bot = {float(str(r["offered /s"])): r for r in rows if r["server"] == "bot"}
    plain = {float(str(r["offered /s"])): r for r in rows if r["server"] == "plain"}
    targets = []
    top = max(rates)
    ach = float(str(bot[top]["achieved /s"]))
    targets.append((f"bot: achieved >= 95% of the offered {top:g}/s", f"{ach:g}/s (plain endpoint"
                    f" {plain[top]['achieved /s']}/s)", ach >= 0.95 * top))  # fmt: skip
    low = min(rates)
    p99 = float(str(bot[low]["p99 ms"]))
    targets.append((f"bot: p99 latency < 50 ms at {low:g}/s", f"{p99:g} ms", p99 < 50))
    counts_ok = all(r["accepted (202)"] == r["jobs recorded"] for r in bot.values())
    targets.append((
        "bot: jobs recorded = webhooks accepted, every rate",
        ", ".join(f"{r['jobs recorded']} / {r['accepted (202)']}" for r in bot.values()),
        counts_ok,
    ))  # fmt: skip
    cols = ["server", "offered /s", "sent", "achieved /s", "sends behind the clock",
            "answers by status", "p50 ms", "p99 ms", "max ms", "accepted (202)", "jobs recorded",
            "queue depth (jobs)"]  # fmt: skip
    md = [
        "# Bot receiver under load",
        "",
        "`adapter-repair bot serve` (uvicorn, one process, SQLite queue) on loopback, and in"
        " the same run a plain FastAPI endpoint that does nothing (uvicorn, one process): the"
        f" ceiling of this machine with the load generator on it. Each rate for"
        f" {args.seconds:g} s, paced by the clock from up to {args.threads} sender threads on"
        " persistent connections in this same machine; each webhook a new commit (so each is"
        " recorded and queued); latency from send to the full answer; achieved: answers over"
        " the time to the last answer.",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
        *("| " + " | ".join(str(r.get(c, "-")) for c in cols) + " |" for r in rows),
        "",
        "| target | measured | ok |",
        "|---|---|---|",
        *(f"| {t} | {v} | {'yes' if ok else 'NO'} |" for t, v, ok in targets),
        "",
        f"Machine: {results_io.machine()}. Command: `python bench/bot_load.py --rates"
        f" {args.rates} --seconds {args.seconds:g}`.",
        "",
    ]
    results_io.write_results("bot_load", md, {"rows": rows, "targets": [list(t) for t in targets]})
    print("\n".join(md))
    if not all(ok for _, _, ok in targets):
        sys.exit(1)


if __name__ == "__main__":
    main()
