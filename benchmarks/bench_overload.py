"""Overload: more clients than the gateway admits, each retrying as the edge client does.

Starts ``comneck-server`` (tiny preset, loopback) with ``--max-queue`` slots, then runs
``--rounds`` rounds of ``--clients`` threads, each sending ``--requests`` /infer requests back
to back through its own :class:`GatewayClient` (its retry policy: ``--retries`` on 429/503,
waiting at least Retry-After, with jitter). Prints the success rate, the fewest and most
successes of one client, the failures by code and the server's resident memory after each
round, and at the end the growth over the first and the second half of the rounds (a soak:
many rounds of a load the gateway can carry, e.g. ``--clients 16 --rounds 12``). Stops by itself: no new request starts after ``--deadline`` seconds. Linux (reads /proc).

    .venv/bin/python benchmarks/bench_overload.py [--clients 32] [--requests 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from collections import Counter
from pathlib import Path

from comneck.image import sample_photo
from comneck_edge import EdgeEncoder, GatewayClient, GatewayError
from comneck_edge.client import DEFAULT_RETRIES
from comneck_server.demo import local_gateway

PROMPT = "Labels: cow, horse, dog, beach, city street"


def server_rss_mib() -> float:
    """Resident memory of this process's one child (the gateway started by ``local_gateway``)."""
    (child,) = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split()
    status = Path(f"/proc/{child}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) / 1024


def run_round(url: str, data: bytes, clients: int, requests: int, retries: int, stop_at: float) -> tuple[list[int], Counter]:
    """``clients`` threads x ``requests`` each: successes per client, failures by code."""
    successes, failures, lock = [0] * clients, Counter(), threading.Lock()

    def client(i: int) -> None:
        with GatewayClient(url, retries=retries) as gateway:
            for _ in range(requests):
                if time.monotonic() > stop_at:
                    return
                try:
                    gateway.infer(data, PROMPT)
                    successes[i] += 1
                except GatewayError as exc:
                    with lock:
                        failures[str(exc.code)] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return successes, failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=10, help="per client and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-queue", type=int, default=16, help="the gateway's --max-queue")
    parser.add_argument("--retries", type=int, default=DEFAULT_RETRIES, help=f"the edge client's retries (its default: {DEFAULT_RETRIES})")
    parser.add_argument("--deadline", type=float, default=300.0, help="seconds after which no request starts")
    args = parser.parse_args()
    data = EdgeEncoder("tiny").encode_file(sample_photo()).data
    stop_at = time.monotonic() + args.deadline
    print(f"tiny preset, loopback; gateway --max-queue {args.max_queue}; {args.clients} clients x {args.requests} "
          f"requests x {args.rounds} rounds, client retries {args.retries}")
    with local_gateway("tiny", "--max-queue", str(args.max_queue)) as gateway:
        gateway.infer(data, PROMPT)  # warm-up
        rss = [server_rss_mib()]
        print(f"server RSS after start and one request: {rss[0]:.1f} MiB", flush=True)
        for round_ in range(1, args.rounds + 1):
            start = time.perf_counter()
            successes, failures = run_round(gateway.url, data, args.clients, args.requests, args.retries, stop_at)
            elapsed = time.perf_counter() - start
            sent = sum(successes) + sum(failures.values())
            rss.append(server_rss_mib())
            print(
                f"round {round_}: {sum(successes)}/{sent} succeeded ({100 * sum(successes) / max(sent, 1):.1f}%) in {elapsed:.1f} s "
                f"({sum(successes) / elapsed:.1f}/s); per client min {min(successes)} max {max(successes)}; "
                f"failures {dict(failures) or 'none'}; server RSS {rss[-1]:.1f} MiB",
                flush=True,
            )
    half = len(rss) // 2
    print(f"server RSS growth: first {half} rounds {rss[half] - rss[0]:+.1f} MiB, last {len(rss) - 1 - half} rounds {rss[-1] - rss[half]:+.1f} MiB")


if __name__ == "__main__":
    main()
