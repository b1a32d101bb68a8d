"""Models from anywhere (``prunekit.models.sources``): the zoo, torchvision, timm and the user's
own builder, named by one string; their weights (files read without unpickling code, named
downloads that fail clearly without network); the images each expects; and ``build_base``,
which rebuilds a saved model's architecture without weights, network or untrusted code."""
from __future__ import annotations

import argparse
import socket
import sys
import textwrap
import urllib.error

import pytest
import torch
from safetensors.torch import save_file

import prunekit
from prunekit.errors import ConfigError, PrunekitError
from prunekit.models import (UnknownModelError, UntrustedModuleError, WeightsDownloadError,
                             WeightsLoadError, WeightsNotFoundError, build_base, build_model,
                             load_weights, model_preprocessing, parse_model_ref)
from prunekit.models import sources

torchvision = pytest.importorskip("torchvision")
import torchvision.models._api as tv_api  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: one intra-op thread

USER_PACKAGE = "pk_user_nets"
USER_CODE = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes=10, width=8):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc(torch.relu(self.conv2(x)).mean((2, 3)))


def build(num_classes=10, width=8):
    return Net(num_classes, width)


def build_with_preprocessing():
    net = Net()
    net.prunekit_preprocessing = {"input_size": 48, "mean": [0.5] * 3, "std": [0.25] * 3,
                                  "crop_pct": 1.0}
    return net


def build_with_cfg():
    net = Net()
    net.pretrained_cfg = {"input_size": (3, 160, 160), "mean": (0.5, 0.5, 0.5),
                          "std": (0.5, 0.5, 0.5), "crop_pct": 0.9, "interpolation": "bicubic"}
    return net


class Factory:
    @staticmethod
    def make(width=4):
        return Net(3, width)


def returns_int():
    return 3


NOT_CALLABLE = 5
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """``pk_user_nets.builders`` on sys.path, forgotten again after the test."""
    package = tmp_path / USER_PACKAGE
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "builders.py").write_text(textwrap.dedent(USER_CODE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield f"{USER_PACKAGE}.builders"
    for name in [n for n in sys.modules if n.split(".")[0] == USER_PACKAGE]:
        del sys.modules[name]


@pytest.fixture
def no_downloads(monkeypatch):
    """Every downloader torchvision and timm use raises; returns the URLs they were asked for."""
    asked = []

    def refuse(url, *args, **kwargs):
        asked.append(url)
        raise urllib.error.URLError("downloads are switched off in this test")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(tv_api, "load_state_dict_from_url", refuse)
    if "timm" in sys.modules or _has_timm():
        import timm.models._builder as timm_builder
        import timm.models._hub as timm_hub
        for module, name in ((timm_hub, "hf_hub_download"), (timm_builder, "download_cached_file"),
                             (timm_builder, "load_state_dict_from_url"),
                             (timm_builder, "load_state_dict_from_hf")):
            monkeypatch.setattr(module, name, refuse)
    return asked


def _has_timm() -> bool:
    try:
        import timm  # noqa: F401
        return True
    except ImportError:
        return False


def _network_reachable(host: str) -> bool:
    try:
        socket.create_connection((host, 443), timeout=2).close()
        return True
    except OSError:
        return False


def _same_outputs(a: torch.nn.Module, b: torch.nn.Module, size: int = 32) -> None:
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x))


# ------------------------------------------------------------------------------ the string
def test_parse_model_ref_forms(user_module, tmp_path):
    assert parse_model_ref("cifar_resnet56") == {"source": "prunekit", "name": "cifar_resnet56"}
    assert parse_model_ref("prunekit:cifar_resnet20") == {"source": "prunekit",
                                                          "name": "cifar_resnet20"}
    assert parse_model_ref("torchvision:resnet50") == {"source": "torchvision",
                                                       "name": "resnet50"}
    assert parse_model_ref(f"{user_module}:build") == {"source": "module",
                                                       "name": f"{user_module}:build"}
    assert parse_model_ref(f"module:{user_module}:Factory.make") == {
        "source": "module", "name": f"{user_module}:Factory.make"}
    assert parse_model_ref("runs/a/model.safetensors") == {"path": "runs/a/model.safetensors"}
    # A module is found without running it.
    (tmp_path / USER_PACKAGE / "explodes.py").write_text("raise RuntimeError('ran')\n")
    assert parse_model_ref(f"{USER_PACKAGE}.explodes:build")["source"] == "module"
    assert f"{USER_PACKAGE}.explodes" not in sys.modules


