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
  Masking the output after BN equals removing the filter (BN's shift cannot keep it alive).
* Criteria backward: on every training step the weights take a step on a training batch (the
  sample detached), then the logits take an Adam step (lr 1e-4, betas (0.5, 0.999), wd 1e-3) on
  the loss of a batch of a held-out *validation* split (never the test set), the weights
  fixed; ``train_weights=False`` freezes the weights and only optimises the logits.
* After the search each group takes its most likely criterion (``argmax alpha_g``), and the
  network is trained with SFP (:class:`prunekit.methods.SoftPruning`) using
  :class:`PerGroupCriterion`, then pruned physically.

Groups, not layers, carry the choice: prunekit prunes coupled channels (e.g. a residual stream)
with one index set, so a coupled group is one "layer" of the paper. Groups that lose no channel
are left out of the sampler (every criterion keeps all of their channels).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..criteria import PerGroupCriterion, get_criterion
from ..files import atomic_write
from ..graph import ChannelGraph, build_graph
from ..plan import make_plan
from ..train import DivergenceError, TrainConfig, fit
from ..utils import as_tuple, first_output
from .soft import SoftPruning

__all__ = ["CriteriaSampler", "CriteriaSearch", "PerGroupCriterion", "lfpc_prune",
           "linear_temperature"]


def linear_temperature(progress: float, tau_max: float = 5.0, tau_min: float = 0.1) -> float:
    """Gumbel temperature at ``progress`` in [0, 1] of the search: linear ``tau_max -> tau_min``."""
    progress = min(max(float(progress), 0.0), 1.0)
    return tau_max - (tau_max - tau_min) * progress


class CriteriaSampler(nn.Module):
    """LFPC's differentiable criteria sampler: logits ``alpha`` of shape (groups, criteria).

    :meth:`sample` draws a Gumbel-softmax sample at temperature ``tau`` (lfpc.md R1): soft by
    default, a straight-through one-hot with ``hard=True`` (forward one-hot, backward the soft
    sample's gradient).
    """

    def __init__(self, groups: Sequence[str], criteria: Sequence[str], *, init_std: float = 0.01,
                 hard: bool = False, seed: int = 0):
        super().__init__()
        if not groups:
            raise ValueError("the criteria sampler needs at least one group that loses channels")
        if len(criteria) < 2:
            raise ValueError(f"LFPC chooses among criteria: give at least two, got {list(criteria)}")
        self.groups, self.criteria, self.hard = list(groups), list(criteria), bool(hard)
        generator = torch.Generator().manual_seed(seed)
        self.alpha = nn.Parameter(torch.randn(len(groups), len(criteria), generator=generator)
                                  * init_std)
        self.tau = 5.0

    def probabilities(self) -> torch.Tensor:
        return self.alpha.detach().softmax(-1)

    def sample(self) -> torch.Tensor:
        return F.gumbel_softmax(self.alpha, tau=self.tau, hard=self.hard, dim=-1)

    def most_likely(self) -> torch.Tensor:
        """One-hot of ``argmax alpha`` per group (the choice after the search)."""
        return F.one_hot(self.alpha.detach().argmax(-1), len(self.criteria)).to(self.alpha.dtype)

    def choices(self) -> dict[str, str]:
        index = self.alpha.detach().argmax(-1).tolist()
        return {g: self.criteria[i] for g, i in zip(self.groups, index)}


class _MaskedOutput:
    """Where one group's channels leave a module: forward-hooked, multiplied by the weights."""

    def __init__(self, module: str, dim: int, roots: np.ndarray):
        self.module, self.dim, self.roots = module, dim, roots
        self.group_index: torch.Tensor | None = None  # sampler row per position (G: unsampled)
        self.keep: torch.Tensor | None = None          # (positions, criteria) 0/1


def _masked_outputs(graph: ChannelGraph) -> list[_MaskedOutput]:
    """Every norm layer's output, and every producer's output that no norm of the same channels
    reads: the places where masking a channel is the same as removing its filter."""
    members = graph.tensor_members()
    normalised = {m.input_node for m, _ in members if m.role == "norm"}
    outputs: dict[str, _MaskedOutput] = {}
    for member, roots in members:
        if member.module in outputs or member.blocks > 1:
            continue
        if member.role == "norm" or (member.role == "out" and member.tensor.endswith("weight")
                                     and member.node not in normalised):
            outputs[member.module] = _MaskedOutput(member.module, 1, np.asarray(roots))
    return list(outputs.values())


class CriteriaSearch:
    """The LFPC criteria search as a :func:`prunekit.train.fit` hook.

    ``keep``: channels kept per group (e.g. :attr:`SoftPruning.target_keep`); ``val_set``: the
    held-out split whose loss trains the sampler; ``steps``: total search steps (for the
    temperature schedule; ``fit``'s epochs x steps per epoch). Lifecycle inside ``fit``: the
    masks are computed from the current weights at every epoch start and every ``mask_every``
    steps; each training forward uses a fresh detached sample; ``after_step`` takes one
    sampler step on a validation batch. In eval mode (fit's validation) every group uses its
    most likely criterion, so the val accuracy ``fit`` logs is that of the currently chosen
    pruned network. Call :meth:`remove` when done (``search`` does).
    """

    def __init__(self, model: nn.Module, graph: ChannelGraph, keep: dict[str, int], val_set, *,
                 criteria: Sequence[str] = ("l1", "l2", "fpgm"), steps: int,
                 tau_max: float = 5.0, tau_min: float = 0.1, hard: bool = False,
                 alpha_lr: float = 1e-4, alpha_betas: tuple[float, float] = (0.5, 0.999),
                 alpha_weight_decay: float = 1e-3, init_std: float = 0.01, batch_size: int = 128,
                 mask_every: int = 1, seed: int = 0):
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
        self.sampler = CriteriaSampler(list(self.keep), [c.name for c in self.criteria],
                                       init_std=init_std, hard=hard, seed=seed)
        self.optimizer = torch.optim.Adam(self.sampler.parameters(), lr=alpha_lr,
                                          betas=alpha_betas, weight_decay=alpha_weight_decay)
        self.steps, self.tau_max, self.tau_min = int(steps), float(tau_max), float(tau_min)
        self.batch_size, self.mask_every, self.seed = int(batch_size), int(mask_every), int(seed)
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self._outputs = _masked_outputs(graph)
        self._index_groups()
        self._train_weights: list[torch.Tensor | None] = [None] * len(self._outputs)
        self._val_batches = None
        self._sampling = False  # True while sampler_step runs (also with a frozen eval model)
        self._handles = [model.get_submodule(o.module).register_forward_hook(self._hook(i))
                         for i, o in enumerate(self._outputs)]

    # ------------------------------------------------------------------ masks and weights
    def _index_groups(self) -> None:
        row = {name: i for i, name in enumerate(self.sampler.groups)}
        unsampled = len(row)
        root_row = {}
        for group in self.graph.groups:
            for r in group.channels:
                root_row[int(r)] = row.get(group.name, unsampled)
        for out in self._outputs:
            out.group_index = torch.as_tensor([root_row.get(int(r), unsampled) for r in out.roots])
        # outputs with no sampled channel (e.g. the classifier) need no hook
        self._outputs = [o for o in self._outputs if bool((o.group_index < unsampled).any())]

    @torch.no_grad()
    def refresh_masks(self) -> None:
        """Every criterion's keep-mask at every group's rate, from the current weights."""
        removed = []
        for crit in self.criteria:
            plan = make_plan(self.graph, crit.score(self.graph, self.model), {}, counts=self.keep)
            removed.append(np.fromiter(self.graph.removed_roots(plan), dtype=np.int64))
        for out in self._outputs:
            keep = np.stack([~np.isin(out.roots, gone) for gone in removed], axis=1)
            out.keep = torch.as_tensor(keep, dtype=torch.float32)

    def _channel_weights(self, sample: torch.Tensor, out: _MaskedOutput) -> torch.Tensor:
        # an extra row [1, 0, ...] for unsampled channels, whose keep rows are all ones
        extra = F.one_hot(torch.zeros(1, dtype=torch.long), sample.shape[1]).to(sample)
        rows = torch.cat([sample, extra])[out.group_index.to(sample.device)]
        return (rows * out.keep.to(sample)).sum(-1)

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

    def report(self) -> list[dict[str, Any]]:
        """Per group: size, kept channels, each criterion's probability, the choice."""
        probs = self.sampler.probabilities().cpu()
        rows = []
        for i, name in enumerate(self.sampler.groups):
            p = {c: float(v) for c, v in zip(self.sampler.criteria, probs[i])}
            rows.append({"group": name, "size": self.graph.by_name[name].size,
                         "kept": self.keep[name], "probabilities": p,
                         "choice": max(p, key=p.get)})
        return rows


def lfpc_prune(model: nn.Module, train_set, val_set, search_config, sfp_config, out_dir, *,
               example_inputs, macs_reduction: float | None = None, ratio: float | None = None,
               ratios: dict[str, float] | None = None,
               criteria: Sequence[str] = ("l1", "l2", "fpgm"), train_weights: bool = True,
               mask_grads: bool = False, ignore: Sequence = (), leaf_modules: Sequence = (),
               resume: bool = True, graph: ChannelGraph | None = None, distill=None,
               **search_options):
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

    Returns ``(model, PruningResult, info)``; ``info`` holds ``choices`` (one row per group:
    size, kept, probabilities, choice), the search history and both phases' fit summaries.
    """
    out_dir = Path(out_dir)
    search_config = _config(search_config, TrainConfig)
    sfp_config = _config(sfp_config, TrainConfig)
    example_inputs = as_tuple(example_inputs)
    if example_inputs is None:
        raise ValueError("lfpc_prune needs example_inputs (e.g. torch.randn(1, 3, 32, 32))")
    if graph is None:
        graph = build_graph(model, example_inputs, leaf_modules=leaf_modules, ignore=ignore)
    counts = SoftPruning(graph, model=model, example_inputs=example_inputs, criterion="l2",
                         ratio=ratio, ratios=ratios, macs_reduction=macs_reduction).target_keep
    if train_weights:
        steps_per_epoch = -(-len(train_set) // search_config.batch_size)
        if search_config.max_steps_per_epoch:
            steps_per_epoch = min(steps_per_epoch, search_config.max_steps_per_epoch)
    else:
        steps_per_epoch = -(-len(val_set) // search_options.get("batch_size", 128))
    search = CriteriaSearch(model, graph, counts, val_set, criteria=criteria,
                            steps=search_config.epochs * steps_per_epoch,
                            seed=search_config.seed, **search_options)
    try:
        if train_weights:
            search_summary = fit(model, train_set, val_set, search_config, out_dir / "search",
                                 hooks=[search], resume=resume)
        else:
            search_summary = _search_frozen(model, search, search_config, out_dir / "search",
                                            resume)
    finally:
        search.remove()
    choices = search.sampler.choices()
    hook = SoftPruning(graph, model=model, example_inputs=example_inputs,
                       criterion=PerGroupCriterion(choices, default="l2"), keep=counts,
                       mask_grads=mask_grads, ignore=ignore, leaf_modules=leaf_modules)
    sfp_summary = fit(model, train_set, val_set, sfp_config, out_dir / "sfp", hooks=[hook],
                      resume=resume, distill=distill)  # the search phase learns alone
    result = hook.finalize(model)
    result.criterion = "lfpc"
    info = {"choices": search.report(), "search_history": search.history,
            "search": search_summary, "sfp": sfp_summary,
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
