"""Latency figures say how they were measured and warn when they cannot be trusted; the prune
report's before/after speed-up comes from one interleaved measurement of both models.
No assertion here depends on how fast anything ran."""
from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from prunekit import data, measure
from prunekit.cli import main
from prunekit.measure import latency as latency_module
from prunekit.measure.machine_load import LoadMonitor, MachineLoad, judge
from prunekit.pipeline.measuring import paired_speedup, summary_table

HAS_PROC_STAT = Path("/proc/stat").exists()


pytestmark = pytest.mark.usefixtures("single_thread", "private_cache")


def test_spread_and_percentiles_are_computed_from_the_runs():
    times = [1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8, 5.0]
    stats = latency_module._summarise(4, times)
    p10, p90 = np.percentile(times, 10), np.percentile(times, 90)
    assert stats.p10_ms == pytest.approx(p10) and stats.p90_ms == pytest.approx(p90)
    assert stats.spread == pytest.approx(p90 / p10)
    assert stats.median_ms == pytest.approx(1.45) and stats.runs == 10


def test_judge_names_each_reason_and_its_threshold():
    quiet = MachineLoad(cores=4, load_average_1min=0.5, other_cpu_cores=0.1, wall_seconds=1.0)
    assert judge(quiet, {1: 1.1, 64: 1.05}, threads=1) == []
    reasons = judge(quiet, {1: 1.9, 64: 1.05}, threads=1, max_spread=1.5)
    assert len(reasons) == 1 and "batch 1" in reasons[0] and "1.90" in reasons[0]
    busy = MachineLoad(cores=4, load_average_1min=0.5, other_cpu_cores=1.5, wall_seconds=1.0)
    reasons = judge(busy, {}, threads=1)  # default: a quarter of the 4 cores
    assert len(reasons) == 1 and "1.50 of 4 cores" in reasons[0]
    assert judge(busy, {}, threads=1, busy_fraction=0.5) == []
    loaded = MachineLoad(cores=2, load_average_1min=3.5, other_cpu_cores=None, wall_seconds=1.0)
    reasons = judge(loaded, {}, threads=1)  # limit 2 cores + 1 thread
    assert len(reasons) == 1 and "load average 3.50" in reasons[0]


def test_every_latency_records_how_it_was_measured():
    result = measure.measure_latency(nn.Conv2d(3, 4, 3), (1, 3, 8, 8), batch_sizes=(1, 2),
                                     runs=5, warmup=2, warn=False)
    as_json = json.loads(json.dumps(result.as_dict()))
    assert as_json["num_threads"] == 1 and as_json["warmup"] == 2
    for bs in ("1", "2"):
        b = as_json["batches"][bs]
        assert b["runs"] == 5 and b["spread"] == pytest.approx(b["p90_ms"] / b["p10_ms"])
    assert set(as_json["machine"]) == {"cores", "load_average_1min", "other_cpu_cores",
                                       "wall_seconds"}
    assert as_json["reliable"] == (as_json["warnings"] == [])
    assert "1 thread(s)" in result.describe() and "5 runs after 2 warm-up" in result.describe()


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


@pytest.mark.skipif(not HAS_PROC_STAT, reason="other processes' CPU use is read from /proc/stat")
def test_a_busy_machine_is_detected_and_warned_about():
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    spinner = context.Process(target=_spin, args=(2.0 if "fork" in methods else 6.0,))
    spinner.start()
    try:
        time.sleep(0.3 if "fork" in methods else 3.0)  # let it start spinning
        half_a_core = 0.5 / (os.cpu_count() or 1)
        with pytest.warns(measure.LatencyWarning, match="other processes"):
            result = measure.measure_latency(nn.Conv2d(3, 16, 3), (1, 3, 32, 32),
                                             batch_sizes=(1,), runs=5, warmup=1, min_time_s=0.5,
                                             busy_fraction=half_a_core, max_spread=1e9)
    finally:
        spinner.join()
    assert result.machine["other_cpu_cores"] >= 0.5  # the spinner's core at least
    assert not result.reliable and result.as_dict()["reliable"] is False
    assert any("other processes" in w for w in result.as_dict()["warnings"])
    assert "UNRELIABLE" in result.describe()


def test_load_monitor_subtracts_this_process_own_cpu_time():
    with LoadMonitor() as monitor:
        _spin(0.3)  # this process busy: not "other processes"
    assert monitor.result.wall_seconds >= 0.3
    if HAS_PROC_STAT:
        # whatever else runs on the machine, our own 0.3 s of CPU is not counted
        with LoadMonitor() as idle:
            time.sleep(0.3)
        assert monitor.result.other_cpu_cores <= idle.result.other_cpu_cores + 0.5


