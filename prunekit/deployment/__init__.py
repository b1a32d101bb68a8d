"""The deployment transform: :func:`deploy` turns a (pruned) model into the inference network a
user would ship, so latency is compared as deployed (deployed pruned vs deployed unpruned).

* :mod:`.passes` -- BatchNorm folding, identity/dropout removal, epilogue fusion (fx graph);
* :mod:`.fused` -- :class:`FusedStripeConv2d`, what is fused where;
* :mod:`.fused_dense` -- :class:`FusedConv2d`, a dense conv with oneDNN post-ops;
* :mod:`.native_dense` -- :class:`NativeConv2d`, a dense conv on prunekit's C kernel;
* :mod:`.native_sequence` -- :class:`NativeSequence`, consecutive kernel convs as one C call;
* :mod:`.layout` -- channels_last, post-ops and native convs, measured on this machine and
  cached.

BatchNorm folding is the standard inference rewrite (e.g. Jacob et al., "Quantization and
Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference", arXiv:1712.05877,
section 3.2, for the conv/BN case); the stripe case folds BN's per-filter scale into each kept
stripe's row of a StripeConv2d (SWP, Meng et al., NeurIPS 2020, arXiv:2009.14410) -- exact,
because every stripe belongs to exactly one output filter.
"""
from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..errors import ConfigError, PrunekitError
from ..measure.context import ExampleInputs, prepare_inputs
from .fused import FusedStripeConv2d
from .fused_dense import FusedConv2d
from .layout import choose_channels_last, has_dense_post_ops, set_dense_post_ops
from .native_dense import NativeConv2d, native_twins, swap_modules
from .native_sequence import NativeSequence, group_native_convs, original_named_modules
from .passes import DeployTracer, drop_identities, fold_batchnorms, fuse_epilogues

__all__ = ["DEPLOY_ATTR", "DeployCheckError", "FusedConv2d", "FusedStripeConv2d", "NativeConv2d",
           "NativeSequence", "deploy", "original_named_modules"]

# The deployed module records what deploy() did under this attribute (a JSON-ready dict).
DEPLOY_ATTR = "prunekit_deploy"
# Deployed vs original on the example: rtol, and atol relative to the outputs' scale
# (folding reorders float32 rounding: a few ulps per layer).
CHECK_RTOL, CHECK_ATOL = 1e-4, 1e-5


class DeployCheckError(PrunekitError, RuntimeError):
    """The deployed model does not compute what the original computes (a bug: report it)."""


def _trace(model: nn.Module) -> fx.GraphModule:
    try:
        graph = DeployTracer().trace(model)
    except Exception as exc:  # fx raises many types; the message says what to do
        raise ConfigError(
            f"prunekit.deploy needs a torch.fx trace of the model and {type(model).__name__} "
            f"could not be traced ({type(exc).__name__}: {str(exc).splitlines()[0][:300]}); "
            "deploy a model whose forward has no data-dependent Python control flow") from None
    name = model.__class__.__name__
    return fx.GraphModule(model, graph, class_name=f"Deployed{name}")


def _first_output(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in _first_output(item)]
    return []


def _check(original: nn.Module, deployed: nn.Module, inputs: tuple) -> float:
    """Largest output difference on ``inputs``; DeployCheckError beyond the tolerance."""
    with torch.no_grad():
        want, got = _first_output(original(*inputs)), _first_output(deployed(*inputs))
    if len(want) != len(got):
        raise DeployCheckError(f"the deployed model returns {len(got)} outputs, the original "
                               f"{len(want)}")
    worst = 0.0
    for w, g in zip(want, got):
        if w.shape != g.shape:
            raise DeployCheckError(f"deployed output shape {tuple(g.shape)} != original "
                                   f"{tuple(w.shape)}")
        if not w.is_floating_point():
            continue
        scale = max(1.0, float(w.abs().max())) if w.numel() else 1.0
        diff = float((g - w).abs().max()) if w.numel() else 0.0
        worst = max(worst, diff)
        if not torch.allclose(g, w, rtol=CHECK_RTOL, atol=CHECK_ATOL * scale):
            raise DeployCheckError(f"the deployed model differs from the original by up to "
                                   f"{diff:.3g} (output scale {scale:.3g}); pass check=False to "
                                   "get it anyway, and please report the model")
    return worst


