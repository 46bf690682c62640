"""The ONNX edge against the torch edge: start-up, peak memory and encode time, paper and tiny.

Each measurement runs in a fresh Python process, the two runtimes taking turns (A, B, A, B, ...)
so both see the same machine state; medians with their spread (min..max) are printed, then the
ratios ONNX / torch. Per runtime and preset:

* **command**: wall time of ``comneck-edge encode PHOTO -o OUT`` as a user runs it (process start,
  imports, codec or ONNX sessions, one encode, the file written): the issue's "start-up + encode";
* **import**: ``import comneck_edge.encoder`` (torch) or ``comneck_edge.onnx_edge`` (ONNX), alone;
* **peak RSS**: the command's process, from ``getrusage`` (MiB);
* **encode**: one photo's encode in a warm process (median of ``--encodes``), the runtime's own speed.

The ONNX folder is written first with ``comneck export-edge`` (the preset's seeded weights; the
timings do not depend on the weights' values).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_edge_runtime.py [--presets tiny paper] [--runs 5] [--encodes 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from comneck.photo import sample_photo

_PROBE = r"""
import json, resource, sys, time
t0 = time.perf_counter()
runtime, preset, folder, photo, encodes = sys.argv[1:6]
if runtime == "torch":
    from comneck_edge.encoder import EdgeEncoder
    imported = time.perf_counter()
    encoder = EdgeEncoder(preset)
else:
    from comneck_edge.onnx_edge import OnnxEdgeEncoder
    imported = time.perf_counter()
    encoder = OnnxEdgeEncoder(folder)
times = []
for _ in range(int(encodes)):
    start = time.perf_counter()
    data = encoder.encode_file(photo).data
    times.append(time.perf_counter() - start)
print(json.dumps({"import_s": imported - t0, "encode_s": sorted(times)[len(times) // 2], "bytes": len(data),
                  "torch_loaded": "torch" in sys.modules}))
"""


def command(runtime: str, preset: str, folder: Path, photo: Path, out: Path) -> tuple[float, float]:
    """``comneck-edge encode`` in a fresh process -> (wall seconds, peak RSS MiB)."""
    flags = ["--onnx", str(folder)] if runtime == "onnx" else ["--runtime", "torch", "--preset", preset]
    wrapper = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
               "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
               "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)")
    cmd = [sys.executable, "-m", "comneck_edge", "encode", str(photo), "-o", str(out), "--force", *flags]
    done = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, check=True)
    wall, rss = done.stdout.split()
    return float(wall), float(rss)


def probe(runtime: str, preset: str, folder: Path, photo: Path, encodes: int) -> dict[str, float]:
    done = subprocess.run([sys.executable, "-c", _PROBE, runtime, preset, str(folder), str(photo), str(encodes)],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def spread(values: list[float], unit: str, scale: float = 1.0) -> str:
    v = [x * scale for x in values]
    return f"{statistics.median(v):8.1f} {unit} ({min(v):.1f}..{max(v):.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "paper"])
    parser.add_argument("--runs", type=int, default=5, help="fresh processes per runtime and measurement (interleaved)")
    parser.add_argument("--encodes", type=int, default=5, help="encodes per warm process (median)")
    parser.add_argument("--photo", type=Path, default=sample_photo("chicken_on_money.png"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            folder = Path(tmp) / preset
            subprocess.run([sys.executable, "-m", "comneck", "export-edge", "--preset", preset, "-o", str(folder)], check=True,
                           capture_output=True)
            results: dict[str, dict[str, list[float]]] = {r: {"command": [], "rss": [], "import": [], "encode": []} for r in ("torch", "onnx")}
            for _ in range(args.runs):
                for runtime in ("torch", "onnx"):
                    wall, rss = command(runtime, preset, folder, args.photo, Path(tmp) / f"{runtime}.cnk")
                    p = probe(runtime, preset, folder, args.photo, args.encodes)
                    assert runtime == "torch" or not p["torch_loaded"], "the ONNX edge imported torch"
                    for key, value in (("command", wall), ("rss", rss), ("import", p["import_s"]), ("encode", p["encode_s"])):
                        results[runtime][key].append(value)
            same = (Path(tmp) / "torch.cnk").read_bytes() == (Path(tmp) / "onnx.cnk").read_bytes()
            print(f"preset {preset}, photo {args.photo.name}, {args.runs} runs each; containers equal: {same}")
            for runtime in ("torch", "onnx"):
                r = results[runtime]
                print(f"  {runtime:5}  command {spread(r['command'], 's')}  import {spread(r['import'], 's')}  "
                      f"peak RSS {spread(r['rss'], 'MiB')}  encode {spread(r['encode'], 'ms', 1e3)}")
            ratio = {k: statistics.median(results["onnx"][k]) / statistics.median(results["torch"][k]) for k in results["onnx"]}
            print("  onnx / torch:  " + ", ".join(f"{k} {v:.2f}x" for k, v in ratio.items()))


if __name__ == "__main__":
    main()
