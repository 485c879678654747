"""Structured channel pruning at a threshold, with NVIDIA TAO's semantics, on Ultralytics YOLO.

The coupled layers TAO equalises (outputs added, multiplied or fed to a depthwise conv) are the
groups of torch-pruning's dependency graph: every channel of a group is kept or removed together,
in every layer it touches. For each group:

1. score of an output filter = L2 norm of its kernel weights (bias ignored), for each conv whose
   outputs the group prunes (depthwise convs included, as in TAO);
2. scores normalised per layer: `max` (divide by the layer's largest) or `L2` (divide by the
   L2 norm of the layer's scores, times their count);
3. merged across the group's layers by `equalization`: union = max, intersection = min,
   arithmetic_mean, geometric_mean;
4. kept = channels with merged score > pth, at least min(min_filters, width), rounded UP to a
   multiple of granularity, capped at the width; the highest-scored channels are the ones kept.

Scores come from the unpruned weights (TAO explores the whole model before it prunes), so the
result does not depend on the order in which groups are cut. Never pruned: the Detect head's
output convs (box and class) and DFL, attention blocks (C2PSA and the like: their head layout
would break; C2PSA's input channels follow its producer), and every group with an output-pruned
layer matching `excluded_layers`.

`ChannelPruner.find_pth` answers "which pth keeps this fraction of parameters (or of conv FLOPs)"
by bisection on the same rules, counting from the group index lists without cutting the model;
FLOPs come from each conv's output size, read once in one forward pass at the deploy size.
`pipeline.latency` chooses channels against a measured latency budget instead.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.errors import UserError
from pipeline.modules import copy_layer_attrs, swap_split_blocks

log = logging.getLogger("pipeline.prune")

NORMALIZERS = ("max", "L2")
EQUALIZATIONS = ("union", "intersection", "arithmetic_mean", "geometric_mean")


# ---------------------------------------------------------------- the TAO rules (pure numpy)


def filter_norms(weight: torch.Tensor) -> np.ndarray:
    """L2 norm of each output filter (dim 0) of a conv / linear weight."""
    w = weight.detach().float().reshape(weight.shape[0], -1)
    return w.norm(dim=1).cpu().numpy().astype(np.float64)


def normalize(norms: np.ndarray, normalizer: str) -> np.ndarray:
    """TAO's layer-wise normaliser: `max` -> norms / max; `L2` -> norms / ||norms||_2 * count."""
    norms = np.asarray(norms, dtype=np.float64)
    if normalizer == "max":
        top = norms.max() if norms.size else 0.0
        return norms / top if top > 0 else np.zeros_like(norms)
    if normalizer == "L2":
        total = float(np.sqrt(np.sum(norms**2)))
        return norms / total * norms.size if total > 0 else np.zeros_like(norms)
    raise ValueError(f"unknown normalizer {normalizer!r}; choose one of {NORMALIZERS}")


def equalize(stats: np.ndarray, criterion: str) -> np.ndarray:
    """Merge per-layer scores (layers x channels; NaN where a layer lacks a channel) into one row."""
    stats = np.atleast_2d(np.asarray(stats, dtype=np.float64))
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns cannot occur; log(0) is meant
        if criterion == "union":
            return np.nanmax(stats, axis=0)
        if criterion == "intersection":
            return np.nanmin(stats, axis=0)
        if criterion == "arithmetic_mean":
            return np.nanmean(stats, axis=0)
        if criterion == "geometric_mean":
            return np.exp(np.nanmean(np.log(stats), axis=0))  # a zero score gives exp(-inf) = 0, as in TAO
    raise ValueError(f"unknown equalization {criterion!r}; choose one of {EQUALIZATIONS}")


def keep_count(scores: np.ndarray, pth: float, granularity: int = 8, min_filters: int = 16) -> int:
    """How many channels TAO keeps: #(score > pth), >= min(min_filters, width), rounded up to granularity, <= width."""
    width = len(scores)
    kept = int(np.count_nonzero(np.asarray(scores) > pth))
    kept = max(kept, min(min_filters, width))
    if kept % granularity:
        kept += granularity - kept % granularity
    return min(kept, width)


