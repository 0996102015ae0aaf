"""``benchmarks/gpu.py``: the no-CUDA path (a clear message, exit 0, nothing written) and the
CUDA path's logic, run on the CPU with ``--device cpu --dry-run`` (tiny model, eager compile
backend; timings mean nothing, the table's structure and the MAC ratios do)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


@pytest.fixture(scope="module")
def gpu_bench():
    spec = importlib.util.spec_from_file_location("leanvit_benchmarks_gpu", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_without_cuda_it_says_so_and_exits_0(gpu_bench, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_bench.main(["--out-dir", str(tmp_path)]) == 0
    assert "CUDA is not available on this machine" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def test_device_slug(gpu_bench):
    assert gpu_bench.device_slug("NVIDIA H200") == "nvidia_h200"
    assert gpu_bench.device_slug("NVIDIA A100-SXM4-80GB") == "nvidia_a100_sxm4_80gb"


def test_bad_arguments_are_clear_errors(gpu_bench):
    with pytest.raises(SystemExit):
        gpu_bench.parse_args(["--modes", "fast"])
    with pytest.raises(SystemExit):
        gpu_bench.parse_args(["--batch-sizes", "0"])


def test_dry_run_on_cpu_writes_the_table(gpu_bench, tmp_path):
    methods = ["tome"]
    assert gpu_bench.main(["--device", "cpu", "--dry-run", "--methods", *methods,
                           "--batch-sizes", "1,2", "--out-dir", str(tmp_path)]) == 0
    md = (tmp_path / "gpu_cpu.md").read_text()
    data = json.loads((tmp_path / "gpu_cpu.json").read_text())
    assert md.startswith("# GPU benchmark: DRY RUN")
    rows = data["rows"]
    # every (mode, batch, method) measured once, none failed
    assert sorted((r["mode"], r["batch_size"], r["name"]) for r in rows) == sorted(
        (m, b, n) for m in ("eager", "compiled") for b in (1, 2) for n in methods)
    assert all("error" not in r for r in rows), [r.get("error") for r in rows]
    for r in rows:
        assert r["mac_ratio"] > 1.1 and r["speedup"] > 0 and r["peak_mb"] is None
        assert r["round_ratio_min"] <= r["speedup"] * 1.0001
        assert f"| {r['mode']} | {r['batch_size']} | {r['method']} | {r['mac_ratio']:.3f}x" in md


def test_a_failing_entry_is_recorded_and_the_run_goes_on(gpu_bench, tmp_path, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr("leanvit.bench.time_models", broken)
    assert gpu_bench.main(["--device", "cpu", "--dry-run", "--methods", "tome",
                           "--batch-sizes", "1", "--modes", "eager",
                           "--out-dir", str(tmp_path)]) == 0
    md = (tmp_path / "gpu_cpu.md").read_text()
    assert "failed: RuntimeError: CUDA out of memory (simulated)" in md
