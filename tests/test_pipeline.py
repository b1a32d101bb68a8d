"""End to end: prune -> fine-tune -> save -> load -> same outputs -> ONNX -> onnxruntime."""
import json

import numpy as np
import pytest
import torch

import prunekit
import prunekit.io as pio
from prunekit.cli import main
from prunekit.train import TrainConfig, fit

from conftest import SHARED, needs_shared, tiny_data


def test_prune_finetune_save_load_onnx(tmp_path):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = prunekit.models.create("cifar_resnet20").eval()
    result = prunekit.prune(model, torch.randn(1, 3, 32, 32), criterion="l1", ratio=0.4)
    assert result.macs_after < result.macs_before
    config = TrainConfig(epochs=1, lr=0.01, batch_size=16, progress=False, deterministic=True)
    summary = fit(model, tiny_data(64, 32, classes=10), tiny_data(32, 32, seed=1, classes=10), config, tmp_path / "ft")
    assert summary["epochs_run"] == 1 and (tmp_path / "ft" / "best.pt").exists()

    model.eval()
    path = pio.save(model, tmp_path / "model.safetensors", method="l1", plan=result.plan)
    loaded = pio.load(path).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert pio.read_spec(path)["plan"] == json.loads(json.dumps(result.plan))

    onnx_path = pio.export_onnx(loaded, tmp_path / "model.onnx", x[:1], check=False)
    import onnxruntime as ort
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (ort_out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(ort_out, loaded(x).numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.shared_data
@needs_shared
def test_cli_prune_finetune_export_report(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["prune", "--model", "cifar_resnet20", "--weights", "pretrained", "--data",
            str(SHARED), "--criterion", "l1", "--macs-reduction", "0.3", "--finetune-epochs",
            "1", "--finetune-max-steps", "2", "--finetune-batch-size", "16", "--eval-splits",
            "test-lossless", "--limit", "100", "--latency-batches", "1,2", "--latency-runs",
            "2", "--out", str(run)]
    assert main(args) == 0
    report = json.loads((run / "report.json").read_text())
    for stage in ("before", "pruned", "finetuned"):
        assert set(report[stage]["accuracy"]) == {"test-lossless"}
        assert set(report[stage]["latency_ms"]) == {"1", "2"}
    assert report["pruned"]["macs"] < report["before"]["macs"]
    achieved = 1 - report["pruned"]["macs"] / report["before"]["macs"]
    assert 0.3 <= achieved < 0.31
    assert report["plan"] and "stage_seconds" in report and "finetune" in report["stage_seconds"]
    out = capsys.readouterr().out
    assert "top-1 [test-lossless]" in out and "MACs speed-up" in out

    # The saved model evaluates through the same CLI and reports its pruned size.
    assert main(["eval", "--model", str(run / "model.safetensors"), "--data", str(SHARED),
                 "--split", "test-lossless", "--limit", "100", "--latency-batches", "",
                 "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["macs"] == report["finetuned"]["macs"]
    assert evaluated["top1"] == pytest.approx(report["finetuned"]["accuracy"]["test-lossless"]["top1"])

    assert main(["export", str(run), "--onnx"]) == 0
    assert (run / "model.onnx").exists()

    # Rerunning resumes: the pruned model is reloaded and no finished epoch is redone.
    assert main(args) == 0
    again = json.loads((run / "report.json").read_text())
    assert again["plan"] == report["plan"]
    assert again["finetune"]["epochs_run"] == 0

    assert main(["report", str(run), "--out", str(tmp_path / "cmp"), "--split",
                 "test-lossless"]) == 0
    assert (tmp_path / "cmp.png").stat().st_size > 1000
    assert "| run |" in (tmp_path / "cmp.md").read_text()


def test_cli_prune_rejects_bad_ratio(tmp_path, capsys):
    code = main(["prune", "--model", "cifar_resnet20", "--ratio", "1.5", "--data",
                 str(tmp_path), "--out", str(tmp_path / "r")])
    assert code == 2
    err = capsys.readouterr().err
    assert "--ratio" in err and "[0, 1)" in err and "CIFAR-10 not found" not in err


@pytest.mark.shared_data
@needs_shared
def test_cli_soft_pruning_method(tmp_path):
    run = tmp_path / "sfp"
    assert main(["prune", "--model", "cifar_resnet20", "--weights", "pretrained", "--data",
                 str(SHARED), "--method", "asfp", "--ratio", "0.3", "--finetune-epochs", "2",
                 "--finetune-max-steps", "2", "--finetune-batch-size", "16", "--eval-splits",
                 "test-lossless", "--limit", "50", "--latency-batches", "1",
                 "--latency-runs", "2", "--out", str(run)]) == 0
    report = json.loads((run / "report.json").read_text())
    assert report["finetuned"]["macs"] < report["before"]["macs"]
    assert report["plan"] and report["finetune"]["epochs_run"] == 2
    loaded = pio.load(run / "model.safetensors")
    assert prunekit.count_macs(loaded, torch.randn(1, 3, 32, 32)) == report["finetuned"]["macs"]


@pytest.mark.shared_data
@needs_shared
def test_cli_lfpc_method_reports_choices(tmp_path):
    run = tmp_path / "lfpc"
    assert main(["prune", "--model", "cifar_resnet20", "--weights", "pretrained", "--data",
                 str(SHARED), "--method", "lfpc", "--macs-reduction", "0.5",
                 "--search-epochs", "1", "--alpha-lr", "0.01", "--finetune-epochs", "1",
                 "--finetune-max-steps", "2", "--finetune-batch-size", "16", "--eval-splits",
                 "test-lossless", "--limit", "50", "--latency-batches", "1",
                 "--latency-runs", "2", "--out", str(run)]) == 0
    report = json.loads((run / "report.json").read_text())
    assert 0.5 <= 1 - report["finetuned"]["macs"] / report["before"]["macs"] <= 0.51
    choices = report["lfpc"]["choices"]
    assert len(choices) == len(report["plan"])
    assert {c["choice"] for c in choices} <= {"l1", "l2", "fpgm"}
    assert (run / "lfpc_choices.png").exists()
    assert (run / "lfpc" / "search" / "last.pt").exists() and (run / "lfpc" / "sfp" / "last.pt").exists()


def test_cli_lfpc_flags_need_lfpc(tmp_path, capsys):
    code = main(["prune", "--model", "cifar_resnet20", "--ratio", "0.3", "--alpha-lr", "0.1",
                 "--data", str(tmp_path), "--out", str(tmp_path / "r")])
    assert code == 2
    assert "--method lfpc" in capsys.readouterr().err


@pytest.mark.shared_data
@needs_shared
def test_calibration_batches_are_reproducible():
    from prunekit.pipeline import calibration_batches

    cfg = {"batches": 2, "batch_size": 8}
    torch.manual_seed(123)
    first = calibration_batches(SHARED, cfg, seed=0)
    after_first = torch.rand(1)
    torch.manual_seed(999)
    second = calibration_batches(SHARED, cfg, seed=0)
    for (x1, y1), (x2, y2) in zip(first, second):  # same images, same augmentation
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    other = calibration_batches(SHARED, cfg, seed=1)
    assert not torch.equal(first[0][0], other[0][0])
    torch.manual_seed(123)
    calibration_batches(SHARED, cfg, seed=0)
    assert torch.equal(torch.rand(1), after_first)  # the caller's RNG stream is untouched