def test_parse_unknown_prefix_names_the_sources():
    with pytest.raises(ConfigError) as info:
        parse_model_ref("tv:resnet50")
    message = str(info.value)
    assert "tv is neither a model source (prunekit, torchvision, timm) nor an importable " \
           "module" in message
    assert "sys.path" in message


def test_parse_refuses_weights_file_and_missing_function(user_module):
    with pytest.raises(ConfigError, match="--weights resnet.pth"):
        parse_model_ref("resnet.pth")
    with pytest.raises(ConfigError, match="after the colon give the function"):
        parse_model_ref(f"{user_module}:")


def test_unknown_names_suggest_close_matches():
    with pytest.raises(UnknownModelError, match="Did you mean 'cifar_resnet56'"):
        parse_model_ref("cifar_resnet57")
    with pytest.raises(UnknownModelError) as info:
        parse_model_ref("torchvision:resnet5O")
    assert "unknown torchvision model 'resnet5O'" in str(info.value)
    assert "'resnet50'" in str(info.value) and "list_models()" in str(info.value)


# ---------------------------------------------------------------------------- build_model
def test_build_torchvision_records_its_spec_and_recipe_specs_are_parsed():
    model = build_model({"source": "torchvision", "name": "resnet18", "weights": None,
                         "kwargs": {"num_classes": 7}})
    assert model.fc.out_features == 7
    assert model.prunekit_spec == {"source": "torchvision", "name": "resnet18",
                                   "kwargs": {"num_classes": 7}}
    model = build_model({"name": "torchvision:resnet18", "kwargs": {"num_classes": 3}})
    assert model.prunekit_spec["source"] == "torchvision" and model.fc.out_features == 3
    assert "source" not in build_model({"name": "cifar_resnet20"}).prunekit_spec  # zoo's own


def test_bad_specs_are_config_errors():
    with pytest.raises(ConfigError, match="takes only source, name, weights, kwargs"):
        build_model({"name": "cifar_resnet20", "wieghts": "pretrained"})
    with pytest.raises(ConfigError, match="JSON values"):
        build_model({"source": "torchvision", "name": "resnet18", "kwargs": {"x": object()}})
    with pytest.raises(ConfigError, match="not as the torchvision resnet18 argument 'weights'"):
        build_model({"source": "torchvision", "name": "resnet18",
                     "kwargs": {"weights": "DEFAULT"}})
    with pytest.raises(ConfigError, match="cannot be built with .*num_clases"):
        build_model({"source": "torchvision", "name": "resnet18", "kwargs": {"num_clases": 3}})
    with pytest.raises(ConfigError, match="knows the weights 'pretrained'"):
        build_model({"name": "cifar_resnet20", "weights": "IMAGENET1K_V1"})


# ------------------------------------------------------------------------- weights files
@pytest.fixture(scope="module")
def resnet18_state():
    torch.manual_seed(1)
    source = torchvision.models.resnet18(num_classes=4).eval()
    return source, source.state_dict()


@pytest.mark.parametrize("layout", ["plain", "wrapped_dataparallel", "reference_checkpoint",
                                    "ema_only", "safetensors"])
def test_weights_files_load(layout, resnet18_state, tmp_path):
    source, state = resnet18_state
    path = tmp_path / ("w.safetensors" if layout == "safetensors" else "w.pth")
    if layout == "plain":
        torch.save(state, path)
    elif layout == "wrapped_dataparallel":
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, path)
    elif layout == "reference_checkpoint":  # torchvision's references/timm's train.py
        torch.save({"model": state, "epoch": 3, "args": argparse.Namespace(lr=0.1)}, path)
    elif layout == "ema_only":
        torch.save({"state_dict_ema": state, "epoch": 3}, path)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    model = build_model({"source": "torchvision", "name": "resnet18", "weights": str(path),
                         "kwargs": {"num_classes": 4}})
    _same_outputs(model, source)
    assert model.prunekit_spec["kwargs"] == {"num_classes": 4}


class _Payload:
    """Anything but tensors and plain containers: unpickling it could run code."""


