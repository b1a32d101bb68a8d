"""Physical channel removal: slice every tensor a ChannelGraph names, then fix module metadata.

The model stays an ordinary nn.Module (same classes, smaller tensors), so it trains, saves and
exports like any other.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
from torch import nn

from .graph import ChannelGraph, kept_positions
from .plan import PlanError


def removed_channel_roots(graph: ChannelGraph, plan: dict[str, list[int]]) -> set[int]:
    """Channel identities removed by ``plan`` (:meth:`ChannelGraph.removed_roots`)."""
    return graph.removed_roots(plan)


def apply_plan(model: nn.Module, graph: ChannelGraph, plan: dict[str, list[int]]) -> nn.Module:
    """Remove, in place, every channel the plan does not keep; returns ``model``."""
    removed = graph.removed_roots(plan)
    if not removed:
        return model
    slices: dict[str, list] = defaultdict(list)
    for member, roots in graph.tensor_members():
        keep = kept_positions(roots, removed)
        if len(keep) < len(roots):
            slices[member.tensor].append((member.dim, keep, member.blocks))
    # Cut every tensor and count every attribute before changing any, so an impossible cut
    # leaves the model untouched.
    cut = {name: _sliced(model, name, cuts) for name, cuts in slices.items()}
    kept_by_module, sizes = _attribute_updates(model, graph, removed)
    touched_modules = set()
    for tensor_name, data in cut.items():
        _replace_tensor(model, tensor_name, data)
        touched_modules.add(tensor_name.rsplit(".", 1)[0] if "." in tensor_name else "")
    for name, kept in kept_by_module.items():
        module = model.get_submodule(name)
        if hasattr(module, "prunekit_apply_kept"):
            module.prunekit_apply_kept(kept)  # modules that rebuild more than a count
        else:
            for attr, positions in kept.items():
                setattr(module, attr, int(len(positions)))
    for (name, attr), value in sizes.items():
        setattr(model.get_submodule(name), attr, value)
    for name in touched_modules:
        _fix_metadata(model.get_submodule(name), graph.module_meta(name))
    return model


def _attribute_updates(model: nn.Module, graph: ChannelGraph, removed: set[int]):
    """Kept positions of count attributes (per module), and new values of size attributes
    that follow channels made elsewhere (a split's sections, a functional conv's groups)."""
    kept_by_module: dict[str, dict[str, np.ndarray]] = defaultdict(dict)
    sizes: dict[tuple[str, str], object] = {}
    for attr, roots in graph.attribute_members():
        keep = kept_positions(roots, removed)
        if attr.source:
            kept_by_module[attr.module][attr.attr] = keep
            continue
        old = getattr(model.get_submodule(attr.module), attr.attr)
        if attr.parts:
            bounds = np.cumsum((0,) + tuple(attr.parts))
            counts = [int(((keep >= lo) & (keep < hi)).sum())
                      for lo, hi in zip(bounds[:-1], bounds[1:])]
            value = tuple(counts) if isinstance(old, tuple) else counts
        else:
            counts = [int(len(keep))]
            value = counts[0]
        if 0 in counts:
            where = f"'{attr.module}.{attr.attr}'" if attr.module else f"'{attr.attr}'"
            raise PlanError(f"the plan keeps no channel of a piece sized by {where} "
                            f"(it would become {value}); keep at least one channel of each")
        sizes[(attr.module, attr.attr)] = value
    return kept_by_module, sizes


def _sliced(model: nn.Module, name: str, cuts) -> torch.Tensor:
    data = tensor_by_name(model, name).detach()
    seen_dims = {}
    # Plain dims first: a grouped input dimension is cut per block of the *kept* output rows.
    for dim, keep, blocks in sorted(cuts, key=lambda c: c[2] > 1):
        if dim in seen_dims:
            if not np.array_equal(seen_dims[dim], keep):
                raise RuntimeError(f"inconsistent channel selections for {name} dim {dim}")
            continue
        seen_dims[dim] = keep
        index = torch.as_tensor(keep, dtype=torch.long, device=data.device)
        data = _cut_blocks(data, dim, keep, blocks) if blocks > 1 else data.index_select(dim, index)
    return data.clone()


def tensor_by_name(model: nn.Module, name: str) -> torch.Tensor:
    """The parameter or buffer called ``name`` (dotted path) of ``model``."""
    owner, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(owner) if owner else model, attr)


def _replace_tensor(model: nn.Module, name: str, data: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    old = getattr(owner, attr)
    if isinstance(old, nn.Parameter):
        setattr(owner, attr, nn.Parameter(data, requires_grad=old.requires_grad))
    else:
        owner._buffers[attr] = data


def _cut_blocks(weight: torch.Tensor, dim: int, keep: np.ndarray, blocks: int) -> torch.Tensor:
    """Input columns of a grouped conv: block b's rows read input channels of block b only."""
    cols_per_block = weight.shape[dim]  # in_channels // groups, before the cut
    rows_per_block = weight.shape[0] // blocks
    parts = []
    for b in range(blocks):
        rows = weight[b * rows_per_block:(b + 1) * rows_per_block]
        mine = keep[(keep >= b * cols_per_block) & (keep < (b + 1) * cols_per_block)]
        index = torch.as_tensor(mine - b * cols_per_block, dtype=torch.long, device=weight.device)
        parts.append(rows.index_select(dim, index))
    widths = {p.shape[dim] for p in parts}
    if len(widths) != 1:
        raise RuntimeError(f"grouped conv blocks keep different channel counts: {sorted(widths)}")
    return torch.cat(parts, dim=0)


