"""The paired-benchmark contender speaks the peers' serve protocol (../shared/bench/peers/README.md)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from test_train import REPO


def test_contender_answers_the_serve_protocol_in_bfloat16(tmp_path):
    rng = np.random.default_rng(0)
    ids = rng.integers(2, 10_000, size=(256, 200)).astype(np.int32)
    ids[:, :50] = 0  # front padding, as the peers' arrays have
    data = tmp_path / "arrays.npz"
    np.savez(data, x_train=ids, y_train=rng.integers(0, 2, 256).astype(np.int32))
    proc = subprocess.run([sys.executable, REPO / "benchmarks" / "paired_lstm_contender.py", "--model", "uni",
                           "--data", str(data), "--dtype", "bfloat16", "--cpu_devices", "2"],
                          input="2\n", capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    ready, reply = lines
    assert ready["ready"] and ready["dtype"] == "bfloat16" and ready["params"] == 1_411_713
    assert reply["steps"] == 2 and reply["examples_per_s"] == pytest.approx(2 * 64 / reply["seconds"], rel=1e-3)
