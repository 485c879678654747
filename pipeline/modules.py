"""Split-free replacements for Ultralytics blocks that torch-pruning's graph cannot follow.

Pruned checkpoints pickle these classes by import path, so they must live in the package.

YOLOv8's `C2f` and YOLO11's `C3k2` (a `C2f` subclass) compute one 1x1 conv and `chunk` its
output in two halves. torch-pruning cannot map channel indices through that split, so each block
is replaced by `SplitFreeC2f`: the conv becomes two 1x1 convs (`cv1a` = first half, `cv1b` =
second half) with the same weights, and the block computes exactly the same function.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

# Attributes Ultralytics' parse_model sets on each top-level layer; _predict_once reads i and f.
_LAYER_ATTRS = ("i", "f", "type", "np")


def _slice_conv(src: nn.Module, lo: int, hi: int) -> nn.Module:
    """A copy of an Ultralytics `Conv` (conv + optional BN + act) keeping output channels lo:hi."""
    dst = copy.deepcopy(src)  # keeps act, eps/momentum, train/eval mode, a fused forward
    conv = dst.conv
    conv.weight = nn.Parameter(src.conv.weight.data[lo:hi].clone(), requires_grad=src.conv.weight.requires_grad)
    if src.conv.bias is not None:
        conv.bias = nn.Parameter(src.conv.bias.data[lo:hi].clone(), requires_grad=src.conv.bias.requires_grad)
    conv.out_channels = hi - lo
    bn = getattr(dst, "bn", None)
    if isinstance(bn, nn.BatchNorm2d):
        sbn = src.bn
        if sbn.affine:
            bn.weight = nn.Parameter(sbn.weight.data[lo:hi].clone(), requires_grad=sbn.weight.requires_grad)
            bn.bias = nn.Parameter(sbn.bias.data[lo:hi].clone(), requires_grad=sbn.bias.requires_grad)
        if sbn.track_running_stats:
            bn.running_mean = sbn.running_mean[lo:hi].clone()
            bn.running_var = sbn.running_var[lo:hi].clone()
        bn.num_features = hi - lo
    return dst


class SplitFreeC2f(nn.Module):
    """C2f / C3k2 computed without chunk/split: y = cv2(cat(cv1a(x), cv1b(x), m_1(.), ..., m_n(.)))."""

    def __init__(self, cv1a: nn.Module, cv1b: nn.Module, m: nn.ModuleList, cv2: nn.Module, c: int) -> None:
        super().__init__()
        self.c = c
        self.cv1a = cv1a
        self.cv1b = cv1b
        self.m = m
        self.cv2 = cv2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv1a(x), self.cv1b(x)]
        y.extend(block(y[-1]) for block in self.m)
        return self.cv2(torch.cat(y, 1))

    @classmethod
    def from_c2f(cls, src: nn.Module) -> SplitFreeC2f:
        """The equivalent split-free block of a C2f-style module (weights copied, mode kept)."""
        c = int(src.c)
        new = copy_layer_attrs(src, cls(_slice_conv(src.cv1, 0, c), _slice_conv(src.cv1, c, 2 * c), src.m, src.cv2, c))
        new.train(src.training)
        return new


def copy_layer_attrs(src: nn.Module, dst: nn.Module) -> nn.Module:
    """Give `dst` the bookkeeping attributes of the top-level layer it replaces (i, f, type, np)."""
    for attr in _LAYER_ATTRS:
        if hasattr(src, attr):
            setattr(dst, attr, getattr(src, attr))
    return dst


def _is_c2f_style(module: nn.Module) -> bool:
    """C2f and subclasses that keep its chunk-based forward (C3k2, C2fPSA, ...)."""
    from ultralytics.nn.modules.block import C2f

    return isinstance(module, C2f) and type(module).forward is C2f.forward


def swap_split_blocks(model: nn.Module) -> int:
    """Replace every C2f-style block of `model` in place by a SplitFreeC2f; returns how many."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if _is_c2f_style(child):
                new = SplitFreeC2f.from_c2f(child)
                setattr(parent, name, new)  # also right for Sequential / ModuleList children ("0", "1", ...)
                count += 1
    return count
