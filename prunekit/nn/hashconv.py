"""HASTE's hashing convolution: merge the input channels that collide under locality-sensitive
hashing, per spatial patch, so each patch's convolution runs on fewer channels.

Paper: L. Meiner, J. Mehnert, A. P. Condurache, "HASTE: Instant Complexity Reduction in CNNs
using Locality-Sensitive Hashing", arXiv:2309.17211 (v2: "Data-Free Dynamic Compression of
CNNs for Tractable Efficiency", VISAPP 2025). No code was published and the method section
could not be read in full; everything below is **reconstructed** from the abstract, the ICLR
reviews and a third-party description (research notes ``related_methods_1.md`` §1). Each
guess is an option with a default, named after the notes' list §1 (a)-(f):

For each image and each square output tile of ``patch x patch`` positions (tiles at the
bottom/right edge are cut to the output):

1. The tile reads an input window of ``(patch-1)*stride + dilation*(k-1) + 1`` pixels per
   side (the receptive field, zero padding included). Every input channel c gives one vector
   ``x_c`` (a). ``halo="include"`` (default) hashes the whole window; ``"exclude"`` hashes only
   the ``patch x patch`` pixels under the kernel centres of the tile's outputs.
2. Centring (b): ``centring="patch_mean"`` (default) subtracts the mean of the tile's channel
   vectors, ``"vector_mean"`` each vector's own mean, ``"none"`` nothing.
3. Hash (step 3 of the notes, eq. ``h(x) = (1[r_1.x > 0], ..., 1[r_L.x > 0])``): ``L =
   hyperplanes`` sparse ternary random hyperplanes ``r_l`` with entries 0 (probability
   ``sparsity``, default 2/3 as Achlioptas' very sparse projection) or +-1 (c), drawn once from
   ``seed`` and kept as the buffer ``hyperplanes`` [d, L]. Their scale does not change a sign.
4. Channels with equal codes form a bucket B. The tile's convolution runs on the bucket means
   of the *uncentred* windows with the bucket-summed input-channel slices of the weight:
   ``sum_{c in B} W[:, c] * x_c ~ (sum_{c in B} W[:, c]) * mean_{c in B} x_c`` (step 4),
   exact when the channels of every bucket are identical on the window. With ``halo=
   "include"`` a bucket of identical hashed vectors is therefore exact, and when every bucket
   is a singleton the output equals the dense convolution (stride, padding, dilation
   included), up to summation order.

Reference path (pure PyTorch, vectorised): ``unfold`` the windows, one matmul with the
hyperplanes, codes -> int64 keys, a per-tile sort gives bucket ids, ``scatter_add`` builds the
bucket means and weight sums, and one batched matmul per tile (padded to the largest bucket
count of the batch; the padding carries zero weight) computes the outputs. It is slower than
the dense oneDNN convolution on CPU: the savings are counted operations, not time.

MACs actually spent (f), recorded on every forward in ``macs`` (running sums over images,
``reset_macs()`` clears them); each add or multiply of the overhead counts as one MAC, which
overstates it (a MAC is a multiply *and* an add):

* ``conv``: ``out_channels * k_h * k_w * K_t`` per valid output position of tile t (K_t its
  bucket count);
* ``hash``: ``C * nnz(hyperplanes)`` adds per tile (about ``C * d * L * (1 - s)``: the
  projections are +-1, so they need no multiplication);
* ``centre``: ``2 * C * d`` per tile (the mean and the subtraction; 0 with ``"none"``);
* ``merge``: ``(C - K_t) * d_w`` adds for the bucket sums of the window (``d_w`` its pixels),
  ``d_w`` multiplies per bucket of more than one channel (the 1/|B| scale), and ``(C - K_t) *
  out_channels * k_h * k_w`` adds for the weight sums. Sorting and bucketing (comparisons,
  no arithmetic) are not counted. ``dense`` is the dense conv's MACs on the same inputs.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .registry import flag, integer, integers, one_of, real, register_replacement

__all__ = ["CENTRINGS", "HALOS", "HashConv2d", "MAC_PARTS"]

CENTRINGS = ("patch_mean", "vector_mean", "none")
HALOS = ("include", "exclude")
MAC_PARTS = ("conv", "hash", "centre", "merge")
MAX_HYPERPLANES = 62   # codes become one int64 key
_MAX_TILES = 4096      # tiles per chunk of the reference path (bounds its memory)


def _pair(value, what: str) -> tuple[int, int]:
    value = (value, value) if isinstance(value, int) else tuple(value)
    if len(value) != 2:
        raise ConfigError(f"{what} must be an int or a pair, got {value!r}")
    return value  # type: ignore[return-value]


def _pads(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """Zero padding as (left, right, top, bottom)."""
    if conv.padding == "valid":
        return (0, 0, 0, 0)
    if conv.padding == "same":
        (kh, kw), (dh, dw) = conv.kernel_size, conv.dilation
        th, tw = dh * (kh - 1), dw * (kw - 1)
        return (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    ph, pw = conv.padding
    return (pw, pw, ph, ph)


def check_options(hyperplanes, sparsity, patch, centring, halo) -> None:
    """ConfigError for options HashConv2d cannot use (before any module is built)."""
    if isinstance(hyperplanes, bool) or not isinstance(hyperplanes, int) or \
            not 1 <= hyperplanes <= MAX_HYPERPLANES:
        raise ConfigError(f"hyperplanes (L) must be a whole number in [1, {MAX_HYPERPLANES}], "
                          f"got {hyperplanes!r}; smaller L merges more channels")
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or \
            not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"sparsity (the zero fraction of the hyperplanes) must be in [0, 1), "
                          f"got {sparsity!r}")
    if isinstance(patch, bool) or not isinstance(patch, int) or patch < 1:
        raise ConfigError(f"patch (the tile side, in output positions) must be a whole number "
                          f">= 1, got {patch!r}")
    if centring not in CENTRINGS:
        raise ConfigError(f"centring must be one of {', '.join(CENTRINGS)}, got {centring!r}")
    if halo not in HALOS:
        raise ConfigError(f"halo must be one of {', '.join(HALOS)}, got {halo!r}")


def ternary_hyperplanes(dim: int, count: int, sparsity: float, seed: int) -> torch.Tensor:
    """``[dim, count]`` entries 0 with probability ``sparsity``, else -1 or +1 equally."""
    g = torch.Generator().manual_seed(int(seed))
    zero = torch.rand(dim, count, generator=g) < sparsity
    sign = torch.randint(0, 2, (dim, count), generator=g).float() * 2 - 1
    return torch.where(zero, torch.zeros(()), sign)


class HashConv2d(nn.Module):
    """A ``Conv2d`` (groups 1, zero padding) whose input channels are merged per tile by LSH.

    ``HashConv2d(conv, hyperplanes=L, sparsity=2/3, patch=4, seed=0, centring="patch_mean",
    halo="include")`` copies ``conv``'s weight and bias (the defaults are reconstructed, module
    docstring and notes §1 (a)-(f)). ``macs`` holds running sums since ``reset_macs()``: the
    MACs spent per part (:data:`MAC_PARTS`), the dense conv's (``dense``), ``images``, and
    ``channels`` / ``buckets`` (tiles x C and the sum of K_t, for the mean K/C);
    ``last_buckets`` holds the bucket ids of the last forward's tiles [N * tiles, C].
    """

    prunekit_unexportable = ("HashConv2d merges channels per input (its shapes depend on the "
                             "data), so it cannot be exported as a static graph. Export the "
                             "dense model instead (before prunekit.nn.hash_convolutions, or "
                             "after prunekit.nn.dense_convolutions)")

    def __init__(self, conv: nn.Conv2d, *, hyperplanes: int = 16, sparsity: float = 2 / 3,
                 patch: int = 4, seed: int = 0, centring: str = "patch_mean",
                 halo: str = "include"):
        super().__init__()
        if type(conv) is not nn.Conv2d:
            raise ConfigError(f"HashConv2d replaces an nn.Conv2d, not a {type(conv).__name__}")
        if conv.groups != 1:
            raise ConfigError(f"HashConv2d merges input channels of a dense convolution; this "
                              f"one has groups={conv.groups} (grouped or depthwise): leave it "
                              "dense")
        if conv.padding_mode != "zeros":
            raise ConfigError(f"HashConv2d supports zero padding only, not padding_mode="
                              f"{conv.padding_mode!r}")
        check_options(hyperplanes, sparsity, patch, centring, halo)
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride = tuple(conv.kernel_size), tuple(conv.stride)
        self.dilation = tuple(conv.dilation)
        self.padding = conv.padding if isinstance(conv.padding, str) else tuple(conv.padding)
        self.pads = _pads(conv)
        self.num_hyperplanes, self.sparsity, self.patch = hyperplanes, float(sparsity), patch
        self.seed, self.centring, self.halo = int(seed), centring, halo
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        self.window = ((patch - 1) * sh + dh * (kh - 1) + 1, (patch - 1) * sw + dw * (kw - 1) + 1)
        hashed = self.window[0] * self.window[1] if halo == "include" else patch * patch
        self.weight = nn.Parameter(conv.weight.detach().clone())
        self.bias = nn.Parameter(conv.bias.detach().clone()) if conv.bias is not None else None
        planes = ternary_hyperplanes(hashed, hyperplanes, self.sparsity, self.seed)
        self.register_buffer("hyperplanes", planes.to(conv.weight.device, conv.weight.dtype))
        self.reset_macs()
        self.last_buckets: torch.Tensor | None = None

    # ------------------------------------------------------------------ save / load
    def prunekit_init(self) -> dict:
        """Constructor arguments as JSON (for :func:`prunekit.io.save`)."""
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
                "dilation": list(self.dilation), "bias": self.bias is not None,
                "hyperplanes": self.num_hyperplanes, "sparsity": self.sparsity,
                "patch": self.patch, "seed": self.seed, "centring": self.centring,
                "halo": self.halo}

    @classmethod
    def prunekit_build(cls, original: nn.Module, init: dict) -> "HashConv2d":
        """A module of the saved shape (:func:`prunekit.io.load` fills the tensors)."""
        conv = nn.Conv2d(init["in_channels"], init["out_channels"], init["kernel_size"],
                         stride=init["stride"], padding=init["padding"],
                         dilation=init["dilation"], bias=init["bias"], device="meta")
        conv.weight = nn.Parameter(torch.empty(conv.weight.shape))
        if conv.bias is not None:
            conv.bias = nn.Parameter(torch.empty(conv.bias.shape))
        return cls(conv, hyperplanes=init["hyperplanes"], sparsity=init["sparsity"],
                   patch=init["patch"], seed=init["seed"], centring=init["centring"],
                   halo=init["halo"])

    def dense(self) -> nn.Conv2d:
        """The ``nn.Conv2d`` this module hashes (a copy of its weights)."""
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                         self.padding, self.dilation, bias=self.bias is not None,
                         device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(self.weight)
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    # ------------------------------------------------------------------ MACs
    def reset_macs(self) -> None:
        """Zero the running sums in ``macs`` (parts, ``dense``, ``images``, ``channels``,
        ``buckets``)."""
        self.macs = dict.fromkeys((*MAC_PARTS, "dense", "images", "channels", "buckets"), 0)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"L={self.num_hyperplanes}, sparsity={self.sparsity:.3g}, patch={self.patch}, "
                f"centring={self.centring}, halo={self.halo}")

    # ------------------------------------------------------------------ forward
    def _hashed(self, win: torch.Tensor) -> torch.Tensor:
        """The vectors the hash sees: [tiles, C, d] from the windows [tiles, C, wh, ww]."""
        if self.halo == "include":
            return win.flatten(2)
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        rows = dh * (kh // 2) + sh * torch.arange(self.patch, device=win.device)
        cols = dw * (kw // 2) + sw * torch.arange(self.patch, device=win.device)
        return win[:, :, rows][:, :, :, cols].flatten(2)

    def bucket_ids(self, win: torch.Tensor) -> torch.Tensor:
        """Bucket id of every channel of every tile, [tiles, C]; ids are 0..K_t-1 in the
        order of the codes' integer keys."""
        v = self._hashed(win)
        if self.centring == "patch_mean":
            v = v - v.mean(1, keepdim=True)
        elif self.centring == "vector_mean":
            v = v - v.mean(2, keepdim=True)
        bits = (v @ self.hyperplanes.to(v.dtype)) > 0                       # [T, C, L]
        powers = 2 ** torch.arange(self.num_hyperplanes, device=v.device, dtype=torch.int64)
        keys = (bits.to(torch.int64) * powers).sum(-1)                       # [T, C]
        ordered, order = keys.sort(1)
        new = torch.ones_like(ordered, dtype=torch.int64)
        new[:, 1:] = (ordered[:, 1:] != ordered[:, :-1]).to(torch.int64)
        return torch.empty_like(order).scatter_(1, order, new.cumsum(1) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"HashConv2d expects [N, {self.in_channels}, H, W], got "
                             f"{tuple(x.shape)}")
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        left, right, top, bottom = self.pads
        n, p = x.shape[0], self.patch
        ho = (x.shape[2] + top + bottom - dh * (kh - 1) - 1) // sh + 1
        wo = (x.shape[3] + left + right - dw * (kw - 1) - 1) // sw + 1
        if ho < 1 or wo < 1:
            raise ValueError(f"input {tuple(x.shape)} is smaller than the kernel")
        nh, nw = -(-ho // p), -(-wo // p)
        need_h, need_w = (nh - 1) * p * sh + self.window[0], (nw - 1) * p * sw + self.window[1]
        xp = F.pad(x, (left, right, top, bottom))[:, :, :need_h, :need_w]
        xp = F.pad(xp, (0, need_w - xp.shape[3], 0, need_h - xp.shape[2]))
        c, wh, ww = self.in_channels, *self.window
        win = F.unfold(xp, self.window, stride=(p * sh, p * sw))            # [N, C*wh*ww, T]
        win = win.view(n, c, wh, ww, nh * nw).permute(0, 4, 1, 2, 3).reshape(-1, c, wh, ww)
        valid = torch.minimum(torch.full((nh,), p), ho - p * torch.arange(nh))[:, None] * \
            torch.minimum(torch.full((nw,), p), wo - p * torch.arange(nw))[None]
        valid = valid.flatten().repeat(n).to(x.device)                       # [N*T]
        chunk = max(1, _MAX_TILES // (nh * nw)) * nh * nw
        outs, buckets = [], []
        for start in range(0, win.shape[0], chunk):
            out, ids = self._tiles(win[start:start + chunk], valid[start:start + chunk])
            outs.append(out)
            buckets.append(ids)
        self.last_buckets = torch.cat(buckets)
        out = torch.cat(outs).view(n, nh, nw, self.out_channels, p, p)
        out = out.permute(0, 3, 1, 4, 2, 5).reshape(n, self.out_channels, nh * p, nw * p)
        out = out[:, :, :ho, :wo]
        self.macs["images"] += n
        self.macs["dense"] += n * ho * wo * self.out_channels * c * kh * kw
        return out if self.bias is None else out + self.bias.view(1, -1, 1, 1)

    def _tiles(self, win: torch.Tensor, valid: torch.Tensor):
        """Outputs [tiles, O, P*P] of the windows [tiles, C, wh, ww]; records the MACs."""
        t, c, wh, ww = win.shape
        o, (kh, kw) = self.out_channels, self.kernel_size
        ids = self.bucket_ids(win)                                           # [t, C]
        k = ids.max(1).values + 1                                            # [t]
        kmax = int(k.max())
        counts = torch.zeros(t, kmax, dtype=win.dtype, device=win.device)
        counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=win.dtype))
        flat = win.reshape(t, c, wh * ww)
        means = torch.zeros(t, kmax, wh * ww, dtype=win.dtype, device=win.device)
        means.scatter_add_(1, ids[..., None].expand(t, c, wh * ww), flat)
        means = means / counts.clamp(min=1)[..., None]
        w = self.weight.permute(1, 0, 2, 3).reshape(1, c, o * kh * kw).expand(t, c, -1)
        sums = torch.zeros(t, kmax, o * kh * kw, dtype=w.dtype, device=w.device)
        sums = sums.scatter_add(1, ids[..., None].expand(t, c, o * kh * kw), w)
        sums = sums.view(t, kmax, o, kh * kw).permute(0, 2, 1, 3).reshape(t, o, kmax * kh * kw)
        cols = F.unfold(means.view(t, kmax, wh, ww), self.kernel_size, dilation=self.dilation,
                        stride=self.stride)                                  # [t, K*kk, P*P]
        out = torch.bmm(sums, cols)
        hashed = self.hyperplanes.shape[0]
        merged = (c - k).sum()
        self.macs["conv"] += int((k * valid).sum()) * o * kh * kw
        self.macs["hash"] += t * c * int(self.hyperplanes.count_nonzero())
        self.macs["centre"] += 0 if self.centring == "none" else t * 2 * c * hashed
        self.macs["merge"] += int(merged) * (wh * ww + o * kh * kw) + \
            int((counts > 1).sum()) * wh * ww
        self.macs["channels"] += t * c
        self.macs["buckets"] += int(k.sum())
        return out, ids


