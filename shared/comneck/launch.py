"""The console scripts' entry points: each imports its command only when run, so a command whose
pip extra is not installed says which one to install, in one line, instead of a traceback.

Every extra installs the six scripts (pip has no per-extra scripts); this is what a user of
``pip install 'comneck[edge]'`` meets when typing ``comneck-server``.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

_OWN = ("comneck", "comneck_edge", "comneck_server")


def _run(prog: str, module: str, extra: str) -> Callable[[], int]:
    def main() -> int:
        try:  # commands import some packages only when they need them (the server imports uvicorn to serve)
            return importlib.import_module(module).main()
        except ModuleNotFoundError as exc:
            if not exc.name or exc.name.split(".")[0] in _OWN:
                raise  # a broken install of ComNeck itself: the traceback is what helps
            print(f"{prog}: error: this command needs the {extra} extra (missing: {exc.name}): pip install 'comneck[{extra}]'",
                  file=sys.stderr)
            return 2

    return main


comneck = _run("comneck", "comneck.cli", "server")
comneck_demo = _run("comneck-demo", "comneck_server.demo", "edge,server")
comneck_edge = _run("comneck-edge", "comneck_edge.cli", "edge")
comneck_server = _run("comneck-server", "comneck_server.cli", "server")
comneck_train = _run("comneck-train", "comneck.train.cli", "train")
comneck_eval = _run("comneck-eval", "comneck.eval.cli", "eval")
