"""Inference latency while a 64-example support-set registration runs: the registration in pieces
(the gateway's default, ``SUPPORT_PIECE`` examples per model-thread job) against the same
registration as one job (the baseline: what the gateway did before), in one run.

In process, tiny preset, clip-zero-shot answering and V2L (tiny files written by the tests'
checkpoint writers, random weights) describing the support. For each mode and round, one thread
registers 64 support examples while another sends /infer's work back to back; it prints the
inference latency (median, p99, max) during registrations and the registration's own time, as
medians over the rounds with their spread, the modes interleaved round by round.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_fair_lanes.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "backends"))  # the tiny V2L files' writer

from checkpoints import write_v2l  # noqa: E402

from comneck.image import sample_photo  # noqa: E402
from comneck.models import build_cloud_models  # noqa: E402
from comneck.pipeline import Pipeline  # noqa: E402
from comneck.presets import PRESETS  # noqa: E402
from comneck_edge import EdgeEncoder  # noqa: E402
from comneck_server.gateway import SUPPORT_PIECE, Gateway  # noqa: E402
from comneck_server.settings import ServerSettings  # noqa: E402

PROMPT = "Labels: cow, horse, dog, beach, city street"
EXAMPLES = 64


def one_round(gateway: Gateway, data: bytes, piece: int) -> tuple[list[float], float]:
    """(inference latencies in ms while one registration of 64 runs, the registration's seconds)."""
    gateway.support_piece = piece
    labels = [("cat", "dog", "bird", "fish")[i % 4] for i in range(EXAMPLES)]
    latencies: list[float] = []
    finished = threading.Event()
    took: list[float] = []

    def register() -> None:
        start = time.perf_counter()
        gateway.register_support("bench", [data] * EXAMPLES, labels, "v2l")
        took.append(time.perf_counter() - start)
        finished.set()

    thread = threading.Thread(target=register)
    thread.start()
    while not finished.is_set():
        start = time.perf_counter()
        gateway.infer(data, PROMPT, backend="clip-zero-shot")
        latencies.append((time.perf_counter() - start) * 1e3)
    thread.join()
    gateway.support_sets.delete("bench")
    return latencies, took[0]


def p99(values: list[float]) -> float:
    return sorted(values)[min(len(values) - 1, int(round(0.99 * (len(values) - 1))))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    preset = PRESETS["tiny"]
    with tempfile.TemporaryDirectory() as tmp:
        models = build_cloud_models(preset)
        files = write_v2l(Path(tmp), models.clip_model.visual.output_dim)
        pipeline = Pipeline(models)
        pipeline.add_backend("clip-zero-shot")
        pipeline.add_backend("v2l", files.codebooks, {"llama": str(files.llama)})
        gateway = Gateway(pipeline, ServerSettings(decode_workers=0))
        data = EdgeEncoder(preset).encode_file(sample_photo()).data
        gateway.infer(data, PROMPT, backend="clip-zero-shot")  # warm up
        modes = {f"pieces of {SUPPORT_PIECE}": SUPPORT_PIECE, "one job (baseline)": EXAMPLES}
        results: dict[str, list[tuple[list[float], float]]] = {mode: [] for mode in modes}
        for _ in range(args.rounds):
            for mode, piece in modes.items():  # interleaved: the machine's noise falls on both
                results[mode].append(one_round(gateway, data, piece))
        gateway.close()
    print(f"inference during a {EXAMPLES}-example registration, {args.rounds} rounds, medians over rounds (min..max)")
    print(f"{'mode':22s} {'requests':>8s} {'median ms':>16s} {'p99 ms':>20s} {'max ms':>20s} {'registration s':>18s}")
    summary = {}
    for mode, rounds in results.items():
        med = [statistics.median(lat) for lat, _ in rounds]
        tail = [p99(lat) for lat, _ in rounds]
        worst = [max(lat) for lat, _ in rounds]
        reg = [took for _, took in rounds]
        summary[mode] = statistics.median(tail)
        span = lambda v: f"{statistics.median(v):7.1f} ({min(v):.0f}..{max(v):.0f})"  # noqa: E731
        print(f"{mode:22s} {sum(len(lat) for lat, _ in rounds):8d} {span(med):>16s} {span(tail):>20s} {span(worst):>20s} "
              f"{statistics.median(reg):8.2f} ({min(reg):.2f}..{max(reg):.2f})")
    base, ours = summary["one job (baseline)"], summary[f"pieces of {SUPPORT_PIECE}"]
    print(f"p99 inference latency: pieces {ours:.0f} ms vs one job {base:.0f} ms ({base / ours:.1f}x lower)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
