"""Soak: a gateway under a fixed request rate for a fixed time, its resident memory sampled
at fixed intervals; fails if the memory still grows in the last third.

Starts ``comneck-server`` (tiny preset by default, loopback, its decode worker process included
in the memory), then sends ``--rate`` /infer requests per second (each a real container and a
labelled prompt, through ``GatewayClient``) for ``--minutes``, from a small pool of client
threads, and samples the resident memory of the gateway and its children every ``--sample-s``
seconds. The verdict: a least-squares line through the last third of the samples may rise by at
most ``--tolerance-mib`` over that third (the first two thirds are warm-up: caches, arenas,
lazily built tables). Exit 1 when it rises more, or when any request failed. The curve is
printed as it comes. Bounded: no request starts after the deadline. Linux (reads /proc).

    .venv/bin/python benchmarks/bench_soak.py [--minutes 30] [--rate 4] [--sample-s 60]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from comneck.image import sample_photo
from comneck_edge import EdgeEncoder, GatewayClient, GatewayError
from comneck_server.demo import local_gateway

PROMPT = "Labels: cow, horse, dog, beach, city street"


def tree_rss_mib(pid: int) -> float:
    """Resident memory of process ``pid`` and all its descendants (the gateway and its decode workers)."""
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except FileNotFoundError:  # exited between the listing and the read
            continue
        total += int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) / 1024
        todo += [int(c) for c in children]
    return total


def gateway_pid() -> int:
    """The one child of this process: the gateway ``local_gateway`` started."""
    me = Path("/proc/self").resolve().name
    (child,) = Path(f"/proc/{me}/task/{me}/children").read_text().split()
    return int(child)


def slope_rise(samples: list[tuple[float, float]]) -> float:
    """How much a least-squares line through ``samples`` ((seconds, MiB)) rises over their span, in MiB."""
    times, values = [t for t, _ in samples], [v for _, v in samples]
    fit = statistics.linear_regression(times, values)
    return fit.slope * (times[-1] - times[0])


def soak(url: str, data: bytes, minutes: float, rate: float, sample_s: float, pid: int) -> tuple[list[tuple[float, float]], Counter]:
    """Send ``rate`` requests/s for ``minutes``; (memory samples, outcomes by status or error code)."""
    outcomes: Counter = Counter()
    lock = threading.Lock()
    local = threading.local()

    def ask() -> None:
        if not hasattr(local, "client"):
            local.client = GatewayClient(url, timeout=60)
        try:
            local.client.infer(data, PROMPT)
            outcome = "200"
        except GatewayError as exc:
            outcome = str(exc.code)
        with lock:
            outcomes[outcome] += 1

    start = time.monotonic()
    deadline = start + minutes * 60
    samples = [(0.0, tree_rss_mib(pid))]
    print(f"t {0:6.0f} s  rss {samples[0][1]:8.1f} MiB", flush=True)
    next_sample = start + sample_s
    with ThreadPoolExecutor(max_workers=4) as pool:
        sent = 0
        while (now := time.monotonic()) < deadline:
            due = start + sent / rate
            if due > now:
                time.sleep(min(due - now, max(0.0, next_sample - now)) or 0.001)
            else:
                pool.submit(ask)
                sent += 1
            if time.monotonic() >= next_sample:
                samples.append((time.monotonic() - start, tree_rss_mib(pid)))
                with lock:
                    done = sum(outcomes.values())
                print(f"t {samples[-1][0]:6.0f} s  rss {samples[-1][1]:8.1f} MiB  requests answered {done}", flush=True)
                next_sample += sample_s
    samples.append((time.monotonic() - start, tree_rss_mib(pid)))
    return samples, outcomes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=4.0, help="requests per second")
    parser.add_argument("--sample-s", type=float, default=60.0, help="seconds between memory samples")
    parser.add_argument("--tolerance-mib", type=float, default=8.0, help="largest rise of the last third's trend line")
    parser.add_argument("--preset", default="tiny")
    args = parser.parse_args()
    data = EdgeEncoder(args.preset).encode_file(sample_photo()).data
    with local_gateway(args.preset, "--max-queue", "64") as client:
        client.infer(data, PROMPT)
        samples, outcomes = soak(client.url, data, args.minutes, args.rate, args.sample_s, gateway_pid())
    third = [s for s in samples if s[0] >= samples[-1][0] * 2 / 3]
    rise = slope_rise(third) if len(third) >= 2 else 0.0
    failed = sum(n for outcome, n in outcomes.items() if outcome != "200")
    print(f"\n{sum(outcomes.values())} requests at {args.rate:g}/s over {args.minutes:g} min: {dict(outcomes)}")
    print(f"rss: start {samples[0][1]:.1f} MiB, end {samples[-1][1]:.1f} MiB; last third ({len(third)} samples) "
          f"trend {rise:+.1f} MiB (tolerance {args.tolerance_mib:g})")
    flat = rise <= args.tolerance_mib
    print("verdict: " + ("flat" if flat and not failed else "FAIL: " + ("still growing" if not flat else f"{failed} requests failed")))
    return 0 if flat and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
