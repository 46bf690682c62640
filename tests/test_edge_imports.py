import subprocess
import sys

import pytest

SERVER_ONLY = ["fastapi", "uvicorn", "transformers", "open_clip", "pydantic", "pydantic_settings", "comneck_server", "comneck.backends", "comneck.pipeline"]


def test_edge_client_works_without_server_dependencies():
    code = (
        "import sys\n"
        f"for name in {SERVER_ONLY!r}: sys.modules[name] = None  # any import of them now fails\n"
        "import torch, comneck_edge, comneck_edge.cli\n"
        "comneck_edge.GatewayClient('http://127.0.0.1:1').close()\n"
        "enc = comneck_edge.EdgeEncoder('tiny', rate=2).encode_tensor(torch.rand(1, 3, 64, 96))\n"
        "from comneck.image import sample_photo\n"
        "assert comneck_edge.encode(sample_photo().read_bytes())[:4] == b'CNKB'\n"
        "print(len(enc.data), enc.bitstream.latents.padded_size)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    num_bytes, _ = run.stdout.split(" ", 1)
    assert int(num_bytes) > 0 and "(64, 128)" in run.stdout


@pytest.mark.parametrize("module, mistake, said", [
    ("comneck_edge.cli", ["encode", "x.jpg", "--rate", "two"], "--rate: invalid int value: 'two'"),
    ("comneck_server.demo", ["--rate", "two"], "--rate: invalid int value: 'two'"),
    ("comneck.train.cli", ["c.yaml", "--rate", "two"], "--rate: invalid int value: 'two'"),
    ("comneck.eval.cli", ["run", "c.yaml", "--limit", "two"], "--limit: invalid int value: 'two'"),
    ("comneck_server.cli", ["--port", "two"], "comneck-server: error: --port: Input should be a valid integer"),
])
def test_help_and_argument_mistakes_answer_without_importing_torch(module, mistake, said):
    """`comneck-edge --help` used to take 4-7 s on 2 cores: it imported torch and the codec to print text."""
    code = (
        "import sys\n"
        f"from {module} import main\n"
        f"for argv in (['--help'], {mistake!r}):\n"
        "    try: code = main(argv)\n"
        "    except SystemExit as exc: code = exc.code\n"
        "    print('@', argv[-1], code)\n"
        "import comneck_edge\n"
        "comneck_edge.GatewayClient('http://127.0.0.1:1').close()\n"
        "print('@ torch imported:', 'torch' in sys.modules)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert [line for line in run.stdout.splitlines() if line.startswith("@")] == ["@ --help 0", "@ two 2", "@ torch imported: False"]
    assert said in run.stderr