def _hash_shapes(init: Mapping) -> dict[str, list[int]]:
    (kh, kw), (sh, sw), (dh, dw) = init["kernel_size"], init["stride"], init["dilation"]
    p = init["patch"]
    side = ((p - 1) * sh + dh * (kh - 1) + 1) * ((p - 1) * sw + dw * (kw - 1) + 1)
    shapes = {"weight": [init["out_channels"], init["in_channels"], kh, kw],
              "hyperplanes": [side if init["halo"] == "include" else p * p,
                              init["hyperplanes"]]}
    if init["bias"]:
        shapes["bias"] = [init["out_channels"]]
    return shapes


def _two(lo: int):
    check = integers(lo)

    def pair(value):
        value = check(value)
        if len(value) != 2:
            raise ValueError(f"must be a list of 2 integers >= {lo}")
        return list(value)
    return pair


def _padding(value):
    if isinstance(value, str):
        return one_of("same", "valid")(value)
    return _two(0)(value)


register_replacement(HashConv2d, init={
    "in_channels": integer(1), "out_channels": integer(1), "kernel_size": _two(1),
    "stride": _two(1), "padding": _padding, "dilation": _two(1), "bias": flag,
    "hyperplanes": integer(1, MAX_HYPERPLANES), "sparsity": real(0.0, 0.999999),
    "patch": integer(1, 1 << 10), "seed": integer(0, (1 << 31) - 1),
    "centring": one_of(*CENTRINGS), "halo": one_of(*HALOS),
}, shapes=_hash_shapes)
