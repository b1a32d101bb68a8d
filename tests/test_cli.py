"""The `prunekit` command line: eval output, JSON keys, and clear errors."""
import json

import pytest

from prunekit.cli import main

from conftest import SHARED
needs_shared = pytest.mark.skipif(not (SHARED / "cifar10").exists(),
                                  reason=f"shared data not found at {SHARED}")


@pytest.mark.shared_data
@needs_shared
def test_eval_json_has_required_keys(capsys):
    code = main(["eval", "--model", "cifar_resnet20", "--weights", "pretrained",
                 "--data", str(SHARED), "--split", "test-lossless", "--limit", "200",
                 "--latency-batches", "1,2", "--latency-runs", "2", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    for key in ("top1", "top5", "macs", "params", "latency_ms", "split"):
        assert key in report
    assert report["macs"] == 40_551_040
    assert report["params"] == 269_722
    assert set(report["latency_ms"]) == {"1", "2"}
    assert report["images"] == 200
    assert report["split"] == "test-lossless"
    assert 80 <= report["top1"] <= 100  # pretrained ResNet-20, 91.5 on all 1,000


@pytest.mark.shared_data
@needs_shared
def test_eval_table_names_the_split(capsys):
    code = main(["eval", "--model", "cifar_resnet20", "--weights", "pretrained",
                 "--data", str(SHARED), "--split", "test-lossless", "--limit", "100",
                 "--latency-batches", ""])
    assert code == 0
    out = capsys.readouterr().out
    assert "test-lossless" in out and "MACs" in out and "40,551,040" in out


def test_missing_data_is_a_clear_error(tmp_path, capsys):
    code = main(["eval", "--model", "cifar_resnet20", "--data", str(tmp_path / "nowhere"),
                 "--latency-batches", ""])
    assert code == 2
    err = capsys.readouterr().err
    assert "PRUNEKIT_DATA" in err and "--data" in err and "nowhere" in err


def test_unknown_model_lists_valid_names(capsys):
    assert main(["eval", "--model", "resnet57"]) == 2
    err = capsys.readouterr().err
    assert "cifar_resnet56" in err


def test_explain_prints_groups(capsys):
    assert main(["explain", "--model", "cifar_resnet20"]) == 0
    out = capsys.readouterr().out
    assert "ChannelGraph of CifarResNet" in out and "layer1.0.conv1" in out