def deploy(model: nn.Module, example_inputs: ExampleInputs | None = None, *,
           channels_last: str | bool = "auto", fold_bn: bool = True, fuse: bool = True,
           drop: bool = True, check: bool = True, cache: bool | None = None,
           dense_post_ops: str | bool = "auto", native_convs: str | bool = "auto",
           native_sequences: bool = True) -> fx.GraphModule:
    """A deployed copy of ``model`` for inference (the model itself is left as it was).

    ``example_inputs`` (a tensor, tensors, or a shape with the batch dimension) are needed for
    ``channels_last="auto"`` (the layout is timed at that shape), for the residual-add fusion
    (shapes must be known equal) and for ``check`` (deployed == original on them, in eval
    mode; :class:`DeployCheckError` otherwise). Without them the layout stays NCHW, residual
    adds are not fused and nothing is checked. ``channels_last``: ``"auto"`` (measured, cached
    per device, threads, dtype, input shape and model structure; ``cache=False`` or
    ``PRUNEKIT_DEPLOY_CACHE=0`` skips the cache), ``True`` or ``False``. ``fold_bn`` /
    ``fuse`` / ``drop`` switch the three rewrites of :mod:`.passes`. ``dense_post_ops``: whether
    fused dense convs run their add and ReLU as oneDNN post-ops (:class:`FusedConv2d`):
    ``"auto"`` (timed with the layout; off without example inputs), ``True`` or ``False``.
    ``native_convs``: whether dense convs run on prunekit's C kernel (:mod:`.native_dense`):
    ``"auto"`` (each eligible conv timed both ways on its input from the example, then the
    whole network with the faster choices against the oneDNN layouts; off without example
    inputs or with ``channels_last=True``: the kernel reads NCHW), ``True`` (every eligible
    conv, untimed) or ``False`` (keep oneDNN, e.g. before ``export_onnx``, where nothing is
    gained: a native conv exports as a plain conv either way). ``native_sequences``: run each
    run of consecutive kernel convs (dense or stripe) as one C call
    (:mod:`.native_sequence`: the same results, bit for bit, without the Python cost of a
    call per conv); False keeps one module call per conv.

    Returns a ``torch.fx.GraphModule`` in eval mode with gradients off; what was done is in its
    ``prunekit_deploy`` attribute. It is for inference and export (``prunekit.io.export_onnx``);
    save the undeployed model with ``prunekit.io.save``.
    """
    if not (isinstance(channels_last, bool) or channels_last == "auto"):
        raise ConfigError(f"channels_last must be 'auto', True or False, not {channels_last!r}")
    if not (isinstance(dense_post_ops, bool) or dense_post_ops == "auto"):
        raise ConfigError(f"dense_post_ops must be 'auto', True or False, not "
                          f"{dense_post_ops!r}")
    if not (isinstance(native_convs, bool) or native_convs == "auto"):
        raise ConfigError(f"native_convs must be 'auto', True or False, not {native_convs!r}")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"deploy takes an nn.Module, got {type(model).__name__}")
    inputs = prepare_inputs(model, example_inputs) if example_inputs is not None else None
    was_training = {m: m.training for m in model.modules()}
    try:
        model.eval()
        work = copy.deepcopy(model).eval()
        work.requires_grad_(False)
        gm = _trace(work)
        record: dict[str, Any] = {"dropped": drop_identities(gm) if drop else [],
                                  "folded_bn": [list(p) for p in fold_batchnorms(gm)]
                                  if fold_bn else []}
        gm.graph.lint()
        gm.recompile()
        record.update(fuse_epilogues(gm, inputs) if fuse else {})
        gm.eval()
        record["channels_last"] = _layout(gm, inputs, channels_last, dense_post_ops,
                                          native_convs, cache, native_sequences)
        record["dense_post_ops"] = record["channels_last"]["dense_post_ops"]
        record["native_convs"] = record["channels_last"]["native_convs"]
        record["native_sequences"] = group_native_convs(gm) if native_sequences else []
        if check and inputs is not None:
            record["check_max_abs_diff"] = _check(model, gm, inputs)
    finally:
        for module, flag in was_training.items():
            module.training = flag
    setattr(gm, DEPLOY_ATTR, record)
    return gm


def _layout(gm: fx.GraphModule, inputs, channels_last, post_ops, native, cache,
            sequences: bool) -> dict:
    """Apply and report the layout, the dense post-ops setting and the convs moved to the C
    kernel (measured where "auto")."""
    fused = has_dense_post_ops(gm)
    has_dense = fused or any(type(m) is nn.Conv2d for m in gm.modules())
    if not has_dense:
        layouts = ("contiguous",)
    elif channels_last == "auto":
        layouts = ("contiguous", "channels_last")
    else:
        layouts = ("channels_last",) if channels_last else ("contiguous",)
    candidates = (False, True) if post_ops == "auto" and fused else (bool(post_ops) and fused,)
    usable = inputs is not None and all(isinstance(x, torch.Tensor) and x.dim() == 4
                                        for x in inputs)
    # the kernel reads NCHW: with channels_last forced, a native conv would convert its input;
    # the twins copy every conv's weights, so they are made only where they may be used
    wanted = native is True or (native == "auto" and usable and "contiguous" in layouts)
    twins = native_twins(gm) if wanted else {}
    if native is True:
        swap_modules(gm, twins)
    native_candidates = twins if native == "auto" else {}
    single = len(layouts) * len(candidates) == 1 and not native_candidates
    if single or not usable:
        if not single:
            warnings.warn("deploy(channels_last, dense_post_ops or native_convs = 'auto') "
                          "without a 4-D example input cannot time the variants; kept NCHW, "
                          "plain dense epilogues and oneDNN convs (give example_inputs, or set "
                          "the options)", stacklevel=3)
        source = ("no example input" if not single else
                  "no dense convolutions" if not has_dense else "option")
        decision = {"channels_last": channels_last is True and has_dense,
                    "dense_post_ops": post_ops is True and fused, "source": source,
                    "native_convs": sorted(twins) if native is True else []}
    else:
        decision = choose_channels_last(gm, inputs, cache=cache, layouts=layouts,
                                        post_ops=candidates, native=native_candidates or None,
                                        sequences=sequences)
        if native is True:
            decision["native_convs"] = sorted(twins)
        else:
            swap_modules(gm, {n: twins[n] for n in decision["native_convs"] if n in twins})
    if decision["channels_last"]:
        gm.to(memory_format=torch.channels_last)
    set_dense_post_ops(gm, decision["dense_post_ops"])
    return decision
