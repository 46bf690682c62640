"""The deployment files stay consistent with the code (no Docker engine runs here)."""

import fnmatch
import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_compose_runs_a_checked_gateway_and_an_edge_client_against_it():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    server, edge = compose["services"]["server"], compose["services"]["edge"]
    for service in (server, edge):
        assert (ROOT / service["build"]["dockerfile"]).is_file()
    assert "/readyz" in " ".join(server["healthcheck"]["test"])
    assert edge["depends_on"]["server"]["condition"] == "service_healthy"
    command = edge["command"]
    assert command[0] == "encode" and command[command.index("--server") + 1] == "http://server:8000"
    assert Path(command[1]).name in {p.name for p in (ROOT / "shared/comneck/assets").glob("*.png")}
    assert "deploy:" in (ROOT / "docker-compose.yml").read_text()  # the commented GPU reservation


def test_dockerfiles_start_installed_commands():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    server = (ROOT / "docker/Dockerfile.server").read_text()
    edge = (ROOT / "docker/Dockerfile.edge").read_text()
    assert re.search(r'^CMD \["comneck-server"\]', server, re.M) and "comneck-server" in scripts
    assert re.search(r'^ENTRYPOINT \["comneck-edge"\]', edge, re.M) and "comneck-edge" in scripts
    assert "COMNECK_HOST=0.0.0.0" in server and "COMNECK_PORT=8000" in server


def _pip_installs(dockerfile: str) -> list[str]:
    """The pip install commands of a Dockerfile's RUN lines (continuations joined, split at &&)."""
    text = dockerfile.replace("\\\n", " ")
    runs = [line[4:] for line in text.splitlines() if line.startswith("RUN ")]
    return [part.strip() for run in runs for part in run.split("&&") if re.search(r"\bpip3? install", part)]


def test_images_install_the_lock_then_the_project_alone():
    for name, lock in (("server", "server"), ("edge", "edge")):
        installs = _pip_installs((ROOT / f"docker/Dockerfile.{name}").read_text())
        assert installs[0] == f"pip install -r requirements/{lock}.txt"
        for command in installs:
            named = re.findall(r"-r (\S+)", command)
            assert named or "--no-deps" in command, command  # nothing resolved outside the lock
            for path in named:
                assert re.fullmatch(r"requirements/\w+\.txt", path) and (ROOT / path).is_file(), path
        # the project itself: no dependencies, and the lock's setuptools as its build backend
        assert installs[-1] == "pip install --no-deps --no-build-isolation ."
        lock_text = (ROOT / f"requirements/{lock}.txt").read_text()
        for pin in ("torch", "torchvision", "setuptools", "wheel"):
            assert re.search(rf"^{pin}==", lock_text, re.M), pin


def _ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore leaves `path` out: a pattern matches it or a folder above it
    (a leading **/ matches at any depth)."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        deep = pattern.startswith("**/")
        for prefix in prefixes:
            if fnmatch.fnmatchcase(prefix.rsplit("/", 1)[-1] if deep else prefix, pattern.removeprefix("**/")):
                return True
    return False


def test_dockerignore_keeps_weights_and_local_environments_out():
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    for path in ("weights/d1_1.pth.tar", ".venv/bin/python", ".venv-lock/bin/uv", ".git/HEAD",
                 "dist/comneck-0.1.0-py3-none-any.whl", "build/lib/comneck/__init__.py",
                 "runs/d1/last.safetensors", "shared/comneck.egg-info/PKG-INFO", "torch-2.14.1.whl",
                 "cloud_server/comneck_server/__pycache__/cli.cpython-311.pyc"):
        assert _ignored(path, patterns), path
    for path in ("pyproject.toml", "README.md", "requirements/server.txt", "shared/comneck/assets/cow_beach.png",
                 "cloud_server/comneck_server/settings.py", "edge_client/comneck_edge/cli.py"):
        assert not _ignored(path, patterns), path
