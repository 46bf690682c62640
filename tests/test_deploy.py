"""The deployment files stay consistent with the code (no Docker engine runs here)."""

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
    # installs follow the lock: torch/torchvision at the locked versions, everything else constrained by it
    assert 'pip install -c requirements/server.txt ".[server]"' in server
    assert 'pip install -c requirements/edge.txt ".[edge]"' in edge
    for text, lock in ((server, "server"), (edge, "edge")):
        assert f"grep -m1 '^torch==' requirements/{lock}.txt" in text
        assert re.search(r"^torch==", (ROOT / f"requirements/{lock}.txt").read_text(), re.M)
    assert "COMNECK_HOST=0.0.0.0" in server
