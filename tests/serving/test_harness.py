"""serving.harness: a server subprocess that is waited for, fails fast and is always stopped.

The SERVING path itself is exercised by every test that starts `socialrec serve` through it
(test_server.py, retrain/test_end_to_end.py, the load test).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from socialrec.serving.harness import NOT_SERVING, ServerProcess

pytestmark = pytest.mark.slow  # the slow tier (make test-slow)


def test_importing_the_harness_does_not_import_torch() -> None:
    code = "import sys, socialrec.serving.harness; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_ports_are_the_harness_s_own() -> None:
    with pytest.raises(ValueError):
        ServerProcess(["--port", "1234"])
    with pytest.raises(ValueError):
        ServerProcess(["--metrics-port=9100"])
    s = ServerProcess(port=4321, metrics=True)
    assert s.address == "127.0.0.1:4321" and s.cmd[-4:-2] == ["--port", "4321"]
    assert s.metrics_url == f"http://127.0.0.1:{s.metrics_port}/metrics"
    assert s.stop() is None and s.log_path is None  # never started: no process, no log


def test_a_server_that_exits_fails_fast_with_its_log(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    s = ServerProcess(["--bundle", str(tmp_path), "--no-such-flag"], log=log)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="unrecognized arguments: --no-such-flag"), s:
        pass
    assert time.monotonic() - t0 < 60 and not s.alive() and s.proc.returncode == 2
    assert "--no-such-flag" in log.read_text()


def test_not_serving_times_out_and_stop_terminates(tmp_path: Path) -> None:
    """An empty bundle root: the server runs, NOT_SERVING until a bundle is pointed to."""
    (tmp_path / "bundles").mkdir()
    args = ["--bundle", str(tmp_path / "bundles"), "--redis-url", "redis://127.0.0.1:1/0"]
    s = ServerProcess(args, env={"SOCIALREC_WRITE_TOKEN": "t"}, ready_timeout_s=60).start()
    try:
        s.wait_health(NOT_SERVING)
        with pytest.raises(RuntimeError, match="not in health"):
            s.wait_serving(timeout_s=1.0)
        assert s.alive()
    finally:
        code = s.stop()
    assert code is not None and not s.alive()
    assert not s.log_path.exists()  # a temporary log is removed
