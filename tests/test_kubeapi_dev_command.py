"""``dbsync dev apiserver`` runs the emulator until interrupted and writes a kubeconfig."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from dbsync.cli.main import main


def test_dev_apiserver_serves_until_interrupted(tmp_path: Path) -> None:
    """The command writes a working kubeconfig and exits 0 on SIGINT."""
    kubeconfig = tmp_path / "dev.kubeconfig"
    process = subprocess.Popen(
        [sys.executable, "-m", "dbsync.cli.main", "dev", "apiserver",
         "--kubeconfig", str(kubeconfig)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not kubeconfig.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        server = yaml.safe_load(kubeconfig.read_text())["clusters"][0]["cluster"]["server"]
        with urllib.request.urlopen(f"{server}/api/v1/namespaces/default", timeout=10) as reply:
            namespace = json.loads(reply.read())
    finally:
        process.send_signal(signal.SIGINT)
        stdout, _ = process.communicate(timeout=30)
    assert namespace["metadata"]["name"] == "default"
    assert process.returncode == 0
    assert f"listening on {server}" in stdout


def test_dev_apiserver_rejects_bad_port(capsys: pytest.CaptureFixture[str]) -> None:
    """An out-of-range --port is a usage error (exit code 2) naming the value."""
    with pytest.raises(SystemExit) as exit_info:
        main(["dev", "apiserver", "--port", "70000"])
    assert exit_info.value.code == 2
    assert "invalid port 70000" in capsys.readouterr().err
