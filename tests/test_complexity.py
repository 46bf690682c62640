import json

import pytest
import torch
from cli_runner import run_main

from comneck.cli import main as comneck_main
from comneck.complexity import PAPER_TABLE3, complexity_report, count_macs
from comneck.presets import PRESETS

L, W, M, E = 257, 1024, 320, 768  # tokens, CLIP-L width, latent channels, embedding size


def block_macs(tokens: int, width: int) -> int:
    """One pre-LN ViT block: qkv, QK^T, AV, out projection, 4x MLP."""
    return tokens * width * 3 * width + 2 * tokens * tokens * width + tokens * width * width + 2 * tokens * width * 4 * width


@pytest.fixture(scope="module")
def paper_report():
    return complexity_report(PRESETS["paper"], size=256)


def test_parameters_match_paper_table3(paper_report):
    assert paper_report["neck"].params == 13_191_168
    assert paper_report["g_s"].params == 7_337_475
    assert paper_report["unet"].params == 31_037_763
    assert paper_report["clip_head"].params == 602_112 + 2 * 12_596_224  # patch conv + 2 blocks
    for name, (paper_m, _) in PAPER_TABLE3.items():
        assert abs(paper_report[name].params / 1e6 - paper_m) / paper_m < 0.005, name


def test_macs_equal_hand_counts(paper_report):
    assert paper_report["neck"].macs == 256 * M * W + block_macs(L, W)
    assert paper_report["clip_head"].macs == 256 * (3 * 14 * 14) * W + 2 * block_macs(L, W)
    assert paper_report["clip_tail"].macs == 22 * block_macs(L, W) + L * W * E + W * E
    # transposed convolutions count at their input resolution: g_s's last layer, 192 -> 3, 5x5, 128x128 in
    assert paper_report["g_s"].macs > 192 * 3 * 25 * 128 * 128
    assert paper_report["neck"].kmac_per_pixel == pytest.approx(paper_report["neck"].macs / 65536 / 1e3)
    # the served composition (pipeline.latent_features) costs exactly its two parts
    assert paper_report["cloud"].macs == paper_report["neck"].macs + paper_report["clip_tail"].macs
    assert paper_report["cloud"].params == paper_report["neck"].params + paper_report["clip_tail"].params


def test_336_presets_count_at_their_own_geometry():
    # default size: the preset's codec input (384), so 24x24 latents and 577 tokens through neck and tail
    report = complexity_report(PRESETS["tiny-336"])
    tokens, width, m, embed = 577, 64, 40, 32
    assert report["neck"].pixels == 384 * 384
    assert report["neck"].macs == 576 * m * width + block_macs(tokens, width)
    assert report["clip_head"].macs == 576 * (3 * 14 * 14) * width + 2 * block_macs(tokens, width)
    assert report["clip_tail"].macs == 2 * block_macs(tokens, width) + tokens * width * embed + width * embed
    assert report["cloud"].macs == report["neck"].macs + report["clip_tail"].macs


def test_counter_sees_attention_and_restores_the_fast_path():
    attn = torch.nn.MultiheadAttention(64, 4, batch_first=True).eval()
    x = torch.randn(1, 10, 64)
    before = torch.backends.mha.get_fastpath_enabled()
    macs = count_macs(lambda: attn(x, x, x, need_weights=False))
    assert macs == 10 * 64 * 3 * 64 + 2 * 10 * 10 * 64 + 10 * 64 * 64
    assert torch.backends.mha.get_fastpath_enabled() == before


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_counter_sees_scaled_dot_product_attention_on_every_kernel(device):
    # real CPU tensors take the fused CPU flash kernel; meta tensors the decomposed math path
    q, k, v = (torch.randn(2, 4, 10, 16, device=device) for _ in range(3))
    macs = count_macs(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    assert macs == 2 * 4 * (10 * 10 * 16 + 10 * 10 * 16)


def test_cli_json_and_errors():
    run = run_main(comneck_main, "complexity", "--json", "--preset", "tiny")  # in this process (cli_runner says why)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert {"neck", "g_a", "g_s", "unet", "clip_head", "clip_tail"} <= report.keys()
    assert all(isinstance(v["params"], int) and isinstance(v["kmac_per_pixel"], float) for v in report.values())
    bad = run_main(comneck_main, "complexity", "--size", "100")
    assert bad.returncode == 2
    assert "multiple of 64" in bad.stderr and "Traceback" not in bad.stderr


def test_the_paper_figures_stand_only_beside_the_paper_preset():
    from comneck.complexity import format_report

    tiny = PRESETS["tiny"]
    text = format_report(complexity_report(tiny, size=256), tiny, 256, 2)
    assert " paper " not in text.splitlines()[1] and "13.19M" not in text and "linear 40->64" in text and "blocks k+1..4" in text
    assert "--preset paper" in text.splitlines()[-1]