def test_interleaved_measurement_pools_rounds_and_gives_the_ratio_of_medians():
    small = nn.Conv2d(3, 4, 3)
    large = nn.Sequential(nn.Conv2d(3, 32, 3), nn.Conv2d(32, 32, 3))
    result = measure.interleaved_latency({"before": large, "after": small},
                                         torch.randn(1, 3, 16, 16), batch_sizes=(1, 2),
                                         rounds=3, runs=4, warmup=1, warn=False)
    for name in ("before", "after"):
        assert all(b.runs == 12 for b in result.results[name].batches.values())
        assert all(len(v) == 3 for v in result.round_medians_ms[name].values())
    medians = result.median_ms
    ratios = result.speedup("before", "after")
    assert ratios == {bs: pytest.approx(medians["before"][bs] / medians["after"][bs])
                      for bs in (1, 2)}
    low, high = result.speedup_range("before", "after")[1]
    per_round = [b / a for b, a in zip(result.round_medians_ms["before"][1],
                                       result.round_medians_ms["after"][1])]
    assert (low, high) == (pytest.approx(min(per_round)), pytest.approx(max(per_round)))
    out = json.loads(json.dumps(result.as_dict(before="before", after="after")))
    assert out["method"] == "interleaved" and out["rounds"] == 3 and out["runs_per_round"] == 4
    assert out["latency_x"]["2"] == pytest.approx(ratios[2])
    assert out["reliable"] == (out["warnings"] == [])


def test_bad_interleaved_arguments_are_refused():
    with pytest.raises(ValueError, match="rounds"):
        measure.interleaved_latency({"a": nn.Conv2d(3, 4, 3)}, torch.randn(1, 3, 8, 8), rounds=0)


def test_paired_speedup_deploys_both_models_and_leaves_them_as_they_were():
    unpruned = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU()).eval()
    final = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
    out = paired_speedup(unpruned, final, torch.randn(1, 3, 16, 16), latency_batches=(1,),
                         latency_runs=10, deploy=True)
    assert out["deployed"] is True and out["rounds"] * out["runs_per_round"] >= 10
    assert out["deploy"]["final"]["folded_bn"] == 1
    assert isinstance(final[1], nn.BatchNorm2d)  # the caller's model is not folded
    models = out["models"]
    assert out["latency_x"]["1"] == pytest.approx(
        models["unpruned"]["batches"]["1"]["median_ms"] / models["final"]["batches"]["1"]["median_ms"])


def test_prune_report_speedup_comes_from_one_interleaved_deployed_measurement(tmp_path, capsys):
    rng = np.random.default_rng(0)
    classes = ["a", "b", "c"]
    for split, n in (("train", 6), ("val", 3)):
        images = rng.integers(0, 256, (len(classes) * n, 32, 32, 3), dtype=np.uint8)
        data.export_image_folder(images, np.repeat(np.arange(len(classes)), n), tmp_path / "f",
                                 split, classes)
    data.clear_folder_cache()
    out = tmp_path / "run"
    code = main(["prune", "--model", "cifar_resnet20", "--model-kwargs", '{"num_classes": 3}',
                 "--data", str(tmp_path / "f"), "--input-size", "32", "--criterion", "l1",
                 "--ratio", "0.5", "--latency-batches", "1,2", "--latency-runs", "5",
                 "--deploy", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    speedup = report["speedup"]
    paired = speedup["latency_measurement"]
    assert paired["method"] == "interleaved" and paired["deployed"] is True
    assert set(paired["models"]) == {"unpruned", "final"}
    assert speedup["latency_x"] == paired["latency_x"]
    for bs in ("1", "2"):
        medians = {n: paired["models"][n]["batches"][bs]["median_ms"] for n in paired["models"]}
        assert speedup["latency_x"][bs] == pytest.approx(medians["unpruned"] / medians["final"])
    assert "latency_x_separate" in speedup  # the two separate stage measurements, kept apart
    assert paired["deploy"]["final"]["folded_bn"] > 0 and report["options"]["deploy"] is True
    # how many dense convs deploy moved to the C kernel, per model (a count, as for the BNs)
    assert all(isinstance(paired["deploy"][n]["native_convs"], int) for n in paired["deploy"])
    assert "interleaved measurement of both models, deployed" in summary_table(report)
    assert "interleaved" in capsys.readouterr().out
