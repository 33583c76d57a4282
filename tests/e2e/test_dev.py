"""`mailflow dev`: the README's first command, end to end, on its own embedded moto server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from support.harness import REPO, require_binary


def _dev(tmp_path: Path, path_env: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    orders = tmp_path / "orders"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MAILFLOW_"))}
    env |= {"ORDERS_DIR": str(orders), "PATH": path_env, "MAILFLOW_LOG_FORMAT": "json"}
    proc = subprocess.run(
        [sys.executable, "-m", "mailflow", "dev", "--exit-when-done"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    return proc, orders


def _results(stderr: str) -> dict[str, dict]:
    out = {}
    for line in stderr.splitlines():
        if line.startswith("{") and '"sample_result"' in line:
            doc = json.loads(line)
            out[doc["recipient"]] = doc
    return out


@pytest.mark.parametrize("processor", ["php", "python"])
def test_dev_runs_the_samples_end_to_end(tmp_path: Path, processor: str) -> None:
    if processor == "php":
        require_binary("php")
        path_env = os.environ["PATH"]
    else:
        path_env = str(Path(sys.executable).parent)  # no php on this PATH
    proc, orders = _dev(tmp_path, path_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if processor == "python":
        assert "php_missing" in proc.stderr
    results = _results(proc.stderr)
    assert {r: d["status"] for r, d in results.items()} == {
        "ne-001@orders.example.com": "succeeded",
        "ne-002@orders.example.com": "succeeded",
        "ne-003@orders.example.com": "succeeded",
        "ne-004@orders.example.com": "succeeded",
        "info@orders.example.com": "failed",
    }
    assert results["info@orders.example.com"]["reason"] == "unroutable"
    assert "①" in results["ne-001@orders.example.com"]["subject"]
    files = sorted(p.relative_to(orders).as_posix() for p in orders.rglob("*.json"))
    assert files == [
        "store-001/100123.json",
        "store-002/200456.json",
        "store-003/300789.json",
        "store-004/400321.json",
    ]
    order = json.loads((orders / "store-001" / "100123.json").read_text())
    assert order["items"]
    assert str(REPO) not in proc.stdout  # dev prints logs to stderr only
    # The samples were stored encrypted, as SES with a KMS key stores them, and decrypted.
    (backend,) = [json.loads(x) for x in proc.stderr.splitlines() if '"dev_backend"' in x]
    assert backend["kms_key"] == "alias/mailflow-dev"
