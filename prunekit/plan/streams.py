"""Residual streams: channel groups written by several producers through additions (the stem
and every block's last convolution of a ResNet stage). They are read by every later block of
their stage, so each of their channels costs more accuracy than an inner channel; the papers
prune them less or not at all (CHIP's strings spare them, methods.md 1.3). ``stream_scale``
multiplies their removal ratio: 0 keeps them whole, 1 prunes them like every other group."""
from __future__ import annotations

from typing import Mapping

from ..graph import ChannelGraph, ChannelGroup

__all__ = ["is_stream", "scaled_ratios", "stream_groups"]


def is_stream(group: ChannelGroup) -> bool:
    """Whether several modules produce this group's channels (their outputs are added)."""
    return len({member.module for member, _ in group.producers()}) > 1


def stream_groups(graph: ChannelGraph) -> list[str]:
    """The names of the prunable residual-stream groups, in graph order."""
    return [g.name for g in graph.prunable_groups() if is_stream(g)]


def scaled_ratios(graph: ChannelGraph, ratios: Mapping[str, float],
                  stream_scale: float) -> dict[str, float]:
    """``ratios`` (per group name) with the streams' ratios multiplied by ``stream_scale``."""
    streams = set(stream_groups(graph))
    return {name: (r * stream_scale if name in streams else r) for name, r in ratios.items()}
