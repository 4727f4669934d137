"""schemathesis against the server's own OpenAPI spec: generated requests (valid and invalid) on every
route; no response may be a 5xx, and every status, content type, header and body must be the one the
spec documents. Bounded: deterministic generation, at most MAX_EXAMPLES cases per route and TIME_LIMIT_S
in all, on a tiny pair with a 64-token context so that any request the spec allows finishes fast."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_server import ServerProcess

pytestmark = pytest.mark.slow

MAX_EXAMPLES = 200
# One worker: with two, schemathesis's generation trips a CPython 3.11 ast.parse thread-safety bug
# ("AST constructor recursion depth mismatch"), an error of the tool, not of the server.
TIME_LIMIT_S = 150
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,"
          "response_schema_conformance")


def test_schemathesis_finds_nothing(tiny_pair, tmp_path):
    cli = Path(sys.executable).with_name("schemathesis")
    if not cli.exists() and shutil.which("schemathesis") is None:
        pytest.fail("schemathesis is a test dependency (pip install -e '.[test]')")
    base, nudger = tiny_pair("llama", "llama", "bytelevel", 0.5, max_position_embeddings=64)
    srv = ServerProcess(base, nudger, tmp_path / "server.log")
    report = tmp_path / "report.json"
    try:
        out = subprocess.run(
            [str(cli) if cli.exists() else "schemathesis", "run", srv.url + "/openapi.json", "--checks", CHECKS,
             "--max-examples", str(MAX_EXAMPLES), "--max-time", str(TIME_LIMIT_S), "--generation-deterministic",
             "--request-timeout", "60", "--workers", "1", "--no-color", "--report", "json",
             "--report-json-path", str(report)],
            cwd=tmp_path, capture_output=True, text=True, timeout=TIME_LIMIT_S + 120)
    finally:
        srv.stop()
    summary = json.loads(report.read_text())
    assert out.returncode == 0 and not summary["failures"] and not summary["errors"], out.stdout[-6000:]
    assert summary["test_cases"]["generated"] >= 6 * 50, summary["test_cases"]
    assert "Traceback" not in srv.log_path.read_text(), srv.log_path.read_text()[-4000:]
