"""Gateway throughput with 1, 8 and 32 concurrent clients, over real HTTP on loopback, in one run:
``serial`` (decoding on the model thread, one request at a time: the gateway before batching),
``unbatched`` (decoding on the decode workers beside the model work, ``--max-batch 1``) and
``batched`` (``--max-batch 32``).

For each workload (the tiny preset with clip-zero-shot; the paper preset with clip-zero-shot;
the tiny preset with LLaVA at tiny size, greedy, 8 new tokens) it starts ``comneck-server`` once
per mode, sends the same valid containers back to back from N client threads for ``--seconds``
seconds after a warm-up, and prints requests per second, p50 and p99 latency, and the peak
resident memory of the gateway and its decode workers. Modes alternate round by round (A B C A B
C); the numbers are medians over ``--rounds`` with their spread (min-max), then the ratios of the
throughputs to the batched one's.
Random weights everywhere: the time is real, the answers are not. Linux (reads /proc).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_throughput.py [--workloads tiny,paper,llava]
        [--clients 1,8,32] [--modes serial,unbatched,batched] [--seconds 20] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "backends"))  # the tiny LLaVA folder's writer

from checkpoints import write_llava  # noqa: E402

from comneck.image import sample_photo  # noqa: E402
from comneck.presets import get_preset  # noqa: E402
from comneck_edge import EdgeEncoder, GatewayClient  # noqa: E402
from comneck_server.demo import local_gateway  # noqa: E402

MODES = {"serial": ["--max-batch", "1", "--decode-workers", "0"], "unbatched": ["--max-batch", "1"],
         "batched": ["--max-batch", "32", "--max-wait-ms", "20"]}


@dataclass(frozen=True)
class Workload:
    preset: str
    backend: str  # the --backend flag
    prompt: str
    options: dict


@dataclass
class Result:
    rps: float
    p50_ms: float
    p99_ms: float
    rss_mib: float


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


class PeakRss:
    """Samples the summed resident memory of a process and its children every 0.2 s; keeps the peak."""

    def __init__(self, pid: int) -> None:
        self.process, self.peak, self._stop = psutil.Process(pid), 0.0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            try:
                total = sum(p.memory_info().rss for p in [self.process, *self.process.children(recursive=True)])
            except psutil.Error:
                continue
            self.peak = max(self.peak, total / 2**20)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak


def drive(url: str, data: bytes, workload: Workload, clients: int, seconds: float) -> tuple[float, list[float]]:
    """``clients`` threads sending back to back for ``seconds``: (requests per second, latencies in ms)."""
    latencies: list[float] = []
    lock, start = threading.Lock(), time.perf_counter()
    stop_at = start + seconds

    def client() -> None:
        with GatewayClient(url, timeout=600) as gateway:
            while time.perf_counter() < stop_at:
                sent = time.perf_counter()
                gateway.infer(data, workload.prompt, options=workload.options)
                with lock:
                    latencies.append((time.perf_counter() - sent) * 1e3)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return len(latencies) / (time.perf_counter() - start), latencies


def measure(workload: Workload, mode: str, clients: int, seconds: float, data: bytes) -> Result:
    flags = ["--backend", workload.backend, "--max-queue", "64", *MODES[mode]]
    with local_gateway(workload.preset, *flags, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}) as client:
        server = int(next(iter(Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split())))
        drive(client.url, data, workload, clients, min(5.0, seconds / 4))  # warm-up: every thread once at least
        rss = PeakRss(server)
        rps, latencies = drive(client.url, data, workload, clients, seconds)
        return Result(rps, percentile(latencies, 0.5), percentile(latencies, 0.99), rss.stop())


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):8.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="tiny,paper,llava")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--modes", default=",".join(MODES), help=f"of {', '.join(MODES)}")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    workloads = {
        "tiny": Workload("tiny", "clip-zero-shot", "Labels: cow, horse, dog, beach, city street", {}),
        "paper": Workload("paper", "clip-zero-shot", "Labels: cow, horse, dog, beach, city street", {}),
        "llava": Workload("tiny", f"llava={write_llava(tmp / 'llava')}", "Describe the photo.", {"max_new_tokens": 8}),
    }
    print(f"{os.cpu_count()} cores, {args.seconds:.0f} s per measurement, median (min-max) of {args.rounds} rounds; "
          "random weights (the time is real, the answers are not)")
    print(f"{'workload':<8} {'clients':>7} {'mode':<10} {'req/s':>22} {'p50 ms':>24} {'p99 ms':>24} {'peak RSS MiB':>26}")
    for name in args.workloads.split(","):
        workload = workloads[name]
        data = EdgeEncoder(get_preset(workload.preset)).encode_file(sample_photo()).data
        for clients in map(int, args.clients.split(",")):
            results: dict[str, list[Result]] = {mode: [] for mode in args.modes.split(",")}
            for _ in range(args.rounds):
                for mode in results:  # interleaved: A B C A B C
                    results[mode].append(measure(workload, mode, clients, args.seconds, data))
            for mode, found in results.items():
                print(f"{name:<8} {clients:>7} {mode:<10} {spread([r.rps for r in found]):>22} {spread([r.p50_ms for r in found]):>24} "
                      f"{spread([r.p99_ms for r in found]):>24} {spread([r.rss_mib for r in found]):>26}")
            rps = {mode: statistics.median(r.rps for r in found) for mode, found in results.items()}
            if "batched" in rps:
                ratios = ", ".join(f"batched / {mode} {rps['batched'] / value:.2f}x" for mode, value in rps.items() if mode != "batched")
                print(f"{name:<8} {clients:>7} throughput: {ratios}")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