def kept_indices(scores: np.ndarray, pth: float, granularity: int = 8, min_filters: int = 16) -> np.ndarray:
    """Sorted indices of the channels kept: the `keep_count` highest scores (ties: lower index first)."""
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    return np.sort(order[: keep_count(scores, pth, granularity, min_filters)])


# ---------------------------------------------------------------- layers that are never pruned


def head_output_layers(model: nn.Module) -> list[nn.Module]:
    """The Detect head's final box/class convs (one per scale, one2one copies too) and its DFL."""
    from ultralytics.nn.modules.head import Detect

    found: list[nn.Module] = []
    for m in model.modules():
        if isinstance(m, Detect):
            for name in ("cv2", "cv3", "one2one_cv2", "one2one_cv3"):
                branches = getattr(m, name, None)
                if branches is not None:
                    found.extend(seq[-1] for seq in branches)
            found.extend(m.dfl.modules())
    return found


def _attention_types() -> tuple[type, ...]:
    from ultralytics.nn.modules import block

    names = ("C2PSA", "PSA", "PSABlock", "Attention", "AAttn", "ABlock", "A2C2f", "C2fAttn",
             "MaxSigmoidAttnBlock", "ImagePoolingAttn")
    return tuple(getattr(block, n) for n in names if hasattr(block, n))


def _attention_units(model: nn.Module) -> list[nn.Module]:
    """Outermost attention blocks: each is one opaque node of the dependency graph."""
    types = _attention_types()
    units: list[nn.Module] = []
    inside: set[int] = set()
    for m in model.modules():
        if id(m) in inside:
            continue
        if isinstance(m, types):
            units.append(m)
            inside.update(id(sub) for sub in m.modules())
    return units


def _is_c2psa(module: nn.Module) -> bool:
    from ultralytics.nn.modules.block import C2PSA

    return isinstance(module, C2PSA)


