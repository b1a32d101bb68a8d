"""Masking instead of removing: the reference that physical removal must reproduce exactly."""
from __future__ import annotations

import torch
from torch import nn

from .graph import ChannelGraph, kept_positions
from .surgery import tensor_by_name


@torch.no_grad()
def zero_removed_channels(model: nn.Module, graph: ChannelGraph,
                          plan: dict[str, list[int]]) -> nn.Module:
    """Make every channel the plan removes contribute nothing, keeping all shapes.

    Zeroes, at each removed position, the producing weights and biases, the normalisation
    affine parameters (so a BN shift cannot keep the channel alive) and the consuming input
    columns. In eval mode the result computes what the physically pruned model computes,
    except where a normalisation mixes channels (LayerNorm/GroupNorm statistics).
    """
    removed = graph.removed_roots(plan)
    for member, roots in graph.tensor_members():
        keep = kept_positions(roots, removed)
        if len(keep) == len(roots):
            continue
        tensor = tensor_by_name(model, member.tensor)
        drop = sorted(set(range(len(roots))) - set(keep.tolist()))
        if member.blocks > 1:
            _zero_grouped_columns(tensor, member.dim, drop, member.blocks)
        elif member.tensor.endswith(("running_mean", "running_var")):
            continue  # with gamma = beta = 0 the statistics no longer matter
        else:
            tensor.index_fill_(member.dim, torch.as_tensor(drop, device=tensor.device), 0)
    return model


def _zero_grouped_columns(weight, dim, drop, blocks):
    cols = weight.shape[dim]
    rows = weight.shape[0] // blocks
    for p in drop:
        b, j = divmod(p, cols)
        weight[b * rows:(b + 1) * rows].select(dim, j).zero_()
