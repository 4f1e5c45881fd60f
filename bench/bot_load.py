"""Load on the bot's webhook receiver: ``adapter-repair bot serve`` (uvicorn, SQLite queue) on
loopback takes RATE webhooks a second for SECONDS seconds, each a new commit of a model repo;
the send is paced by a clock (a slow answer does not slow the sending) and bounded (RATE x
SECONDS requests, then it stops). Reports p50 / p99 / max latency (send to full answer) and
checks that the jobs queued equal the webhooks accepted. Writes bench/results/bot_load.md
(and .json).

    python bench/bot_load.py [--rate 100] [--seconds 20] [--queue sqlite:///tmp/x.db]
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rate", type=float, default=100.0, help="webhooks a second")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--queue", default=None, help="default: sqlite in a temporary folder")
    ap.add_argument("--threads", type=int, default=32, help="senders in flight at most")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="bot-load-")
    queue = args.queue or f"sqlite:///{tmp}/bot.db"
    port = free_port()
    env = {**os.environ, "ADAPTER_REPAIR_WEBHOOK_SECRET": SECRET}
    server = subprocess.Popen(
        [sys.executable, "-m", "adapter_repair.cli.main", "-q", "bot", "serve",
         "--port", str(port), "--queue", queue],
        env=env,
    )  # fmt: skip
    try:
        wait_up(port)
        n = int(args.rate * args.seconds)
        latencies: list[float] = []
        statuses: dict[int, int] = {}
        lock = threading.Lock()
        url = f"http://127.0.0.1:{port}/webhook"

        def send(i: int) -> None:
            req = urllib.request.Request(
                url,
                data=body(i),
                headers={"Content-Type": "application/json", "X-Webhook-Secret": SECRET},
            )
            t0 = time.perf_counter()
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    r.read()
                    status = r.status
            except urllib.error.HTTPError as e:
                status = e.code
            except OSError:
                status = 0
            dt = time.perf_counter() - t0
            with lock:
                latencies.append(dt)
                statuses[status] = statuses.get(status, 0) + 1

        start = time.perf_counter()
        late = 0
        with ThreadPoolExecutor(args.threads) as pool:
            for i in range(n):
                due = start + i / args.rate
                wait = due - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                else:
                    late += 1
                pool.submit(send, i)
        sent_seconds = time.perf_counter() - start
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health") as r:
            health = json.loads(r.read())
    finally:
        server.terminate()
        server.wait(10)
    accepted = statuses.get(202, 0)
    queued = health["jobs"]["queued"]
    lat = sorted(latencies)
    p50 = statistics.median(lat) * 1000
    p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1000
    rows = {
        "webhooks sent": n,
        "sending took s": round(sent_seconds, 2),
        "achieved rate /s": round(n / sent_seconds, 1),
        "sends behind the clock": late,
        "answers by status": {str(k): v for k, v in sorted(statuses.items())},
        "accepted (202)": accepted,
        "jobs queued (records)": queued,
        "queue depth (messages)": health["queue_depth"],
        "latency p50 ms": round(p50, 2),
        "latency p99 ms": round(p99, 2),
        "latency max ms": round(lat[-1] * 1000, 2),
    }
    ok_p99 = p99 < 50
    ok_count = accepted == queued == health["queue_depth"] == n
    md = [
        "# Bot receiver under load",
        "",
        f"`adapter-repair bot serve` (uvicorn, one process, queue `{queue.split(':')[0]}`) on"
        f" loopback; {args.rate:g} webhooks a second for {args.seconds:g} s, paced by the clock"
        f" from up to {args.threads} sender threads in this same machine, each webhook a new"
        " commit (so each is queued); latency from send to the full answer.",
        "",
        "| measure | value |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in rows.items()),
        "",
        "| target | measured | ok |",
        "|---|---|---|",
        f"| p99 latency < 50 ms | {p99:.1f} ms | {'yes' if ok_p99 else 'NO'} |",
        f"| jobs queued = webhooks accepted (= sent) | {queued} / {accepted} / {n} |"
        f" {'yes' if ok_count else 'NO'} |",
        "",
        f"Machine: {results_io.machine()}. Command: `python bench/bot_load.py --rate"
        f" {args.rate:g} --seconds {args.seconds:g}`.",
        "",
    ]
    results_io.write_results("bot_load", md, {**rows, "p99_ok": ok_p99, "count_ok": ok_count})
    print("\n".join(md))
    if not (ok_p99 and ok_count):
        sys.exit(1)


if __name__ == "__main__":
    main()
