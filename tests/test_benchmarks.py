"""The speed benchmark's smoke mode: it must run and report every figure the README quotes (no timing here)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_train_quick_reports_every_figure():
    done = subprocess.run(
        [sys.executable, "benchmarks/bench_train.py", "--quick", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    for key in ("train_ratio", "infer_ratio", "roofline_fraction", "ceiling_train_ratio", "ceiling_infer_ratio"):
        assert result[key] > 0, key
    for key in ("peak_train_mb_batch16", "peak_train_mb_batch16_recompute"):
        assert result[key] > 0, key
    low_heap = [result["peak_train_mb_batch16_recompute_low_heap"], result["low_heap_step_time_ratio"]]
    if sys.platform == "linux":  # glibc's tunables: measured on Linux only
        assert all(value > 0 for value in low_heap)
    else:
        assert low_heap == [None, None]
    configs = [row["config"] for row in result["rows"]]
    assert configs[0] == "reference fp32" and len(configs) == 4
    for row in result["rows"]:
        assert row["train_seq_s"] > 0 and row["infer_seq_s"] > 0
        assert row["train_gflop_per_seq"] > row["infer_gflop_per_seq"] > 0


def test_bench_domain_checkpoint_and_series_evaluate(tmp_path):
    from benchmarks.bench_domain import write_checkpoint, write_series
    from convgru_cli.evaluate import evaluate_file

    write_series(str(tmp_path / "series.h5"), 32, 32, 13)
    write_checkpoint(str(tmp_path / "model.pt"), 32, 32, 6)
    report = evaluate_file([str(tmp_path / "series.h5")], str(tmp_path / "model.pt"), device="cpu")
    assert report["windows"] == 2 and report["lead_times"] == [1, 2, 3, 4, 5, 6]
    assert {"model", "persistence", "climatology"} <= set(report["mean"])
