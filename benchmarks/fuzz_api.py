"""Schemathesis fuzzing of the whole HTTP API, longer than `make test` runs it, with the count tried.

Runs ``tests/test_schema_fuzz.py`` (every route and content type of the gateway's own OpenAPI
schema, the chat endpoint included; checks: no 5xx, answers that conform to the schema, coded
errors) with ``--examples`` cases per operation instead of the test suite's 25, and prints how
many requests each operation got, by status. The cases are derandomised: the same count gives the
same cases. The baseline beside it is the suite's own bounded run (its 25 per operation).

    .venv/bin/python benchmarks/fuzz_api.py [--examples 500]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(examples: int) -> tuple[dict[str, dict[str, int]], float, int]:
    """(statuses per operation, seconds, pytest's exit code) of one fuzzing run."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        env = {**os.environ, "COMNECK_FUZZ_EXAMPLES": str(examples), "COMNECK_FUZZ_REPORT": str(report)}
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_schema_fuzz.py"],
                              cwd=ROOT, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            print(done.stdout[-4000:], done.stderr[-2000:], sep="\n")
        return (json.loads(report.read_text()) if report.exists() else {}), seconds, done.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=500, help="cases per operation (the test suite runs 25)")
    args = parser.parse_args()
    rows = []
    for examples in (25, args.examples):
        statuses, seconds, code = run(examples)
        total = sum(sum(seen.values()) for seen in statuses.values())
        server_errors = sum(n for seen in statuses.values() for status, n in seen.items() if int(status) >= 500)
        rows.append((examples, total, server_errors, seconds, code))
        print(f"\n{examples} examples per operation: {total} requests in {seconds:.0f} s, {server_errors} 5xx, pytest exit {code}")
        for label, seen in statuses.items():
            print(f"  {label:32s} {sum(seen.values()):6d}  " + ", ".join(f"{s}: {n}" for s, n in sorted(seen.items())))
    print("\nexamples  requests  5xx  seconds  result")
    for examples, total, server_errors, seconds, code in rows:
        print(f"{examples:8d}  {total:8d}  {server_errors:3d}  {seconds:7.0f}  {'pass' if code == 0 else 'FAIL'}")
    return 0 if all(row[-1] == 0 for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
