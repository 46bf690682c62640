"""Peak memory of loading a 7B LLM backend next to the neck and CLIP: host while loading, GPU after.

Writes a Shikra-7B checkpoint in the published layout (config.json, two fp16
``pytorch_model-0000k-of-00002.bin`` shards with their index; random values: no download), then
loads it the way the ``shikra`` backend does (shards streamed onto a LLaMA built on the meta
device, cast to ``--dtype`` on ``--device``) after the paper preset's neck and CLIP are on the
device. Prints the peak anonymous and file-backed resident memory of this process while loading
(sampled every 20 ms from /proc/self/status; mapped shard pages count as file-backed, a second
copy of the model would show as anonymous), the checkpoint's size, and the device's peak
allocated memory. The baseline in the same run is the size of one copy of the LLM in ``--dtype``.

    python benchmarks/bench_llm_memory.py --device cuda --dtype bfloat16 [--layers 32] [--folder /tmp/shikra-7b]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import torch

from comneck.backends.hf_checkpoint import llama_config, llama_from_tensors
from comneck.backends.shikra import ShikraWeights, merged_tensors
from comneck.models import build_cloud_models
from comneck.pipeline import check_dtype
from comneck.presets import get_preset

VOCAB, HIDDEN, INTERMEDIATE, HEADS = 32003, 4096, 11008, 32


def write_checkpoint(folder: Path, layers: int) -> int:
    """A random fp16 Shikra-7B folder (two shards); its bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.rand(shape, generator=g, dtype=torch.float32) - 0.5).mul_(0.04).half()

    keys: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        keys.update({f"{p}self_attn.{n}_proj.weight": (HIDDEN, HIDDEN) for n in "qkvo"})
        keys.update({f"{p}mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN), f"{p}mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
                     f"{p}mlp.down_proj.weight": (HIDDEN, INTERMEDIATE), f"{p}input_layernorm.weight": (HIDDEN,),
                     f"{p}post_attention_layernorm.weight": (HIDDEN,)})
    keys.update({"lm_head.weight": (VOCAB, HIDDEN), "model.mm_projector.weight": (HIDDEN, 1024), "model.mm_projector.bias": (HIDDEN,)})
    names = list(keys)
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map, total = {}, 0
    for k, part in enumerate(halves):
        shard = f"pytorch_model-{k + 1:05d}-of-00002.bin"
        state = {name: rand(*keys[name]) for name in part}
        total += sum(t.numel() * 2 for t in state.values())
        torch.save(state, folder / shard)
        del state
        weight_map.update({name: shard for name in part})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config = {"model_type": "shikra", "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE, "num_hidden_layers": layers,
              "num_attention_heads": HEADS, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "vocab_size": VOCAB,
              "mm_hidden_size": 1024, "torch_dtype": "float16"}
    (folder / "config.json").write_text(json.dumps(config))
    return total


def resident() -> dict[str, int]:
    """This process's anonymous and file-backed resident bytes (Linux /proc)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {key: int(fields[key].split()[0]) * 1024 for key in ("RssAnon", "RssFile")}


class _Sampler:
    """Peak RssAnon / RssFile of this process, sampled in a thread."""

    def __init__(self) -> None:
        self.peak = resident()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = {key: max(self.peak[key], value) for key, value in resident().items()}
            time.sleep(0.02)

    def __enter__(self) -> "_Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class _Tokens:  # the loader needs only the special ids from the tokenizer; LLaMA's are fixed
    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--layers", type=int, default=32, help="LLaMA layers (32: 7B; fewer for a quick run)")
    parser.add_argument("--folder", type=Path, help="where to write the checkpoint (default: a temporary folder)")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), check_dtype(args.dtype)
    folder = args.folder or Path(tempfile.mkdtemp(prefix="shikra-7b-"))
    start = time.perf_counter()
    size = write_checkpoint(folder, args.layers)
    print(f"checkpoint: {folder}, {size / 2**30:.2f} GiB fp16 in 2 shards, written in {time.perf_counter() - start:.0f} s")
    models = build_cloud_models(get_preset("paper")).to(device, dtype)
    if device.type == "cuda":
        torch.cuda.synchronize()
        print(f"neck + CLIP (paper preset) on {device}: {torch.cuda.memory_allocated() / 2**30:.2f} GiB")
        torch.cuda.reset_peak_memory_stats()
    config = json.loads((folder / "config.json").read_text())
    weights = ShikraWeights(folder)
    start = time.perf_counter()
    before = resident()
    with _Sampler() as sampler:
        llm = llama_from_tensors(llama_config(config, _Tokens()),  # type: ignore[arg-type]
                                 ((k, t) for k, t in merged_tensors(weights) if "mm_projector" not in k), folder, dtype, device)
    seconds = time.perf_counter() - start
    one_copy = sum(p.numel() for p in llm.parameters()) * torch.finfo(dtype).bits / 8
    print(f"LLM loaded in {seconds:.0f} s; one copy in {args.dtype}: {one_copy / 2**30:.2f} GiB")
    grew = {k: (sampler.peak[k] - before[k]) / 2**30 for k in before}
    print(f"host peak while loading, above what the process held before: anonymous +{grew['RssAnon']:.2f} GiB, "
          f"file-backed (mapped shards) +{grew['RssFile']:.2f} GiB")
    if device.type == "cuda":
        print(f"GPU peak allocated while loading: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB; "
              f"now, neck + CLIP + LLM: {torch.cuda.memory_allocated() / 2**30:.2f} GiB (24 GiB card: "
              f"{'fits' if torch.cuda.max_memory_allocated() < 24 * 2**30 else 'does not fit'})")
    del models


if __name__ == "__main__":
    main()
