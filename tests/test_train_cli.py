"""comneck-train as a user drives it: the tiny CPU config, amp words, a missing GPU, an output
folder that holds a run, --resume without a checkpoint, Ctrl-C, the banner, short refusals."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_runner import run_main

from comneck.train.cli import main, resume_command
from comneck.train.config import load_config

TINY = str(Path(__file__).parents[1] / "configs" / "tiny_cpu_d1.yaml")


def train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "comneck.train.cli", *args], capture_output=True, text=True, timeout=300)


def refusal(*args: str) -> subprocess.CompletedProcess:
    """``comneck-train ARGS`` that must be refused before any work, run in this process (cli_runner says why)."""
    return run_main(main, *args)


def refused(run: subprocess.CompletedProcess, *words: str) -> None:
    assert run.returncode == 2 and run.stderr.startswith("comneck-train: error:") and run.stderr.count("\n") == 1, run.stderr
    assert "Traceback" not in run.stderr and all(word in run.stderr for word in words), run.stderr


def banner(stderr: str) -> list[str]:
    return [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("comneck-train:")]


def test_the_tiny_cpu_config_trains_with_no_overrides_and_says_what_it_trains(tmp_path):
    run = train(TINY, "--output", str(tmp_path))
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads(run.stdout)  # stdout is the result alone
    assert (summary["steps"], summary["preset"], summary["random_weights_in"]) == (6, "tiny", ["codec", "clip"])
    lines = banner(run.stderr)
    assert lines[0] == "comneck-train: d1 at rate 1, preset tiny, on cpu (amp off): 2 images in 2 classes, batch 2, epochs 2/2/2, 6 steps"
    assert "random weights in: codec, clip (the teacher CLIP is random" in lines[1]


@pytest.mark.parametrize("word, mode", [("off", "off"), ("false", "off"), ("on", "bf16"), ("true", "bf16"), ("bf16", "bf16"), ("FP16", "fp16")])
def test_amp_takes_yaml_booleans_and_words(tmp_path, word, mode):
    path = tmp_path / "c.yaml"
    path.write_text(f"data: {{root: sample}}\namp: {word}\n")
    assert load_config(path).amp == mode
    assert load_config(None, ["data.root=sample", f"amp={word}"]).amp == mode


def test_amp_off_from_the_command_line_and_a_bad_amp_word(tmp_path):
    run = train(TINY, "--amp", "off", "--output", str(tmp_path), "--stop-after-steps", "1")
    assert run.returncode == 0 and "(amp off)" in run.stderr, run.stderr[-2000:]
    refused(refusal(TINY, "--amp", "fast", "--output", str(tmp_path / "b")), "use off, bf16 or fp16")


def test_a_missing_gpu_and_short_refusals(tmp_path):
    out = str(tmp_path / "out")
    refused(refusal(TINY, "--device", "cuda:7" if __import__("torch").cuda.is_available() else "cuda", "--output", out), "cuda")
    refused(refusal(TINY, "--output", out, "--set", "clip_pretrained=openai"), "has no pretrained weights")
    run = refusal(TINY, "--output", out, "--preset", "paper", "--set", "clip_pretrained=nonsense")
    refused(run, "choose one of openai,")
    assert len(run.stderr) < 400
    assert not (tmp_path / "out").exists()  # refused before any work


def test_an_earlier_run_needs_resume_or_force_and_resume_needs_a_checkpoint(tmp_path):
    refused(refusal(TINY, "--output", str(tmp_path), "--resume"), "no checkpoint", "drop --resume")
    first = train(TINY, "--output", str(tmp_path), "--stop-after-steps", "2")
    assert first.returncode == 0 and json.loads(first.stdout) == {"stopped_at": {"stage": 0, "epoch": 1, "step_in_epoch": 1, "global_step": 2}}
    assert banner(first.stderr)[-1] == f"comneck-train: stopped at step 2; resume with: comneck-train {TINY} --output {tmp_path} --resume"
    log = (tmp_path / "log.jsonl").read_text()
    refused(refusal(TINY, "--output", str(tmp_path)), "holds an earlier run (checkpoints, log.jsonl)", "--resume", "--force")
    assert (tmp_path / "log.jsonl").read_text() == log  # untouched
    again = train(TINY, "--output", str(tmp_path), "--force", "--stop-after-steps", "1")
    assert again.returncode == 0 and len((tmp_path / "log.jsonl").read_text().splitlines()) == 1  # afresh, not appended
    resumed = train(TINY, "--output", str(tmp_path), "--resume")
    assert resumed.returncode == 0 and json.loads(resumed.stdout)["steps"] == 6
    assert "resuming at step 1 of 6" in banner(resumed.stderr)[0]


def wait_for_a_step(log: Path) -> None:
    deadline = time.monotonic() + 120
    while not (log.is_file() and log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.2)


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_saves_a_checkpoint_and_prints_the_resume_command(tmp_path, signum, code):
    args = [TINY, "--output", str(tmp_path), "--epochs", "400,1,1"]
    proc = subprocess.Popen([sys.executable, "-m", "comneck.train.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_a_step(tmp_path / "log.jsonl")
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code and stdout == "" and "Traceback" not in stderr, stderr[-2000:]
    interrupted, resume = banner(stderr)[-2:]
    name = signal.Signals(signum).name
    step = int(interrupted.split(f"interrupted by {name} at step ")[1].split(";")[0])
    checkpoint = tmp_path / "checkpoints" / f"step-{step:08d}"
    assert interrupted.endswith(f"checkpoint saved in {checkpoint}") and (tmp_path / "checkpoints" / "latest").read_text() == checkpoint.name
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
    assert resume == f"comneck-train: resume with: comneck-train {shlex.join(args)} --resume"
    again = train(*shlex.split(resume.split("resume with: ")[1])[1:], "--stop-after-steps", "1")
    assert again.returncode == 0 and f"resuming at step {step} of 402" in banner(again.stderr)[0], again.stderr[-2000:]
    assert json.loads(again.stdout)["stopped_at"]["global_step"] == step + 1


def test_ctrl_c_under_torchrun_saves_once_for_both_processes(tmp_path):
    """A terminal's Ctrl-C reaches torchrun and both workers; torchrun then sends SIGINT again."""
    args = [TINY, "--output", str(tmp_path), "--epochs", "400,1,1", "--batch-size", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "comneck.train.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    wait_for_a_step(tmp_path / "log.jsonl")
    os.killpg(proc.pid, signal.SIGINT)  # the whole process group, as a terminal does
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0 and stdout == "", stderr[-3000:]
    interrupted, resume = banner(stderr)[-2:]
    step = int(interrupted.split("interrupted by SIGINT at step ")[1].split(";")[0])
    assert (tmp_path / "checkpoints" / "latest").read_text() == f"step-{step:08d}"
    assert resume == f"comneck-train: resume with: torchrun --nproc-per-node 2 -m comneck.train.cli {shlex.join(args)} --resume"
    again = train(TINY, "--output", str(tmp_path), "--resume", "--stop-after-steps", "1")  # one process takes it on
    assert again.returncode == 0 and json.loads(again.stdout)["stopped_at"]["global_step"] == step + 1, again.stderr[-2000:]



def test_the_resume_command_drops_force_and_stop_after_steps():
    assert resume_command(["c.yaml", "--force", "--stop-after-steps", "3", "--set", "a=b c"]) == "comneck-train c.yaml --set 'a=b c' --resume"
    assert resume_command(["c.yaml", "--stop-after-steps=3", "--resume"], world=2) == "torchrun --nproc-per-node 2 -m comneck.train.cli c.yaml --resume"


@pytest.mark.parametrize("under_torchrun", [False, True])
def test_a_second_signal_stops_at_once_except_under_torchrun(monkeypatch, under_torchrun):
    """torchrun passes a terminal's Ctrl-C on to workers that already had it: that one must not abort the save."""
    from comneck.train.interrupt import StopRequest

    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    if under_torchrun:
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM
        if under_torchrun:
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.signum == signal.SIGTERM  # the first one is the one reported
        else:
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