def test_pickle_payload_is_refused_as_unsafe(resnet18_state, tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": resnet18_state[1], "extra": _Payload()}, path)
    with pytest.raises(WeightsLoadError) as info:
        build_model({"source": "torchvision", "name": "resnet18", "weights": str(path),
                     "kwargs": {"num_classes": 4}})
    message = str(info.value)
    assert "refused as unsafe" in message and "_Payload" in message
    assert "weights_only=False" in message  # what to do if the file is trusted


def test_missing_weights_file_is_a_prunekit_error(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="nothing.pth") as info:
        build_model({"source": "torchvision", "name": "resnet18",
                     "weights": str(tmp_path / "nothing.pth")})
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, PrunekitError)


# -------------------------------------------------------------------- torchvision named weights
def test_unknown_torchvision_weights_list_the_valid_ones(no_downloads):
    with pytest.raises(ConfigError) as info:
        build_model({"source": "torchvision", "name": "resnet50", "weights": "IMAGENET1K_V9"})
    assert "IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT" in str(info.value)
    assert no_downloads == []


def test_torchvision_download_without_network_says_where_to_put_the_file(tmp_path,
                                                                         monkeypatch):
    if _network_reachable("download.pytorch.org"):
        pytest.skip("the network is reachable: this test checks the offline message")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache: a real attempt
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(5)
    try:
        with pytest.raises(WeightsDownloadError) as info:
            build_model({"source": "torchvision", "name": "resnet18", "weights": "IMAGENET1K_V1"})
    finally:
        socket.setdefaulttimeout(previous)
    message = str(info.value)
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert str(tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in message
    assert "--weights PATH" in message


def test_torchvision_download_error_from_the_downloader(no_downloads):
    with pytest.raises(WeightsDownloadError, match="downloads are switched off") as info:
        build_model({"source": "torchvision", "name": "resnet18", "weights": "DEFAULT"})
    assert isinstance(info.value, PrunekitError)
    assert no_downloads == ["https://download.pytorch.org/models/resnet18-f37072fd.pth"]


@pytest.fixture
def fake_downloads(monkeypatch):
    """torchvision's downloader returns the state dict of a network built as the weights
    were (googlenet's file has the aux heads its builder then drops)."""
    def download(url, *args, **kwargs):
        if "googlenet" in url:
            return torchvision.models.googlenet(init_weights=False).state_dict()
        return torchvision.models.resnet18().state_dict()

    monkeypatch.setattr(tv_api, "load_state_dict_from_url", download)


def test_torchvision_pretrained_records_what_rebuilds_it(fake_downloads):
    model = build_model({"source": "torchvision", "name": "googlenet", "weights": "DEFAULT"})
    assert model.prunekit_spec == {"source": "torchvision", "name": "googlenet",
                                   "kwargs": {"transform_input": True, "aux_logits": False}}
    base = build_base(**{k: model.prunekit_spec[k] for k in ("source", "name", "kwargs")})
    assert base.transform_input is True and base.aux1 is None
    assert {k: v.shape for k, v in base.state_dict().items()} == \
        {k: v.shape for k, v in model.state_dict().items()}


def test_pretrained_architecture_change_not_recorded_is_caught(fake_downloads, monkeypatch):
    monkeypatch.setattr(sources, "_TORCHVISION_PRETRAINED_DEFAULTS", {})
    with pytest.raises(ConfigError, match="differs from googlenet.*aux1.*--model-kwargs"):
        build_model({"source": "torchvision", "name": "googlenet", "weights": "DEFAULT"})


# ----------------------------------------------------------------------------- the user's code
def test_module_builder_with_kwargs_and_weights(user_module, tmp_path):
    model = build_model({"source": "module", "name": f"{user_module}:build",
                         "kwargs": {"num_classes": 5, "width": 6}})
    assert model.fc.out_features == 5 and model.conv.out_channels == 6
    assert model.prunekit_spec == {"source": "module", "name": f"{user_module}:build",
                                   "kwargs": {"num_classes": 5, "width": 6}}
    path = tmp_path / "user.pth"
    torch.save(model.state_dict(), path)
    again = build_model({"source": "module", "name": f"{user_module}:build", "weights": str(path),
                         "kwargs": {"num_classes": 5, "width": 6}})
    _same_outputs(again, model)
    made = build_model({"source": "module", "name": f"{user_module}:Factory.make"})
    assert made.fc.out_features == 3 and made.conv.out_channels == 4


@pytest.mark.parametrize("ref, kwargs, expected", [
    ("pk_no_such_package.nets:build", {}, "cannot import 'pk_no_such_package.nets'.*PYTHONPATH"),
    ("{mod}:missing", {}, "has no attribute 'missing'"),
    ("{mod}:NOT_CALLABLE", {}, "is a int, not a function or class"),
    ("{mod}:returns_int", {}, r"returned a int, not a torch.nn.Module"),
    ("{mod}:build", {"depth": 3}, "does not take the arguments.*depth"),
], ids=["not-importable", "no-attribute", "not-callable", "returns-int", "bad-kwargs"])
def test_module_errors_say_what_is_wrong(user_module, ref, kwargs, expected):
    with pytest.raises(ConfigError, match=expected):
        build_model({"source": "module", "name": ref.format(mod=user_module), "kwargs": kwargs})


def test_module_named_weights_are_refused(user_module):
    with pytest.raises(ConfigError, match="must be a weights file"):
        build_model({"source": "module", "name": f"{user_module}:build",
                     "weights": "pretrained"})


def test_user_model_is_prunable(user_module):
    model = build_model({"source": "module", "name": f"{user_module}:build",
                         "kwargs": {"width": 10}}).eval()
    prunekit.prune(model, torch.randn(1, 3, 16, 16), criterion="l1", ratio=0.3)
    assert model.conv.out_channels == 7 and model(torch.randn(2, 3, 16, 16)).shape == (2, 10)


# ------------------------------------------------------------------------------- build_base
def test_build_base_refuses_untrusted_code(user_module, monkeypatch):
    monkeypatch.delenv(sources.TRUSTED_MODULES_ENV, raising=False)
    ref = f"{user_module}:build"
    with pytest.raises(UntrustedModuleError) as info:
        build_base("module", ref, {"num_classes": 3})
    message = str(info.value)
    assert f"trusted_modules=['{USER_PACKAGE}']" in message
    assert f"--trust-module {USER_PACKAGE}" in message
    assert f"{user_module}" not in sys.modules  # nothing was imported
    with pytest.raises(UntrustedModuleError):
        build_base("module", ref, {}, trusted_modules=["other"])


def test_build_base_builds_trusted_code(user_module, monkeypatch):
    ref = f"{user_module}:build"
    model = build_base("module", ref, {"num_classes": 3}, trusted_modules=[USER_PACKAGE])
    assert model.fc.out_features == 3
    assert model.prunekit_spec == {"source": "module", "name": ref, "kwargs": {"num_classes": 3}}
    monkeypatch.setenv(sources.TRUSTED_MODULES_ENV, f"else, {USER_PACKAGE}")
    assert build_base("module", ref, {}).fc.out_features == 10


def test_build_base_never_downloads(no_downloads):
    model = build_base("torchvision", "resnet18", {})
    assert model.prunekit_spec == {"source": "torchvision", "name": "resnet18", "kwargs": {}}
    # detection builders default to downloading an ImageNet backbone
    build_base("torchvision", "fasterrcnn_mobilenet_v3_large_320_fpn", {})
    with pytest.raises(ConfigError, match="argument 'weights_backbone'"):
        build_base("torchvision", "resnet18", {"weights_backbone": "DEFAULT"})
    assert no_downloads == []


# ---------------------------------------------------------------------------- preprocessing
def test_preprocessing_of_the_zoo_and_torchvision(user_module):
    zoo = build_model({"name": "cifar_resnet20"})
    assert model_preprocessing({"name": "cifar_resnet20"}, zoo).input_size == 32
    spec = {"source": "torchvision", "name": "resnet50", "weights": "IMAGENET1K_V2"}
    pre = model_preprocessing(spec, torch.nn.Identity())
    assert (pre.input_size, pre.resize_size, pre.interpolation) == (224, 232, "bilinear")
    assert pre.mean == (0.485, 0.456, 0.406) and "IMAGENET1K_V2" in pre.source
    full = model_preprocessing({**spec, "weights": "ResNet50_Weights.IMAGENET1K_V2"},
                               torch.nn.Identity())
    assert full == pre
    plain = model_preprocessing({"source": "torchvision", "name": "resnet50", "weights": None},
                                torch.nn.Identity())
    assert (plain.input_size, plain.resize_size) == (224, 256) and "ImageNet" in plain.source
    detection = model_preprocessing({"source": "torchvision", "name": "fasterrcnn_resnet50_fpn",
                                     "weights": "DEFAULT"}, torch.nn.Identity())
    assert detection.input_size == 224  # its weights' transforms have no crop size


def test_preprocessing_of_module_models_and_saved_models(user_module):
    own = build_model({"source": "module", "name": f"{user_module}:build_with_preprocessing"})
    pre = model_preprocessing({"source": "module"}, own)
    assert (pre.input_size, pre.mean, pre.crop_pct) == (48, (0.5,) * 3, 1.0)
    cfg = build_model({"source": "module", "name": f"{user_module}:build_with_cfg"})
    pre = model_preprocessing({"source": "module", "name": "x"}, cfg)
    assert (pre.input_size, pre.crop_pct, pre.interpolation, pre.std) == (160, 0.9, "bicubic",
                                                                         (0.5,) * 3)
    saved = torchvision.models.resnet18()
    saved.prunekit_spec = {"source": "torchvision", "name": "resnet18", "kwargs": {}}
    saved.prunekit_saved_spec = {"preprocessing": {"input_size": 200, "crop_pct": 0.8}}
    pre = model_preprocessing({"path": "model.safetensors"}, saved)
    assert (pre.input_size, pre.crop_pct, pre.source) == (200, 0.8, "saved with the model")


# ------------------------------------------------------------------------------------ timm
@pytest.fixture(scope="module")
def timm():
    return pytest.importorskip("timm")


def test_timm_refs_and_names(timm):
    assert parse_model_ref("timm:resnet10t") == {"source": "timm", "name": "resnet10t"}
    with pytest.raises(UnknownModelError, match="unknown timm model 'resnet10tt'.*'resnet10t'"):
        parse_model_ref("timm:resnet10tt")
    with pytest.raises(ConfigError, match="no pretrained tag 'bogus'.*resnet10t.c3_in1k"):
        parse_model_ref("timm:resnet10t.bogus")


def test_timm_model_builds_loads_and_rebuilds(timm, tmp_path, no_downloads):
    model = build_model({"source": "timm", "name": "resnet10t", "kwargs": {"num_classes": 5}})
    assert model.prunekit_spec == {"source": "timm", "name": "resnet10t",
                                   "kwargs": {"num_classes": 5}}
    path = tmp_path / "timm.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    again = build_model({"source": "timm", "name": "resnet10t", "weights": str(path),
                         "kwargs": {"num_classes": 5}})
    _same_outputs(again, model)
    base = build_base("timm", "resnet10t", {"num_classes": 5})
    assert load_weights(base, model.state_dict()) is base  # same architecture
    assert no_downloads == []