class _StandIn(nn.Module):
    """A 1x1-conv-shaped placeholder for an attention block while the dependency graph is traced.

    Tracing through attention (qkv views, head splits) sends torch-pruning's index mapping into
    unbounded growth; the placeholder shows the graph one opaque layer with the block's input and
    output channels instead. Its pruner forwards input-channel cuts to C2PSA's first 1x1 conv (the
    only safe cut) and refuses everything else.
    """

    def __init__(self, unit: nn.Module, c_in: int, c_out: int) -> None:
        super().__init__()
        self.unit = [unit]  # a list, so the real block is not registered as a submodule
        self.in_channels, self.out_channels = c_in, c_out
        self.weight = nn.Parameter(torch.zeros(c_out, c_in, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.conv2d(x, self.weight)


def _stand_in_pruner():
    import torch_pruning as tp

    class StandInPruner(tp.pruner.BasePruningFunc):
        def prune_out_channels(self, layer: _StandIn, idxs: Sequence[int]) -> nn.Module:
            raise RuntimeError(f"attention block {type(layer.unit[0]).__name__} must not be pruned (group not skipped)")

        def prune_in_channels(self, layer: _StandIn, idxs: Sequence[int]) -> nn.Module:
            unit = layer.unit[0]
            if not _is_c2psa(unit):
                raise RuntimeError(f"attention block {type(unit).__name__} must not be pruned (group not skipped)")
            tp.prune_conv_in_channels(unit.cv1.conv, idxs)
            layer.in_channels = unit.cv1.conv.in_channels
            return layer

        def get_out_channels(self, layer: _StandIn) -> int:
            return layer.out_channels

        def get_in_channels(self, layer: _StandIn) -> int:
            return layer.in_channels

    return StandInPruner()


# ---------------------------------------------------------------- groups and the pruner


@dataclass(frozen=True)
class ConvSite:
    """One conv of the unpruned model as FLOP counts and latency tables see it, at one input size."""

    name: str
    cin: int
    cout: int
    kernel: tuple[int, int]
    stride: int
    groups: int
    h_in: int
    w_in: int
    h_out: int
    w_out: int
    act: bool  # followed by an activation (Ultralytics' Conv: conv + BN + SiLU; BN folds into a bias)

    @property
    def depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.cin == self.cout

    def macs(self, cin: int, cout: int, groups: int) -> int:
        return self.kernel[0] * self.kernel[1] * (cin // groups) * cout * self.h_out * self.w_out


@dataclass
class GroupPlan:
    """One coupled set of channels: its merged scores and whether it may be pruned at all."""

    root: str  # name of the conv the group was built from
    width: int
    layers: tuple[str, ...]  # convs whose filters are scored (output-pruned by this group)
    scores: np.ndarray  # merged normalised score per channel (root index space)
    excluded_by: str | None = None  # why the group is never pruned (pattern / attention), None if prunable
    tp_group: Any = field(default=None, repr=False)


def _matches(name: str, patterns: Iterable[str]) -> str | None:
    """The first pattern naming `name` or one of its parent modules (`model.22` covers `model.22.*`)."""
    for pat in patterns:
        if fnmatch.fnmatchcase(name, pat) or fnmatch.fnmatchcase(name, pat + ".*"):
            return pat
    return None


class ChannelPruner:
    """TAO-style threshold pruning of one model (modified in place), built once, applied once.

    The constructor swaps C2f/C3k2 for split-free blocks, traces the dependency graph and scores
    every group; `plan(pth, ...)` gives the channels each group removes, `count_params(plan)` the
    parameter count that plan leaves, `apply(plan)` cuts the model.
    """

    def __init__(
        self,
        model: nn.Module,
        normalizer: str = "max",
        equalization: str = "union",
        excluded_layers: Sequence[str] = (),
        example_size: int | None = None,
    ) -> None:
        import torch_pruning as tp

        if normalizer not in NORMALIZERS:
            raise UserError(f"prune.normalizer={normalizer!r} is not valid; choose one of: {', '.join(NORMALIZERS)}")
        if equalization not in EQUALIZATIONS:
            raise UserError(f"prune.equalization={equalization!r} is not valid; choose one of: {', '.join(EQUALIZATIONS)}")
        self.model = model
        self.normalizer = normalizer
        self.equalization = equalization
        self.excluded_layers = tuple(str(p) for p in excluded_layers)
        self.swapped = swap_split_blocks(model)
        self._applied = False
        self._sites: dict[int, dict[nn.Module, ConvSite]] = {}
        model.eval()
        for p in model.parameters():
            p.requires_grad_(True)  # the graph is traced through autograd
        self.names = {m: n for n, m in model.named_modules()}
        self._check_patterns()

        stride = int(max(getattr(model, "stride", torch.tensor([32.0])).max().item(), 32))
        size = example_size or 2 * stride
        example = torch.zeros(1, 3, size, size)
        stand_ins = self._stand_ins(example)
        with _swapped_in(model, stand_ins):
            self.dg = tp.DependencyGraph().build_dependency(
                model, example_inputs=example, output_transform=_raw_head_outputs,
                customized_pruners={_StandIn: _stand_in_pruner()}, verbose=False,
            )
        for st in stand_ins:
            self.names[st] = self.names[st.unit[0]]
        ignored = head_output_layers(model) + list(stand_ins)
        self.groups = [self._plan_group(g) for g in self.dg.get_all_groups(ignored_layers=ignored,
                                                                            root_module_types=(nn.Conv2d, nn.Linear))]
        self.params_before = sum(p.numel() for p in model.parameters())

    # -- construction helpers

    def _check_patterns(self) -> None:
        names = [n for n in self.names.values() if n]
        for pat in self.excluded_layers:
            if not any(_matches(n, [pat]) for n in names):
                convs = [n for m, n in self.names.items() if isinstance(m, nn.Conv2d)][:3]
                raise UserError(
                    f"prune.excluded_layers: pattern {pat!r} matches no module of this model; patterns are "
                    f"fnmatch patterns on module names as in layers.csv (e.g. {', '.join(convs)}, 'model.22' for a "
                    "whole block; C2f/C3k2's cv1 is split into cv1a and cv1b)")

    def _stand_ins(self, example: torch.Tensor) -> list[_StandIn]:
        """A placeholder for each outermost attention block, channels read from one forward pass."""
        units = _attention_units(self.model)
        found: dict[int, tuple[int, int]] = {}

        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            found[id(module)] = (int(inputs[0].shape[1]), int(output.shape[1]))

        handles = [u.register_forward_hook(hook) for u in units]
        try:
            if units:
                with torch.no_grad():
                    self.model(example)
        finally:
            for h in handles:
                h.remove()
        return [_StandIn(u, *found[id(u)]) for u in units]

    def _plan_group(self, group: Any) -> GroupPlan:
        dg = self.dg
        root_module = group[0].dep.target.module
        root = self.names.get(root_module, str(root_module))
        width = len(group[0].idxs)
        rows: list[np.ndarray] = []
        layers: list[str] = []
        excluded_by = None
        for item in group.items:
            module = item.dep.target.module
            is_out = dg.is_out_channel_pruning_fn(item.dep.handler)
            name = self.names.get(module)
            if isinstance(module, _StandIn) and (is_out or not _is_c2psa(module.unit[0])):
                excluded_by = excluded_by or f"attention block {name}"
            if is_out and name is not None and excluded_by is None:
                pat = _matches(name, self.excluded_layers)
                if pat is not None:
                    excluded_by = f"excluded_layers pattern {pat!r} ({name})"
            if is_out and isinstance(module, (nn.Conv2d, nn.Linear)):
                norms = normalize(filter_norms(module.weight), self.normalizer)
                row = np.full(width, np.nan)
                row[np.asarray(item.root_idxs, dtype=int)] = norms[np.asarray(item.idxs, dtype=int)]
                rows.append(row)
                layers.append(name or str(module))
        scores = equalize(np.stack(rows), self.equalization) if rows else np.ones(width)
        scores = np.nan_to_num(scores, nan=np.inf)  # a channel no scored layer covers is never the one removed
        return GroupPlan(root=root, width=width, layers=tuple(layers), scores=scores, excluded_by=excluded_by,
                         tp_group=group)

    # -- planning

    @property
    def prunable(self) -> list[GroupPlan]:
        return [g for g in self.groups if g.excluded_by is None]

    def score_quantiles(self, qs: Sequence[float] = (0.0, 0.1, 0.5)) -> list[float]:
        """Quantiles of the merged channel scores over all prunable groups (where a pth starts to bite)."""
        scores = np.concatenate([g.scores for g in self.prunable] or [np.zeros(0)])
        scores = scores[np.isfinite(scores)]
        return [float(np.quantile(scores, q)) for q in qs] if scores.size else [float("nan")] * len(qs)

    def plan(self, pth: float, granularity: int = 8, min_filters: int = 16) -> dict[str, np.ndarray]:
        """Channels (root indices) each prunable group removes at threshold `pth`; empty groups left out."""
        out: dict[str, np.ndarray] = {}
        for g in self.prunable:
            keep = kept_indices(g.scores, pth, granularity, min_filters)
            if len(keep) < g.width:
                out[g.root] = np.setdiff1d(np.arange(g.width), keep)
        return out

    def _removed(self, plan: dict[str, np.ndarray]) -> tuple[dict[nn.Module, set[int]], dict[nn.Module, set[int]]]:
        """Output / input channel indices each layer loses under `plan`, from the groups' index lists."""
        removed_out: dict[nn.Module, set[int]] = {}
        removed_in: dict[nn.Module, set[int]] = {}
        by_root = {g.root: g for g in self.groups}
        for root, idxs in plan.items():
            cut = set(int(i) for i in idxs)
            for item in by_root[root].tp_group.items:
                module = item.dep.target.module
                gone = {int(i) for i, r in zip(item.idxs, item.root_idxs, strict=True) if int(r) in cut}
                if not gone:
                    continue
                if isinstance(module, _StandIn):  # only C2PSA's input channels ever get here
                    removed_in.setdefault(module.unit[0].cv1.conv, set()).update(gone)
                elif self.dg.is_out_channel_pruning_fn(item.dep.handler):
                    removed_out.setdefault(module, set()).update(gone)
                else:
                    removed_in.setdefault(module, set()).update(gone)
        return removed_out, removed_in

    def count_params(self, plan: dict[str, np.ndarray]) -> int:
        """Parameters the model would have after `plan`, from the groups' index lists (no cutting)."""
        removed_out, removed_in = self._removed(plan)
        total = self.params_before
        for module in set(removed_out) | set(removed_in):
            ro, ri = removed_out.get(module, set()), removed_in.get(module, set())
            total -= _param_count(module, set(), set()) - _param_count(module, ro, ri)
        return total

    def conv_sites(self, imgsz: int) -> dict[nn.Module, ConvSite]:
        """Every conv of the (unpruned) model with the input and output size it runs at for an imgsz x imgsz image."""
        if imgsz in self._sites:
            return self._sites[imgsz]
        if self._applied:
            raise RuntimeError("conv_sites measures the unpruned model; call it before apply")
        from ultralytics.nn.modules.conv import Conv

        activated = {id(m.conv) for m in self.model.modules()
                     if isinstance(m, Conv) and not isinstance(m.act, nn.Identity)}
        found: dict[nn.Module, ConvSite] = {}

        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if module not in found:  # a conv called twice (shared weights) counts once
                found[module] = ConvSite(
                    name=self.names.get(module, ""), cin=module.in_channels, cout=module.out_channels,
                    kernel=tuple(module.kernel_size), stride=int(module.stride[0]), groups=module.groups,
                    h_in=int(inputs[0].shape[2]), w_in=int(inputs[0].shape[3]),
                    h_out=int(output.shape[2]), w_out=int(output.shape[3]), act=id(module) in activated)

        handles = [m.register_forward_hook(hook) for m in self.model.modules() if isinstance(m, nn.Conv2d)]
        try:
            with torch.no_grad():
                self.model(torch.zeros(1, 3, imgsz, imgsz))
        finally:
            for h in handles:
                h.remove()
        self._sites[imgsz] = found
        return found

    def conv_channels(self, plan: dict[str, np.ndarray], imgsz: int) -> dict[nn.Module, tuple[int, int, int]]:
        """(in channels, out channels, groups) of every conv once `plan` is cut."""
        removed_out, removed_in = self._removed(plan)
        shapes: dict[nn.Module, tuple[int, int, int]] = {}
        for module, site in self.conv_sites(imgsz).items():
            ro, ri = removed_out.get(module, set()), removed_in.get(module, set())
            if site.depthwise:  # in and out are the same channels
                c = site.cout - len(ro | ri)
                shapes[module] = (c, c, c)
            else:
                shapes[module] = (site.cin - len(ri), site.cout - len(ro), site.groups)
        return shapes

    def count_flops(self, plan: dict[str, np.ndarray], imgsz: int) -> int:
        """Multiply-accumulates of the model's convs after `plan` at imgsz: k*k*cin/groups*cout*H*W per conv."""
        sites = self.conv_sites(imgsz)
        return sum(sites[module].macs(*shape) for module, shape in self.conv_channels(plan, imgsz).items())

    def find_pth(self, target_ratio: float, granularity: int = 8, min_filters: int = 16,
                 iterations: int = 50, by: str = "params", imgsz: int | None = None) -> tuple[float, float]:
        """(pth, kept ratio) whose ratio is closest to `target_ratio`, by bisection on pth.

        `by="params"` counts parameters; `by="flops"` counts conv multiply-accumulates at `imgsz`.
        Both fall as pth rises (each group keeps fewer channels), which the bisection relies on.
        """
        if by == "flops":
            if imgsz is None:
                raise ValueError("find_pth(by='flops') needs imgsz")
            flops_before = self.count_flops({}, imgsz)

            def ratio(pth: float) -> float:
                return self.count_flops(self.plan(pth, granularity, min_filters), imgsz) / flops_before
        elif by == "params":
            def ratio(pth: float) -> float:
                return self.count_params(self.plan(pth, granularity, min_filters)) / self.params_before
        else:
            raise ValueError(f"find_pth: unknown measure {by!r}; choose params or flops")

        finite = [s[np.isfinite(s)] for s in (g.scores for g in self.prunable)]
        top = max((float(s.max()) for s in finite if s.size), default=0.0)
        lo, hi = 0.0, top  # ratio(lo) is the largest reachable, ratio(hi) the smallest
        r_lo, r_hi = ratio(lo), ratio(hi)
        if r_lo <= target_ratio:
            return lo, r_lo
        if r_hi >= target_ratio:
            return hi, r_hi
        for _ in range(iterations):  # invariant: ratio(lo) > target >= ratio(hi)
            mid = (lo + hi) / 2
            r_mid = ratio(mid)
            if r_mid > target_ratio:
                lo, r_lo = mid, r_mid
            else:
                hi, r_hi = mid, r_mid
        return (lo, r_lo) if abs(r_lo - target_ratio) < abs(r_hi - target_ratio) else (hi, r_hi)

    def channel_cuts(self, group: GroupPlan) -> list[tuple[nn.Module, bool, np.ndarray]]:
        """The convs a group's cut reaches: (conv, True for its outputs / False for its inputs, how many of
        the conv's channels each root index stands for). Producers lose outputs, consumers inputs; C2PSA's
        input cut lands on its cv1. A conv listed twice for one side counts each of its channels once."""
        pairs: dict[tuple[nn.Module, bool], set[tuple[int, int]]] = {}
        for item in group.tp_group.items:
            module = item.dep.target.module
            is_out = self.dg.is_out_channel_pruning_fn(item.dep.handler)
            if isinstance(module, _StandIn):
                module, is_out = module.unit[0].cv1.conv, False
            if isinstance(module, nn.Conv2d):
                pairs.setdefault((module, is_out), set()).update(
                    (int(i), int(r)) for i, r in zip(item.idxs, item.root_idxs, strict=True))
        cuts: list[tuple[nn.Module, bool, np.ndarray]] = []
        for (module, is_out), found in pairs.items():
            counts = np.zeros(group.width, dtype=np.int64)
            for _, r in found:
                counts[r] += 1
            cuts.append((module, is_out, counts))
        return cuts

    # -- cutting

    def apply(self, plan: dict[str, np.ndarray]) -> None:
        """Remove the planned channels from the model, group by group, each with its own index list."""
        if self._applied:
            raise RuntimeError("ChannelPruner.apply may run once; build a new pruner for another plan")
        self._applied = True
        by_root = {g.root: g for g in self.groups}
        for root, idxs in plan.items():
            by_root[root].tp_group.prune(idxs=[int(i) for i in idxs])
        for p in self.model.parameters():
            p.requires_grad_(True)


def _param_count(module: nn.Module, removed_out: set[int], removed_in: set[int]) -> int:
    """Parameters of a conv / BN / linear once those output / input channels are gone."""
    if isinstance(module, nn.Conv2d):
        out = module.out_channels - len(removed_out)
        k = int(np.prod(module.kernel_size))
        if module.groups > 1 and module.groups == module.in_channels == module.out_channels:  # depthwise
            out = module.out_channels - len(removed_out | removed_in)
            weight = out * k
        else:
            weight = out * ((module.in_channels - len(removed_in)) // module.groups) * k
        return weight + (out if module.bias is not None else 0)
    if isinstance(module, nn.Linear):
        out = module.out_features - len(removed_out)
        return out * (module.in_features - len(removed_in)) + (out if module.bias is not None else 0)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return (module.num_features - len(removed_out | removed_in)) * 2 if module.affine else 0
    return sum(p.numel() for p in module.parameters(recurse=False))


@contextlib.contextmanager
def _swapped_in(model: nn.Module, stand_ins: list[_StandIn]) -> Iterator[None]:
    """Put the placeholders where their attention blocks are, and the blocks back afterwards."""
    parents = {id(child): (parent, name) for parent in model.modules() for name, child in parent.named_children()}
    places = [(*parents[id(st.unit[0])], st) for st in stand_ins]
    for parent, name, st in places:
        setattr(parent, name, copy_layer_attrs(st.unit[0], st))
    try:
        yield
    finally:
        for parent, name, st in places:
            setattr(parent, name, st.unit[0])


def _raw_head_outputs(out: Any) -> Any:
    """Trace from the head's raw box/class maps, not from the DFL decode (never pruned)."""
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict):
        raw = out[1]
        # NMS-free heads (YOLO26, YOLOv10-style) run a one2one copy of the head on the same features:
        # both branches must be traced, or the copy keeps its input widths and the cut model breaks.
        branches = [raw[k] for k in ("one2many", "one2one") if k in raw] or [raw]
        return [b[k] for b in branches for k in ("boxes", "scores")]
    return out


def layer_channels(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(in, out) channels of every conv / linear layer, by module name."""
    rows: dict[str, tuple[int, int]] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            rows[name] = (m.in_channels, m.out_channels)
        elif isinstance(m, nn.Linear):
            rows[name] = (m.in_features, m.out_features)
    return rows
