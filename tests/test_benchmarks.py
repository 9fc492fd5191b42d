"""The GPU benchmark's code path, run on the CPU: what a lent GPU machine would run (plain and
deployment modes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SHARED_DATA

ROOT = Path(__file__).resolve().parents[1]


def _gpu_benchmark(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "gpu.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), *args, "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def test_gpu_benchmark_plain_mode_runs_concurrent_slots_on_cpu(tmp_path):
    result = _gpu_benchmark(
        tmp_path, "--device", "cpu", "--concurrency", "1", "2", "--samples", "32", "--clients-per-slot", "2"
    )
    assert result["device"] == "cpu" and result["gpu"] is None
    runs = result["runs"]
    assert [r["concurrent"] for r in runs] == [1, 2]
    assert [r["clients"] for r in runs] == [2, 4]  # concurrency x clients per slot
    for r in runs:
        assert r["clients_per_second"] == pytest.approx(r["clients"] / r["seconds"], rel=0.01)
        assert r["device_memory_mb"] is None and not r["oom"]  # no device memory on a CPU
    assert result["summary"] == {
        "largest_concurrent_without_oom": 2,
        "out_of_memory_at": None,
        "client_gpu_fraction_that_avoids_it": None,
    }


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_benchmark_measures_device_memory_on_cuda(tmp_path):
    result = _gpu_benchmark(tmp_path, "--concurrency", "1", "2", "--samples", "64", "--clients-per-slot", "1")
    assert result["gpu"] and all(r["device_memory_per_client_mb"] > 0 for r in result["runs"])
    assert result["summary"]["client_gpu_fraction_that_avoids_it"] == 0.5


def test_gpu_benchmark_flower_modes_refuse_synthetic_data(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--mode", "plain", "deployment", "--device", "cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "--mode deployment trains real fedse clients: use --data cifar10" in done.stderr


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "cifar10").is_dir(), reason="../shared/data/cifar10 not present")
def test_gpu_benchmark_deployment_mode_runs_a_superlink_and_supernodes_on_cpu(tmp_path):
    result = _gpu_benchmark(
        tmp_path,
        *("--mode", "plain", "deployment", "--device", "cpu", "--data", "cifar10", "--data-root", str(SHARED_DATA)),
        *("--concurrency", "1", "--samples", "32", "--clients-per-slot", "1"),
    )
    plain, deployed = result["runs"]
    assert (plain["mode"], deployed["mode"]) == ("plain", "deployment")
    assert deployed["concurrent"] == deployed["clients"] == 1  # one SuperNode, one client
    assert deployed["clients_per_round"] == [1, 1] and deployed["failed_replies_per_round"] == [0, 0]
    assert deployed["clients_per_second"] == pytest.approx(1 / deployed["seconds"], rel=0.01)
    assert deployed["ratio_to_plain"] == pytest.approx(deployed["seconds"] / plain["seconds"], rel=0.01)
    assert deployed["processes_left_running"] == []


def test_time_to_accuracy_finds_the_first_round_at_the_target_and_the_seconds_until_its_end():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import tta

    rows = [
        {"round": 1, "seconds": 2.0, "local_acc_weighted": 0.5, "local_acc_mean": 0.4},
        {"round": 2, "seconds": 3.0, "local_acc_weighted": 0.95, "local_acc_mean": 0.9},
        {"round": 3, "seconds": 4.0, "local_acc_weighted": 0.97, "local_acc_mean": 0.96},
    ]
    assert tta._first(rows, "local_acc_weighted", 0.95) == (2, 5.0)  # reached at round 2, after 2 + 3 s
    assert tta._first(rows, "local_acc_mean", 0.95) == (3, 9.0)
    assert tta._first(rows, "local_acc_mean", 0.99) == (None, None)
