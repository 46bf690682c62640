"""Container overhead: the ComNeck bitstream against CompressAI's example codec container.

Both wrap the same rANS strings of the bundled photos. CompressAI's ``examples/codec.py``
spends 2 header bytes, 2 x uint32 original size, 3 x uint32 shape and stream count, and a
uint32 length per stream, with no checksum and no codec identity. Its 2-int shape field
cannot even describe ELIC's per-group shapes, so this counts its layout's bytes only.

    .venv/bin/python benchmarks/bench_bitstream.py [--preset tiny]
"""

from __future__ import annotations

import argparse

from comneck.image import sample_photo
from comneck.models import RANDOM_WEIGHTS_NOTE
from comneck.presets import PRESETS
from comneck_edge import EdgeEncoder


def compressai_example_overhead(num_streams: int) -> int:
    """Bytes CompressAI's example container adds around ``num_streams`` strings."""
    return 2 + 2 * 4 + 3 * 4 + 4 * num_streams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    print(f"preset {preset.name}; {RANDOM_WEIGHTS_NOTE}")
    print(f"{'photo':<22} {'streams':>8} {'payload B':>10} {'ComNeck +B':>11} {'CompressAI +B':>14} {'saved B':>8}")
    encoder = EdgeEncoder(preset)
    for name in ("cow_beach.png", "chicken_on_money.png"):
        stream = encoder.encode_file(sample_photo(name)).bitstream
        ours = stream.overhead_bytes
        theirs = compressai_example_overhead(len(stream.latents.strings))
        print(
            f"{name:<22} {len(stream.latents.strings):>8} {stream.latents.num_bytes:>10} "
            f"{ours:>11} {theirs:>14} {theirs - ours:>8}"
        )


if __name__ == "__main__":
    main()