def _fix_metadata(module: nn.Module, meta: dict) -> None:
    """Make a module's bookkeeping attributes agree with its new tensor shapes."""
    if isinstance(module, nn.modules.conv._ConvNd):
        w = module.weight
        module.out_channels = w.shape[0]
        if meta.get("kind") == "depthwise":
            module.groups = w.shape[0] // meta.get("multiplier", 1)
            module.in_channels = module.groups
        else:
            module.in_channels = w.shape[1] * module.groups
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.modules.batchnorm._NormBase):
        ref = module.weight if module.weight is not None else module.running_mean
        module.num_features = ref.shape[0]
    elif isinstance(module, nn.GroupNorm):
        module.num_channels = module.weight.shape[0]
    elif isinstance(module, nn.LayerNorm) and module.weight is not None:
        module.normalized_shape = (module.weight.shape[0],)
    elif isinstance(module, nn.PReLU):
        module.num_parameters = module.weight.shape[0]


class ModelSnapshot:
    """What a pruning can change on a model, taken before it starts, to put back on failure.

    Surgery replaces tensors and modules rather than writing into them, so holding on to the
    original objects restores them; buffers are also copied because a forward pass in
    training mode (a criterion's calibration) updates them in place.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.modules = []
        for module in model.modules():
            state = {key: (value, _contents(value)) for key, value in vars(module).items()}
            self.modules.append((module, state))
        self.buffers = [(b, b.detach().clone()) for b in model.buffers()]
        self.params = [(name, p, p._version) for name, p in model.named_parameters()]

    def restore(self) -> list[str]:
        """Put everything back; returns the parameters that were changed in place (their
        old values are not kept, so they could not be restored)."""
        for module, state in self.modules:
            for key in set(vars(module)) - set(state):
                del module.__dict__[key]
            for key, (value, contents) in state.items():
                if contents is not None:
                    _refill(value, contents)
                module.__dict__[key] = value
        with torch.no_grad():
            for buffer, saved in self.buffers:
                if not torch.equal(buffer, saved):
                    buffer.copy_(saved)
        return [name for name, p, version in self.params if p._version != version]


def _contents(value):
    """A copy of a container attribute's entries (parameter/module tables, lists such as a
    split's sections), so a change made in place can be undone."""
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, (list, set)):
        return type(value)(value) if type(value) in (list, set) else None
    return None


def _refill(container, contents) -> None:
    if isinstance(container, dict):
        container.clear()
        container.update(contents)
    elif isinstance(container, list):
        container[:] = contents
    elif isinstance(container, set):
        container.clear()
        container.update(contents)