def test_timm_preprocessing_comes_from_its_pretrained_cfg(timm):
    model = build_model({"source": "timm", "name": "resnet10t"})
    pre = model_preprocessing({"source": "timm", "name": "resnet10t"}, model)
    cfg = model.pretrained_cfg
    assert (pre.input_size, pre.crop_pct, pre.interpolation) == \
        (cfg["input_size"][1], cfg["crop_pct"], cfg["interpolation"]) == (176, 0.875, "bicubic")
    assert pre.mean == tuple(cfg["mean"]) and pre.std == tuple(cfg["std"])
    assert pre.backend == "timm" and "timm" in pre.source


def test_timm_download_without_network(timm, monkeypatch):
    import huggingface_hub.constants
    # The real timm -> huggingface_hub path, told there is no network (its own retries when
    # the host cannot be resolved take most of a minute).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsDownloadError) as info:
        build_model({"source": "timm", "name": "resnet10t", "weights": "pretrained"})
    message = str(info.value)
    assert "timm/resnet10t.c3_in1k" in message and "--weights PATH" in message
    assert huggingface_hub.constants.HF_HUB_CACHE in message


def test_timm_download_error_from_the_downloader(timm, no_downloads):
    with pytest.raises(WeightsDownloadError, match="downloads are switched off"):
        build_model({"source": "timm", "name": "resnet10t", "weights": "c3_in1k"})
    assert no_downloads
    with pytest.raises(ConfigError, match="valid: pretrained, c3_in1k"):
        build_model({"source": "timm", "name": "resnet10t", "weights": "in22k"})


def test_timm_model_is_prunable(timm):
    model = build_model({"source": "timm", "name": "resnet10t",
                         "kwargs": {"num_classes": 4}}).eval()
    before = sum(p.numel() for p in model.parameters())
    prunekit.prune(model, torch.randn(1, 3, 32, 32), criterion="l1", ratio=0.3)
    assert sum(p.numel() for p in model.parameters()) < before
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)
