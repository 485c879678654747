"""Depth pruning: remove whole residual bottlenecks of C2f / C3k2 blocks (`prune.drop_blocks`).

Channel pruning thins every layer but leaves the number of layers alone, and on a CPU runtime
each convolution costs a fixed time besides its arithmetic (OpenVINO, 2 threads, a 160 px yolov8n:
about 10-20 us per conv however narrow, 72 convs in the default pruned model). A residual
bottleneck `t + cv2(cv1(t))` can go whole: without it the block passes `t` on, which is what the
bottleneck computes when its branch is small. Each one removed saves two 3x3 convolutions and an Add.

Which ones: the relative size of the branch on real training images, `||cv2(cv1(t))|| / ||t||`
(mean over the images), smallest first. The block's output conv `cv2` reads the concatenation
`[cv1 halves, t_1, ..., t_n]`; when `m_i` goes, `t_{i+1}` becomes `t_i`, so its input columns are
added to those of `t_i` and dropped: the cut model starts from the best linear stand-in for the
removed branch (exact when the branch output is zero), and retrain recovers the rest.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn


def _split_widths(block: nn.Module) -> tuple[int, int]:
    """(first half, second half) output widths of the block's cv1, for C2f and SplitFreeC2f alike."""
    if hasattr(block, "cv1a"):
        return int(block.cv1a.conv.out_channels), int(block.cv1b.conv.out_channels)
    c = int(block.c)
    return c, c


def residual_blocks(model: nn.Module) -> dict[str, tuple[nn.Module, int]]:
    """Every residual bottleneck inside a C2f-style block: module name -> (its block, its index in block.m)."""
    from ultralytics.nn.modules.block import Bottleneck, C2f

    from pipeline.modules import SplitFreeC2f

    found: dict[str, tuple[nn.Module, int]] = {}
    for name, block in model.named_modules():
        if not isinstance(block, (C2f, SplitFreeC2f)) or not isinstance(getattr(block, "m", None), nn.ModuleList):
            continue
        for i, m in enumerate(block.m):
            if isinstance(m, Bottleneck) and getattr(m, "add", False):
                found[f"{name}.m.{i}"] = (block, i)
    return found


@torch.no_grad()
def branch_ratios(model: nn.Module, images: torch.Tensor) -> dict[str, float]:
    """Per residual bottleneck, mean over `images` of ||branch output|| / ||input|| (eval mode)."""
    blocks = residual_blocks(model)
    sums = dict.fromkeys(blocks, 0.0)

    def hook(name: str) -> Any:
        def fn(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            x = inputs[0]
            ratio = (output - x).flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1).clamp_min(1e-12)
            sums[name] += float(ratio.sum())
        return fn

    handles = [block.m[i].register_forward_hook(hook(name)) for name, (block, i) in blocks.items()]
    was_training = model.training
    try:
        model.eval()
        model(images)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {name: total / len(images) for name, total in sums.items()}


def choose(ratios: dict[str, float], count: int) -> list[str]:
    """The `count` bottlenecks with the smallest branch ratio (ties broken by name)."""
    return sorted(sorted(ratios), key=lambda n: ratios[n])[:count]


def _drop_input_columns(conv_module: nn.Module, keep_into: int, gone: slice) -> None:
    """Add the input columns `gone` of an Ultralytics Conv's conv onto columns starting at `keep_into`,
    then remove them (in_channels shrinks by their count)."""
    conv = conv_module.conv
    w = conv.weight.data
    width = gone.stop - gone.start
    w[:, keep_into:keep_into + width] += w[:, gone]
    kept = torch.cat([w[:, :gone.start], w[:, gone.stop:]], dim=1).clone()
    conv.weight = nn.Parameter(kept, requires_grad=conv.weight.requires_grad)
    conv.in_channels -= width


def drop(model: nn.Module, names: Iterable[str]) -> list[str]:
    """Remove the named residual bottlenecks from `model` in place (see module docstring); returns them."""
    blocks = residual_blocks(model)
    names = list(names)
    unknown = [n for n in names if n not in blocks]
    if unknown:
        raise KeyError(f"not residual bottlenecks of this model: {', '.join(unknown)}")
    by_block: dict[int, tuple[nn.Module, list[int]]] = {}
    for n in names:
        block, i = blocks[n]
        by_block.setdefault(id(block), (block, []))[1].append(i)
    for block, idxs in by_block.values():
        first, second = _split_widths(block)
        for i in sorted(set(idxs), reverse=True):  # later outputs first: earlier offsets stay put
            # cv2 input: [first half, second half = t_0, t_1, ..., t_n]; m_i maps t_i -> t_{i+1}.
            start_in = first + second * i
            start_out = first + second * (i + 1)
            _drop_input_columns(block.cv2, start_in, slice(start_out, start_out + second))
            del block.m[i]
    return names
