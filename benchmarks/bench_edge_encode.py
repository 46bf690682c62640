"""The edge's encode against its analysis forward: CompressAI's ``compress`` (which entropy-decodes
the strings it has just written, for y_hat and z_hat, and hands the coder its padded CDF tables)
against ours (which computes them, and codes from the tables' cut rows), in one run.

For each preset, on the bundled photo at the preset's codec input: the analysis forward alone
(g_a + h_a), then a whole encode (``LearnedCodec.analyze``: g_a, h_a, entropy parameters, rANS) with
CompressAI's compress and with ours, fixed-point and float entropy parameters; and the
entropy-parameter networks alone, in float, replaying the calls one encode makes: forward plus
those networks is the floor of any encode that runs the codec's networks on this CPU. The timings
alternate call by call (A B C A B C ...); medians over ``--runs`` with their spread (min-max), and
each encode as a multiple of the analysis forward. Both encodes write the same bytes (checked
here too). Random weights: the time is real.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_edge_encode.py [--presets tiny,paper] [--runs 15]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from compressai.entropy_models import GaussianConditional
from compressai.latent_codecs import GaussianConditionalLatentCodec, HyperLatentCodec

from comneck.codec import LearnedCodec
from comneck.fixed_point import fixed_point_parameters, parameter_networks
from comneck.image import load_image, pad_to_stride, resize_for_codec, sample_photo, to_tensor
from comneck.models import build_codec
from comneck.presets import get_preset


def compressais(codec: LearnedCodec) -> LearnedCodec:
    """A copy of the codec coding as CompressAI ships it: its own compress (decoding its strings
    again) and its padded CDF tables on every coder call (comneck.cut_tables), in both directions."""
    shipped = copy.deepcopy(codec)
    for module in shipped.model.modules():
        if isinstance(module, (GaussianConditionalLatentCodec, HyperLatentCodec)):
            del module.compress
        if isinstance(module, GaussianConditional):
            del module.compress, module.decompress
    return shipped


def network_calls(codec: LearnedCodec, x: torch.Tensor) -> list[tuple[torch.nn.Module, torch.Tensor]]:
    """Each entropy-parameter network call of one float encode of ``x``, with its input."""
    calls: list[tuple[torch.nn.Module, torch.Tensor]] = []
    hooks = [net.register_forward_hook(lambda net, inputs, _: calls.append((net, inputs[0].clone())))
             for net in parameter_networks(codec.model)]
    try:
        codec.analyze(x, False)
    finally:
        for hook in hooks:
            hook.remove()
    return calls


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,paper")
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    print(f"median (min-max) of {args.runs} interleaved runs, ms; {torch.get_num_threads()} threads; random weights")
    for name in args.presets.split(","):
        preset = get_preset(name)
        codec = build_codec(preset)
        reference = compressais(codec)
        x = pad_to_stride(to_tensor(resize_for_codec(load_image(sample_photo()), "paper", preset.image_size)))[0]

        def forward() -> None:
            with torch.inference_mode():
                codec.model.latent_codec["hyper"].h_a(codec.model.g_a(x))

        def theirs(fixed: bool) -> Callable[[], list]:
            def run() -> list:
                return reference.analyze(x, fixed)[0].strings
            return run

        def ours(fixed: bool) -> Callable[[], list]:
            return lambda: codec.analyze(x, fixed)[0].strings

        calls = network_calls(codec, x)

        def networks() -> None:
            with fixed_point_parameters(False), torch.inference_mode():
                for net, inputs in calls:
                    net(inputs)

        networks_case = f"entropy-parameter networks alone, float ({len(calls)} calls)"
        cases = {"analysis forward (g_a + h_a)": forward, networks_case: networks}
        for fixed in (True, False):
            label = "fixed point" if fixed else "float"
            assert theirs(fixed)() == ours(fixed)(), "the two encodes wrote different bytes"
            cases[f"encode, CompressAI compress, {label}"] = theirs(fixed)
            cases[f"encode, ours, {label}"] = ours(fixed)
        times: dict[str, list[float]] = {case: [] for case in cases}
        for _ in range(args.runs + 1):  # the first round warms up
            for case, fn in cases.items():
                start = time.perf_counter()
                fn()
                times[case].append((time.perf_counter() - start) * 1e3)
        medians = {case: statistics.median(found[1:]) for case, found in times.items()}
        base = medians["analysis forward (g_a + h_a)"]
        print(f"\npreset {name} ({preset.image_size} px)")
        for case, found in times.items():
            found = found[1:]
            print(f"  {case:<50} {medians[case]:9.2f} ({min(found):.2f}-{max(found):.2f})  {medians[case] / base:5.2f}x the forward")
        floor = base + medians[networks_case]
        print(f"  floor of an encode (forward + float networks)    {floor:9.2f}              {floor / base:5.2f}x the forward")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
