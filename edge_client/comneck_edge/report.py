"""Human-readable report of one answered request: answer, bytes and bpp, where the time went."""

from __future__ import annotations

from typing import Any

from .encoded import EncodedImage


def _ms(timings: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.1f}" for name, value in timings.items())


def format_answer(encoded: EncodedImage, response: dict[str, Any], round_trip_ms: float) -> str:
    """The answer with bpp from the real byte count and edge / network / server timings."""
    server = response["timings_ms"]
    h, w = encoded.bitstream.image_size
    lines = [
        f"answer       {response['text']}",
        f"backend      {response['backend']} (task {response['task']})",
    ]
    details = response.get("details", {})
    if details.get("labels"):
        lines.append("ranking      " + ", ".join(f"{item['label']} {item['probability']:.3f}" for item in details["labels"]))
    if "choice" in details:
        picked = f"{details['choice']} ({details['choice_text']})" if details["choice"] else f"none ({details.get('choice_note', '')})"
        lines.append(f"choice       {picked}")
    if "box" in details:
        if details.get("box_pixels"):
            lines.append(f"box          {details['box_pixels']} (pixels of the photo)")
        elif details["box"] is not None:
            lines.append(f"box          {details['box']} (normalised to the codec input)")
        else:
            lines.append(f"box          none ({details.get('box_note', '')})")
    if details.get("resize_note"):
        lines.append(f"note         {details['resize_note']}")
    lines += [
        f"bitstream    {len(encoded.data)} bytes, {encoded.bpp:.4f} bpp ({w}x{h}, rate {encoded.bitstream.rate}, {encoded.entropy_params} entropy parameters)",
        f"edge (ms)    {_ms(encoded.timings_ms)}",
        f"network (ms) {max(round_trip_ms - server['server_total'], 0.0):.1f} (round trip {round_trip_ms:.1f} less server time)",
        f"server (ms)  {_ms({k: v for k, v in server.items() if k != 'batch_size'})}"
        + (f" (a batch of {server['batch_size']:.0f})" if "batch_size" in server else ""),
        f"total (ms)   {sum(encoded.timings_ms.values()) + round_trip_ms:.1f}",
    ]
    if response.get("random_weights"):
        lines.append(response["note"])
    return "\n".join(lines)
