import re
import subprocess
import sys

import pytest
from cli_runner import run_main
from PIL import Image

from comneck_edge.cli import main


def edge(*args: str) -> subprocess.CompletedProcess:
    """``comneck-edge ARGS``, run in this process (cli_runner says why)."""
    return run_main(main, *args)


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


def test_nonsense_values_and_overwrites_are_refused(odd_photo, tmp_path):
    cnk, png = tmp_path / "a.cnk", tmp_path / "r.png"
    assert edge("encode", str(odd_photo), "-o", str(cnk)).returncode == 0
    png.write_bytes(b"an older picture")
    for args in (("encode", str(odd_photo), "-o", str(cnk)), ("decode", str(cnk), "-o", str(png)), ("encode", str(odd_photo), "--rate", "0")):
        run = edge(*args)
        assert run.returncode == 2 and run.stderr.startswith("comneck-edge: error:") and run.stderr.count("\n") == 1, run.stderr
    assert "exists: pass --force to overwrite it" in edge("encode", str(odd_photo), "-o", str(cnk)).stderr
    assert "rate index must be one of 1..4" in edge("encode", str(odd_photo), "--rate", "0").stderr
    assert png.read_bytes() == b"an older picture"  # nothing was overwritten
    assert edge("decode", str(cnk), "-o", str(png), "--force").returncode == 0 and Image.open(png).size == (256, 256)  # paper policy
    for flag in ("--timeout", "--retries"):
        run = edge("encode", str(odd_photo), "--server", "http://127.0.0.1:9", "--prompt", "x", flag, "-1")
        last = run.stderr.strip().splitlines()[-1]
        assert run.returncode == 2 and last.startswith(f"comneck-edge encode: error: argument {flag}") and "Traceback" not in run.stderr


def test_every_cli_has_version_and_python_m(tmp_path):
    from comneck import __version__

    for module, prog in (("comneck", "comneck"), ("comneck_edge", "comneck-edge"), ("comneck_server", "comneck-server"),
                         ("comneck_server.demo", "comneck-demo"), ("comneck.train.cli", "comneck-train"),
                         ("comneck.eval.cli", "comneck-eval")):
        run = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True, text=True)
        assert run.returncode == 0 and run.stdout.strip() == f"{prog} {__version__}", (module, run.stderr)
    run = subprocess.run([sys.executable, "-m", "comneck_edge", "encode", str(tmp_path / "none.jpg")], capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr == f"comneck-edge: error: no such file: {tmp_path / 'none.jpg'}\n"


def test_an_answer_from_something_else_than_a_gateway_is_named_so(odd_photo):
    """A web page, another API's JSON, or the URL of an endpoint instead of the base: one line, exit 2."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Foreign(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            self.rfile.read(int(self.headers["Content-Length"]))
            pages = {"/html/infer": ("text/html", b"<html>welcome</html>"), "/json/infer": ("application/json", json.dumps({"ok": True}).encode())}
            kind, body = pages.get(self.path, ("text/plain", b"no such page"))
            self.send_response(200 if self.path in pages else 404)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Foreign)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        cases = [(f"{base}/html", "not a ComNeck gateway", "(text/html) that is neither JSON nor msgpack"),
                 (f"{base}/json", "not a ComNeck gateway", "(application/json) without text, backend"),
                 (f"{base}/infer", "404 http_error", "is http://127.0.0.1")]
        for url, *expected in cases:
            for extra in ((), ("--json",)):
                run = edge("encode", str(odd_photo), "--server", url, "--prompt", "x", "--retries", "0", *extra)
                assert run.returncode == 2 and run.stderr.count("\n") == 1 and "Traceback" not in run.stderr, run.stderr
                assert all(text in run.stderr for text in expected), run.stderr
    finally:
        server.shutdown()
