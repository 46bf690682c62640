"""The console scripts without their extra: one line naming the extra to install, exit code 2."""

import subprocess
import sys

import pytest

import comneck.launch

CASES = [  # entry point, its arguments, a package its extra brings, the extra named
    ("comneck_server", ["--port", "0"], "uvicorn", "server"),
    ("comneck_edge", ["--help"], "httpx", "edge"),
    ("comneck_train", ["--help"], "yaml", "train"),
    ("comneck", ["complexity"], "open_clip", "server"),
    ("comneck_demo", ["--help"], "httpx", "edge,server"),
    ("comneck_eval", ["report", "/nonexistent"], "bjontegaard", "eval"),
]


@pytest.mark.parametrize("entry, args, missing, extra", CASES)
def test_a_command_without_its_extra_names_the_extra(entry, args, missing, extra):
    code = (f"import sys; sys.modules[{missing!r}] = None; import comneck.launch as launch; "  # None: as if not installed
            f"sys.argv = ['x', *{args!r}]; sys.exit(launch.{entry}())")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    prog = entry.replace("_", "-")
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr == f"{prog}: error: this command needs the {extra} extra (missing: {missing}): pip install 'comneck[{extra}]'\n"


def test_every_console_script_goes_through_the_launcher():
    import tomllib
    from pathlib import Path

    scripts = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {name: f"comneck.launch:{name.replace('-', '_')}" for name in scripts}
    assert all(callable(getattr(comneck.launch, name.replace("-", "_"))) for name in scripts)


def test_the_version_is_pyprojects():
    import tomllib
    from pathlib import Path

    from comneck.version import __version__

    assert tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["version"] == __version__
