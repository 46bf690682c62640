import subprocess
import sys

from cli_runner import run_main

from comneck_server.demo import main as demo_main


def run_demo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "comneck_server.demo", *args], capture_output=True, text=True)


def test_demo_round_trip_prints_answer_bpp_timings_and_says_weights_are_random():
    run = run_demo()
    assert run.returncode == 0, run.stderr
    for expected in ("gateway http://127.0.0.1:", "answer", "RANDOM WEIGHTS", "bpp", "edge (ms)", "network (ms)", "server (ms)", "entropy_decode"):
        assert expected in run.stdout
    server = next(line for line in run.stdout.splitlines() if line.startswith("server (ms)"))
    assert server.endswith("(a batch of 1)") and "batch_size" not in server  # a count, not milliseconds
    answer = run.stdout.split("answer", 1)[1].split("\n")[0].strip()
    assert answer in ("cow", "horse", "dog", "beach", "city street")


def test_demo_reports_bad_input_in_one_line(tmp_path):
    bad = tmp_path / "photo.jpg"
    bad.write_bytes(b"\x00" * 10)
    for args in (["--image", str(bad)], ["--image", str(tmp_path / "nope.png")], ["--rate", "9"], ["--rate", "0"]):
        run = run_main(demo_main, *args)  # in this process (cli_runner says why)
        assert run.returncode == 2
        assert run.stderr.startswith("comneck-demo: error:") and run.stderr.count("\n") == 1
        assert "Traceback" not in run.stderr


def test_rate_zero_is_refused_by_the_python_api_too():
    """`rate or trained or 1` once read rate 0 as rate 1."""
    import pytest

    from comneck.errors import ComneckInputError
    from comneck_edge import EdgeEncoder

    with pytest.raises(ComneckInputError, match="rate index must be one of 1..4"):
        EdgeEncoder("tiny", rate=0)
