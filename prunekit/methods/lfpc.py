"""LFPC: Learning Filter Pruning Criteria (He, Ding, Liu, Zhu, Zhang, Yang, CVPR 2020).

LFPC learns, for every prunable layer, *which* criterion picks the filters to prune (the rate
is fixed per layer), then trains with soft filter pruning using those per-layer criteria and
removes the zeroed filters. The paper's text and code were not available (see
``shared/research/lfpc.md``); this module implements the reconstruction documented there, and
every unverified choice is an option with the reconstruction's default:

* Criteria space ``criteria = ("l1", "l2", "fpgm")`` (any data-free prunekit criterion works).
* Differentiable criteria sampler (:class:`CriteriaSampler`): per prunable group ``g`` logits
  ``alpha_g`` (init N(0, 0.01)) and a Gumbel-softmax sample
  ``s_g = softmax((log softmax(alpha_g) + o) / tau)``, ``o ~ Gumbel(0, 1)`` (lfpc.md R1), soft
  by default, straight-through one-hot with ``hard=True``. The temperature anneals linearly
  from ``tau_max = 5`` to ``tau_min = 0.1`` over the search (the TAS / re-implementation
  convention).
* Criteria forward (lfpc.md R2): every group's feature maps (after its normalisation layer, or
  the producer's output where no norm follows) are multiplied by ``sum_k s_gk * M_gk``, where
  ``M_gk`` is the 0/1 keep-mask criterion ``k`` selects at the group's rate on the *current*
  weights. All groups are sampled in the same forward, so the loss sees every choice at once.
  Masking the output after BN equals removing the filter (BN's shift cannot keep it alive);
  ``mask_position="before_bn"`` masks the conv output as the re-implementation does
  (:mod:`~prunekit.methods.lfpc_sampler`).
* Criteria backward: on every training step the weights take a step on a training batch (the
  sample detached), then the logits take an Adam step (lr 1e-4, betas (0.5, 0.999), wd 1e-3) on
  the loss of a batch of a held-out *validation* split (never the test set), the weights
  fixed; ``train_weights=False`` freezes the weights and only optimises the logits;
  ``search_split="half"`` cuts the train split 50/50 instead (:mod:`.lfpc_split`).
* After the search each group takes its most likely criterion (``argmax alpha_g``), and the
  network is trained with SFP (:class:`prunekit.methods.SoftPruning`) using
  :class:`PerGroupCriterion`, then pruned physically.

By default groups, not layers, carry the choice (``sampler_scope="group"``): prunekit prunes
coupled channels (e.g. a residual stream) with one index set, so a coupled group is one "layer"
of the paper. ``sampler_scope="conv"`` gives every conv its own row, as the re-implementation
does, and a documented vote turns the convs' choices into one per group
(:func:`~prunekit.methods.lfpc_sampler.combine_conv_choices`). Groups that lose no channel are
left out of the sampler (every criterion keeps all of their channels). The target is a MACs
reduction or ratios, or ``conv_rate``: every conv at one rate as in SFP, with the papers' FLOPs
count reported next to the physical MACs (:mod:`~prunekit.methods.lfpc_rate`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..criteria import PerGroupCriterion, get_criterion
from ..errors import ConfigError
from ..files import atomic_write
from ..graph import ChannelGraph, build_graph
from ..train import DivergenceError, TrainConfig, fit
from ..utils import as_tuple, first_output
from .lfpc_rate import paper_flops, sfp_rate_counts
from .lfpc_sampler import CriteriaSampler, MaskSites, combine_conv_choices, linear_temperature
from .lfpc_split import search_sets
from .soft import SoftPruning

__all__ = ["CriteriaSampler", "CriteriaSearch", "PerGroupCriterion", "lfpc_prune",
           "linear_temperature"]


class CriteriaSearch:
    """The LFPC criteria search as a :func:`prunekit.train.fit` hook.

    ``keep``: channels kept per group (e.g. :attr:`SoftPruning.target_keep`); ``val_set``: the
    held-out split whose loss trains the sampler; ``steps``: total search steps (for the
    temperature schedule; ``fit``'s epochs x steps per epoch). Lifecycle inside ``fit``: the
    masks are computed from the current weights at every epoch start and every ``mask_every``
    steps; each training forward uses a fresh detached sample; ``after_step`` takes one
    sampler step on a validation batch. In eval mode (fit's validation) every group uses its
    most likely criterion, so the val accuracy ``fit`` logs is that of the currently chosen
    pruned network (with ``sampler_scope="conv"``: every conv its own, a masked network that
    removal cannot build; the history's ``choices`` are then per conv). ``sampler_scope`` and
    ``mask_position``: :mod:`~prunekit.methods.lfpc_sampler`. Call :meth:`remove` when done.
    """

    def __init__(self, model: nn.Module, graph: ChannelGraph, keep: dict[str, int], val_set, *,
                 criteria: Sequence[str] = ("l1", "l2", "fpgm"), steps: int,
                 tau_max: float = 5.0, tau_min: float = 0.1, hard: bool = False,
                 alpha_lr: float = 1e-4, alpha_betas: tuple[float, float] = (0.5, 0.999),
                 alpha_weight_decay: float = 1e-3, init_std: float = 0.01, batch_size: int = 128,
                 mask_every: int = 1, sampler_scope: str = "group",
                 mask_position: str = "after_bn", seed: int = 0):
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps!r}")
        if mask_every < 1:
            raise ValueError(f"mask_every must be >= 1, got {mask_every!r}")
        if not 0 < tau_min <= tau_max:
            raise ValueError(f"need 0 < tau_min <= tau_max, got {tau_min!r}, {tau_max!r}")
        self.model, self.graph, self.val_set = model, graph, val_set
        self.keep = {name: int(k) for name, k in keep.items()
                     if int(k) < graph.by_name[name].size}
        self.criteria = [get_criterion(c) for c in criteria]
        for crit in self.criteria:
            if getattr(crit, "needs_data", False):
                raise ValueError(f"criterion '{crit.name}' needs calibration data; LFPC's "
                                 "criteria are recomputed from the weights at every step")
        self.sites = MaskSites(graph, self.keep, scope=sampler_scope, position=mask_position)
        self.sampler = CriteriaSampler(self.sites.rows, [c.name for c in self.criteria],
                                       init_std=init_std, hard=hard, seed=seed)
        self.optimizer = torch.optim.Adam(self.sampler.parameters(), lr=alpha_lr,
                                          betas=alpha_betas, weight_decay=alpha_weight_decay)
        self.steps, self.tau_max, self.tau_min = int(steps), float(tau_max), float(tau_min)
        self.batch_size, self.mask_every, self.seed = int(batch_size), int(mask_every), int(seed)
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self._outputs = self.sites.sites
        self._train_weights: list[torch.Tensor | None] = [None] * len(self._outputs)
        self._val_batches = None
        self._sampling = False  # True while sampler_step runs (also with a frozen eval model)
        self._handles = [model.get_submodule(o.module).register_forward_hook(self._hook(i))
                         for i, o in enumerate(self._outputs)]

    # ------------------------------------------------------------------ masks and weights
    @torch.no_grad()
    def refresh_masks(self) -> None:
        """Every criterion's keep-mask at every group's count, from the current weights (per
        group, or per conv with ``sampler_scope="conv"``)."""
        self.sites.refresh(self.criteria, self.model)

    def _channel_weights(self, sample: torch.Tensor, out) -> torch.Tensor:
        return self.sites.channel_weights(sample, out)

    def _set_sample(self, sample: torch.Tensor) -> None:
        self._train_weights = [self._channel_weights(sample, o) for o in self._outputs]

    def _hook(self, index: int):
        def multiply(module, inputs, output):
            out = self._outputs[index]
            if out.keep is None:
                return output
            if module.training or self._sampling:
                weights = self._train_weights[index]
            else:
                weights = self._channel_weights(self.sampler.most_likely(), out)
            shape = [1] * output.dim()
            shape[out.dim] = -1
            return output * weights.to(output.dtype).view(shape)
        return multiply

    def remove(self) -> None:
        """Detach the forward hooks (the model computes its unmasked output again)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ------------------------------------------------------------------ one sampler step
    def _next_val_batch(self, device):
        if self._val_batches is None:
            generator = torch.Generator().manual_seed(self.seed + 7919 * self.step)
            loader = torch.utils.data.DataLoader(self.val_set, batch_size=self.batch_size,
                                                 shuffle=True, generator=generator,
                                                 drop_last=len(self.val_set) > self.batch_size)
            self._val_batches = iter(loader)
        try:
            inputs, targets = next(self._val_batches)
        except StopIteration:
            self._val_batches = None
            return self._next_val_batch(device)
        return inputs.to(device), targets.to(device)

    def sampler_step(self) -> float:
        """One Adam step of the logits on the loss of a validation batch (weights fixed)."""
        device = next(self.model.parameters()).device
        self.sampler.to(device)
        self.sampler.tau = linear_temperature(self.step / self.steps, self.tau_max, self.tau_min)
        inputs, targets = self._next_val_batch(device)
        self._set_sample(self.sampler.sample())
        self._sampling = True
        try:
            loss = F.cross_entropy(first_output(self.model(inputs)), targets)
        finally:
            self._sampling = False
        (grad,) = torch.autograd.grad(loss, self.sampler.alpha)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(grad)
            grad /= torch.distributed.get_world_size()
        # After the all-reduce every rank holds the same gradient, so all stop together; the
        # logits are not model parameters, so fit's own checks never see them.
        if not bool(torch.isfinite(grad).all()):
            raise DivergenceError(f"LFPC's criterion search diverged at sampler step "
                                  f"{self.step + 1}: the validation loss is {float(loss):.4g} "
                                  "and the logits' gradient is not finite; lower "
                                  "--finetune-lr or check the data")
        self.sampler.alpha.grad = grad
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self._set_sample(self.sampler.sample().detach())
        return float(loss.detach())

    # ------------------------------------------------------------------ fit hook protocol
    def on_train_start(self, model: nn.Module, optimizer) -> None:
        self.model = model

    def on_epoch_start(self, epoch: int) -> None:
        self.refresh_masks()
        self._set_sample(self.sampler.sample().detach())

    def after_step(self, step: int) -> None:
        if self.step % self.mask_every == 0:
            self.refresh_masks()
        loss = self.sampler_step()
        if self.step % 50 == 0 or self.step == 1:
            self.history.append({"step": self.step, "tau": self.sampler.tau, "val_loss": loss})

    def on_epoch_end(self, epoch: int) -> None:
        self.history.append({"epoch": epoch, "step": self.step, "tau": self.sampler.tau,
                             "choices": self.sampler.choices()})

    def state_dict(self) -> dict:
        return {"alpha": self.sampler.alpha.detach().cpu().clone(), "step": self.step,
                "optimizer": self.optimizer.state_dict(), "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.sampler.alpha.copy_(state["alpha"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.history = int(state["step"]), list(state["history"])
        self._val_batches = None

    def group_choices(self) -> dict[str, str]:
        """The criterion of every sampled group: its row's argmax, or with
        ``sampler_scope="conv"`` the probability-averaged vote of its convs
        (:func:`~prunekit.methods.lfpc_sampler.combine_conv_choices`)."""
        return {r["group"]: r["choice"] for r in self.report()}

    def report(self) -> list[dict[str, Any]]:
        """Per group: size, kept channels, each criterion's probability, the choice (with
        ``sampler_scope="conv"``: the mean over its convs, and ``convs``: each conv's choice)."""
        probs = self.sampler.probabilities().cpu()
        names = self.sampler.criteria
        if self.sites.scope == "conv":
            combined = combine_conv_choices(self.sites.row_groups, probs, names)
        else:
            combined = {g: {"probabilities": {c: float(v) for c, v in zip(names, probs[i])}}
                        for i, g in enumerate(self.sampler.groups)}
        rows = []
        for name, entry in combined.items():
            p = entry["probabilities"]
            rows.append({"group": name, "size": self.graph.by_name[name].size,
                         "kept": self.keep[name], "probabilities": p,
                         "choice": entry.get("choice", max(p, key=p.get)),
                         **({"convs": entry["convs"]} if "convs" in entry else {})})
        return rows


def lfpc_prune(model: nn.Module, train_set, val_set, search_config, sfp_config, out_dir, *,
               example_inputs, macs_reduction: float | None = None, ratio: float | None = None,
               ratios: dict[str, float] | None = None,
               criteria: Sequence[str] = ("l1", "l2", "fpgm"), train_weights: bool = True,
               mask_grads: bool = False, ignore: Sequence = (), leaf_modules: Sequence = (),
               resume: bool = True, graph: ChannelGraph | None = None, distill=None,
               conv_rate: float | None = None, conv_rate_rounding: str = "removed",
               search_split: str = "val", **search_options):
    """LFPC end to end: criteria search, SFP with the learned per-group criteria, removal.

    ``search_config`` / ``sfp_config``: :class:`prunekit.train.TrainConfig` (or dicts) of the
    two phases; the search's epochs x steps give the temperature schedule. ``val_set`` is the
    held-out split that trains the sampler (and picks nothing else). ``search_options`` go to
    :class:`CriteriaSearch` (``tau_max``, ``tau_min``, ``hard``, ``alpha_lr``, ...). The
    target (``macs_reduction``, or ``ratio`` / ``ratios``) fixes the channels kept per group
    once, from the pretrained weights, and both phases use those counts. Each phase resumes from
    its ``last.pt`` under ``out_dir``. With ``train_weights=False`` the search only optimises
    the logits (model in eval mode, ``search_config.epochs`` passes over ``val_set``).
    ``graph``: the model's ChannelGraph if already built (same ``ignore``); else it is traced.
    ``conv_rate``: the SFP-style target instead (every convolution at that rate, rounded by
    ``conv_rate_rounding``; :mod:`~prunekit.methods.lfpc_rate`), exclusive with the others.
    ``search_split``: ``"val"`` or ``"half"`` (:mod:`~prunekit.methods.lfpc_split`).

    Returns ``(model, PruningResult, info)``; ``info`` holds ``choices`` (one row per group:
    size, kept, probabilities, choice; per-conv choices with ``sampler_scope="conv"``), the
    search history, both phases' fit summaries and ``flops``: the SFP/LFPC papers' FLOPs
    reduction (at the kept counts, and at ``conv_rate`` itself) next to the physical MACs'.
    """
    given = [k for k, v in (("macs_reduction", macs_reduction), ("ratio", ratio),
                            ("ratios", ratios)) if v is not None]
    if conv_rate is not None and given:
        raise ConfigError(f"LFPC's conv_rate is a target of its own (every conv at one rate); "
                          f"drop the {', '.join(given)} target or conv_rate")
    out_dir = Path(out_dir)
    search_config = _config(search_config, TrainConfig)
    sfp_config = _config(sfp_config, TrainConfig)
    example_inputs = as_tuple(example_inputs)
    if example_inputs is None:
        raise ValueError("lfpc_prune needs example_inputs (e.g. torch.randn(1, 3, 32, 32))")
    if graph is None:
        graph = build_graph(model, example_inputs, leaf_modules=leaf_modules, ignore=ignore)
    if conv_rate is not None:
        counts = sfp_rate_counts(graph, model, conv_rate, conv_rate_rounding)
    else:
        counts = SoftPruning(graph, model=model, example_inputs=example_inputs, criterion="l2",
                             ratio=ratio, ratios=ratios,
                             macs_reduction=macs_reduction).target_keep
    flops = {"paper": paper_flops(graph, model, example_inputs, counts=counts)}
    if conv_rate is not None:
        flops["paper_at_rate"] = paper_flops(graph, model, example_inputs, rate=conv_rate)
    search_train, search_val = search_sets(train_set, val_set, search_split, search_config.seed)
    if train_weights:
        steps_per_epoch = -(-len(search_train) // search_config.batch_size)
        if search_config.max_steps_per_epoch:
            steps_per_epoch = min(steps_per_epoch, search_config.max_steps_per_epoch)
    else:
        steps_per_epoch = -(-len(search_val) // search_options.get("batch_size", 128))
    search = CriteriaSearch(model, graph, counts, search_val, criteria=criteria,
                            steps=search_config.epochs * steps_per_epoch,
                            seed=search_config.seed, **search_options)
    try:
        if train_weights:
            search_summary = fit(model, search_train, val_set, search_config, out_dir / "search",
                                 hooks=[search], resume=resume)
        else:
            search_summary = _search_frozen(model, search, search_config, out_dir / "search",
                                            resume)
    finally:
        search.remove()
    choices = search.group_choices()
    hook = SoftPruning(graph, model=model, example_inputs=example_inputs,
                       criterion=PerGroupCriterion(choices, default="l2"), keep=counts,
                       mask_grads=mask_grads, ignore=ignore, leaf_modules=leaf_modules)
    sfp_summary = fit(model, train_set, val_set, sfp_config, out_dir / "sfp", hooks=[hook],
                      resume=resume, distill=distill)  # the search phase learns alone
    result = hook.finalize(model)
    result.criterion = "lfpc"
    flops["physical_macs_reduction"] = result.macs_reduction
    info = {"choices": search.report(), "search_history": search.history,
            "search": search_summary, "sfp": sfp_summary, "flops": flops,
            "criteria": [c.name for c in search.criteria]}
    return model, result, info


def _config(config, cls):
    return config if isinstance(config, cls) else cls.from_dict(config)


def _search_frozen(model: nn.Module, search: CriteriaSearch, config, out_dir, resume: bool):
    """Sampler-only search: the weights stay fixed (eval mode); resumable per pass."""
    path = Path(out_dir) / "sampler.pt"
    start = 0
    if resume and path.exists():
        state = torch.load(path, map_location="cpu", weights_only=True)
        search.load_state_dict(state["search"])
        start = int(state["epoch"]) + 1
    model.eval()
    per_epoch = search.steps // max(config.epochs, 1)
    for epoch in range(start, config.epochs):
        search.refresh_masks()
        for _ in tqdm(range(per_epoch), desc=f"criteria search {epoch + 1}/{config.epochs}",
                      disable=not config.progress, leave=False):
            if search.step % search.mask_every == 0:
                search.refresh_masks()
            search.sampler_step()
        search.on_epoch_end(epoch)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {"search": search.state_dict(), "epoch": epoch}
        atomic_write(path, lambda stream: torch.save(state, stream))
    return {"status": "completed", "epochs_run": config.epochs - start, "steps": search.step}
