import re
import subprocess
import sys

import pytest
from PIL import Image


def edge(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "comneck_edge.cli", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def odd_photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("photos") / "odd.png"
    Image.effect_mandelbrot((100, 75), (-2, -1, 1, 1), 50).convert("RGB").save(path)
    return path


def test_encode_then_decode_restores_the_size_and_reports_real_bpp(odd_photo, tmp_path):
    cnk, recon = tmp_path / "odd.cnk", tmp_path / "recon.png"
    run = edge("encode", str(odd_photo), "-o", str(cnk), "--resize", "none", "--rate", "2")
    assert run.returncode == 0, run.stderr
    bpp = float(re.search(r"([\d.]+) bpp", run.stdout).group(1))
    assert bpp == pytest.approx(8 * cnk.stat().st_size / (100 * 75), abs=1e-4)
    assert "RANDOM WEIGHTS" in run.stdout and "100x75" in run.stdout
    run = edge("decode", str(cnk), "-o", str(recon))
    assert run.returncode == 0, run.stderr
    assert Image.open(recon).size == (100, 75)


@pytest.mark.parametrize("params, flag", [("fixed", 0x80), ("float", 0)])
def test_entropy_params_are_chosen_recorded_and_decoded(odd_photo, tmp_path, params, flag):
    cnk, recon = tmp_path / "odd.cnk", tmp_path / "recon.png"
    run = edge("encode", str(odd_photo), "-o", str(cnk), "--entropy-params", params)
    assert run.returncode == 0, run.stderr
    assert f"{'fixed-point' if flag else 'float'} entropy parameters" in run.stdout
    assert cnk.read_bytes()[5] & 0x80 == flag
    assert edge("decode", str(cnk), "-o", str(recon)).returncode == 0 and Image.open(recon).size == (256, 256)  # paper policy


def test_default_output_name_and_paper_policy(odd_photo, tmp_path):
    photo = tmp_path / "shot.png"
    photo.write_bytes(odd_photo.read_bytes())
    assert edge("encode", str(photo)).returncode == 0
    assert (tmp_path / "shot.cnk").is_file()


def test_mistakes_give_one_line_errors(odd_photo, tmp_path):
    cnk = tmp_path / "ok.cnk"
    assert edge("encode", str(odd_photo), "-o", str(cnk)).returncode == 0
    cut = tmp_path / "cut.cnk"
    cut.write_bytes(cnk.read_bytes()[:30])
    cases = [
        (("encode", str(tmp_path / "missing.jpg")), "no such file"),
        (("encode", str(cnk)), "not a readable image"),
        (("decode", str(cut), "-o", str(tmp_path / "r.png")), "truncated"),
        (("decode", str(odd_photo), "-o", str(tmp_path / "r.png")), "not a ComNeck bitstream"),
        (("decode", str(cnk), "-o", str(tmp_path / "r.png"), "--preset", "paper"), "differ from this decoder"),
        (("decode", str(cnk), "-o", str(tmp_path / "r.unknown")), "cannot write"),
    ]
    for args, message in cases:
        run = edge(*args)
        assert run.returncode == 2, args
        assert run.stderr.startswith("comneck-edge: error:") and message in run.stderr, run.stderr
        assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
