"""The short form of `make fuzz`: schemathesis over the served OpenAPI schema against a real
server on the tiny models (bench/fuzz.py), a few examples per operation, bounded in time. Any
server error or schema violation fails the test, with schemathesis's report in the message."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT


def test_short_fuzz_finds_no_server_errors_or_schema_violations():
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "fuzz.py"), "--examples", "6", "--max-time", "100"],
                         capture_output=True, text=True, timeout=500)
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["ok"], result["output_tail"]
    assert run.returncode == 0
