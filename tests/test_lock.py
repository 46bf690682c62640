"""The lock (requirements/*.txt) matches pyproject.toml: `make lock` was run after the ranges changed."""

import fnmatch
import re
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
SETS = ["edge", "edge-lite", "server", "train", "llm", "eval", "dev"]  # dev last: the others are resolved inside it


def pins(name: str) -> dict[str, list[str]]:
    """{package: [versions]} of a lock file (a package may have one pin per Python-version marker)."""
    found: dict[str, list[str]] = {}
    for line in (ROOT / "requirements" / f"{name}.txt").read_text().splitlines():
        if match := re.match(r"^([A-Za-z0-9_.\-]+)==([^ ;]+)", line):
            found.setdefault(canonicalize_name(match[1]), []).append(match[2])
    return found


def requirements(extra: str) -> list[Requirement]:
    """Base and extra requirements of the project, the self-references expanded."""
    reqs, todo, seen = [Requirement(r) for r in PROJECT["dependencies"]], [extra], set()
    while todo:
        current = todo.pop()
        seen.add(current)
        for text in PROJECT["optional-dependencies"][current]:
            req = Requirement(text)
            if req.name == PROJECT["name"]:
                todo += [e for e in req.extras if e not in seen]
            else:
                reqs.append(req)
    return reqs


@pytest.mark.parametrize("name", SETS)
def test_every_requirement_is_pinned_within_its_range(name):
    locked = pins(name)
    for req in requirements(name):
        versions = locked.get(canonicalize_name(req.name))
        assert versions, f"{req.name} is not in requirements/{name}.txt: run make lock"
        assert all(req.specifier.contains(v, prereleases=True) for v in versions), f"{req} vs {versions}: run make lock"


@pytest.mark.parametrize("name", SETS[:-1])
def test_every_set_agrees_with_dev(name):
    dev = pins("dev")
    for package, versions in pins(name).items():
        assert set(versions) <= set(dev[package]), f"{package}: {name} pins {versions}, dev {dev[package]}"


def test_the_tests_run_on_the_locked_versions():
    dev = pins("dev")
    for package in ("torch", "torchvision", "compressai", "open-clip-torch", "transformers", "numpy", "onnx", "onnxruntime"):
        assert version(package).split("+")[0] in dev[package], package


#: What the ONNX edge (edge-lite) must not install: PyTorch, its CUDA libraries and what only the torch codec or the cloud needs.
NOT_ON_THE_LITE_EDGE = ("torch", "torchvision", "compressai", "safetensors", "transformers", "torch-geometric", "open-clip-torch",
                        "triton", "nvidia-*", "cuda-*")


def _heavy(names) -> list[str]:
    return sorted(n for n in map(canonicalize_name, names) if any(fnmatch.fnmatch(n, pattern) for pattern in NOT_ON_THE_LITE_EDGE))


def test_the_lite_edge_installs_no_torch():
    """requirements/edge-lite.txt (every package of the install, pinned) and the edge-lite extra with the base
    dependencies hold neither PyTorch nor anything that needs it; onnxruntime runs the encoder."""
    assert _heavy(pins("edge-lite")) == [], "requirements/edge-lite.txt"
    assert _heavy(req.name for req in requirements("edge-lite")) == [], "pyproject.toml: dependencies + edge-lite"
    assert {"onnxruntime", "numpy", "pillow", "httpx", "msgpack"} <= set(pins("edge-lite"))
    assert _heavy(["torch", "nvidia-cudnn-cu12", "torch_geometric"]) == ["nvidia-cudnn-cu12", "torch", "torch-geometric"]  # the check bites


def test_every_torch_side_has_the_codec():
    """The codec's packages (torch, compressai, safetensors) left the base dependencies for the codec extra:
    every set that had them still has them."""
    codec = {canonicalize_name(Requirement(text).name) for text in PROJECT["optional-dependencies"]["codec"]}
    assert {"torch", "torchvision", "compressai", "safetensors"} <= codec
    assert not codec & {canonicalize_name(Requirement(text).name) for text in PROJECT["dependencies"]}
    for name in SETS:
        if name != "edge-lite":
            assert codec <= {canonicalize_name(req.name) for req in requirements(name)}, name
            assert codec <= set(pins(name)), f"requirements/{name}.txt"


def test_make_demo_installs_only_what_the_demo_runs(tmp_path):
    """`make demo` on a fresh clone installs the server and edge locks, not the dev set; on a
    .venv that already holds the dev set it installs nothing more."""
    import os
    import shutil
    import subprocess

    if shutil.which("make") is None:
        pytest.skip("no make on this machine")
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "requirements", tmp_path / "requirements")
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}  # as typed, not under `make test`

    def dry_run() -> str:
        return subprocess.run(["make", "--no-print-directory", "-n", "demo"], cwd=tmp_path, env=env, capture_output=True, text=True,
                              check=True).stdout

    fresh = dry_run()
    assert "pip install -r requirements/server.txt -r requirements/edge.txt" in fresh and "dev.txt" not in fresh
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / ".comneck-installed").touch()
    assert dry_run().splitlines() == [".venv/bin/comneck-demo"]


@pytest.mark.parametrize("name", ["edge", "server"])
def test_the_cpu_only_lock_is_the_lock_with_the_cpu_build_of_torch(name):
    """requirements/NAME-cpu.txt is what `make lock` writes from NAME.txt: every other pin the same,
    torch and torchvision as the +cpu pair of the same versions, none of the CUDA build's packages."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("cpu_lock", ROOT / "requirements" / "cpu_lock.py")
    cpu_lock = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cpu_lock)
    written = (ROOT / "requirements" / f"{name}-cpu.txt").read_text()
    assert written == cpu_lock.cpu_variant((ROOT / "requirements" / f"{name}.txt").read_text(), name), "run make lock"
    cuda, cpu = pins(name), pins(f"{name}-cpu")
    gone = {package for package in cuda if package.startswith(("nvidia-", "cuda-")) or package == "triton"}
    assert len(gone) >= 10 and set(cpu) == set(cuda) - gone
    for package in ("torch", "torchvision"):
        assert sorted(cpu[package]) == sorted([cuda[package][0], cuda[package][0] + "+cpu"])
    assert all(cpu[package] == versions for package, versions in cuda.items() if package not in gone | {"torch", "torchvision"})
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in written.splitlines()
