"""Granularity: which elements share a scale.

A granularity turns an array into a *grouped view* (a reshape, never a transpose) plus the
axes of that view that one scale covers. Scales have the view's shape with those axes
reduced to 1, so they broadcast against the view.

``axis=None`` means "the natural axis": the last axis for a bare array. The Flax integration
resolves it per layer (output channels for per-channel, the contraction axis for groups).

Example:
    >>> per_group(128).describe((4096, 4096))
    'groups of 128 along axis -1'
"""

from __future__ import annotations

import dataclasses
import math
from typing import Union

import jax.numpy as jnp

__all__ = [
    "PerTensor",
    "PerChannel",
    "PerGroup",
    "PerBlock",
    "Granularity",
    "per_tensor",
    "per_channel",
    "per_group",
    "per_block",
]


def _norm_axis(axis, ndim, field):
    if ndim == 0:
        raise ValueError(f"{field}: needs an array with at least one axis, got a scalar")
    if not -ndim <= axis < ndim:
        raise ValueError(f"{field}: axis {axis} is out of range for an array of {ndim} dims")
    return axis % ndim


@dataclasses.dataclass(frozen=True)
class PerTensor:
    """One scale for the whole tensor."""

    def view(self, shape):
        return tuple(shape), tuple(range(len(shape))), tuple(shape)

    def describe(self, shape=None) -> str:
        return "per tensor"

    def resolve(self, channel_axis: int, contract_axis: int):
        return self

    def token(self) -> str:
        return "tensor"


@dataclasses.dataclass(frozen=True)
class PerChannel:
    """One scale per index of ``axis`` (every other axis is reduced)."""

    axis: int | None = None

    def view(self, shape):
        nd = len(shape)
        ax = _norm_axis(-1 if self.axis is None else self.axis, nd, "per_channel.axis")
        return tuple(shape), tuple(i for i in range(nd) if i != ax), tuple(shape)

    def describe(self, shape=None) -> str:
        return f"per channel along axis {-1 if self.axis is None else self.axis}"

    def resolve(self, channel_axis: int, contract_axis: int):
        return self if self.axis is not None else PerChannel(channel_axis)

    def token(self) -> str:
        return "ch" if self.axis is None else f"ch{self.axis}"


@dataclasses.dataclass(frozen=True)
class PerGroup:
    """Groups of ``size`` consecutive elements along ``axis`` share a scale.

    A size that does not divide the axis is an error unless ``pad=True``, which pads the
    axis with zeros to a multiple of ``size`` (padding never changes a group's range).
    """

    size: int
    axis: int | None = None
    pad: bool = False

    def __post_init__(self):
        if not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"per_group.size must be a positive integer, got {self.size!r}")

    def padded_shape(self, shape):
        nd = len(shape)
        ax = _norm_axis(-1 if self.axis is None else self.axis, nd, "per_group.axis")
        n = shape[ax]
        if n % self.size:
            if not self.pad:
                raise ValueError(
                    f"per_group.size: {self.size} does not divide axis {ax} of length {n} "
                    f"(shape {tuple(shape)}); pick a divisor or use per_group({self.size}, pad=True)"
                )
            n = math.ceil(n / self.size) * self.size
        return tuple(shape[:ax]) + (n,) + tuple(shape[ax + 1 :]), ax

    def view(self, shape):
        padded, ax = self.padded_shape(shape)
        vshape = padded[:ax] + (padded[ax] // self.size, self.size) + padded[ax + 1 :]
        return vshape, (ax + 1,), padded

    def describe(self, shape=None) -> str:
        return f"groups of {self.size} along axis {-1 if self.axis is None else self.axis}"

    def resolve(self, channel_axis: int, contract_axis: int):
        return self if self.axis is not None else dataclasses.replace(self, axis=contract_axis)

    def token(self) -> str:
        t = f"g{self.size}"
        if self.axis is not None:
            t += f"a{self.axis}"
        return t + ("p" if self.pad else "")


@dataclasses.dataclass(frozen=True)
class PerBlock:
    """2-D tiles of ``rows x cols`` over the last two axes (or ``axes``) share a scale."""

    rows: int
    cols: int
    axes: tuple = (-2, -1)

    def __post_init__(self):
        if self.rows < 1 or self.cols < 1:
            raise ValueError(f"per_block: rows and cols must be positive, got {self.rows}x{self.cols}")

    def view(self, shape):
        nd = len(shape)
        if nd < 2:
            raise ValueError(f"per_block: needs an array with 2 or more dims, got shape {tuple(shape)}")
        a0 = _norm_axis(self.axes[0], nd, "per_block.axes")
        a1 = _norm_axis(self.axes[1], nd, "per_block.axes")
        if a1 != a0 + 1:
            raise ValueError("per_block.axes must be two adjacent axes, e.g. (-2, -1)")
        r, c = shape[a0], shape[a1]
        if r % self.rows or c % self.cols:
            raise ValueError(
                f"per_block: {self.rows}x{self.cols} tiles do not divide dims {r}x{c} of shape {tuple(shape)}"
            )
        vshape = tuple(shape[:a0]) + (r // self.rows, self.rows, c // self.cols, self.cols) + tuple(shape[a1 + 1 :])
        return vshape, (a0 + 1, a0 + 3), tuple(shape)

    def describe(self, shape=None) -> str:
        return f"{self.rows}x{self.cols} blocks"

    def resolve(self, channel_axis: int, contract_axis: int):
        return self

    def token(self) -> str:
        return f"b{self.rows}x{self.cols}"


Granularity = Union[PerTensor, PerChannel, PerGroup, PerBlock]


def per_tensor() -> PerTensor:
    """One scale for the whole tensor.

    Example:
        >>> per_tensor().token()
        'tensor'
    """
    return PerTensor()


def per_channel(axis: int | None = None) -> PerChannel:
    """One scale per channel of ``axis`` (default: last axis; output channels for a layer).

    Example:
        >>> per_channel(0).token()
        'ch0'
    """
    return PerChannel(axis)


def per_group(size: int, axis: int | None = None, pad: bool = False) -> PerGroup:
    """Groups of ``size`` consecutive elements along ``axis`` (default: last axis; the
    contraction axis for a layer weight).

    Example:
        >>> per_group(128).token()
        'g128'
    """
    return PerGroup(size, axis, pad)


def per_block(rows: int, cols: int) -> PerBlock:
    """2-D tiles over the last two axes (e.g. 128x128 blocks as in DeepSeek-V3's FP8).

    Example:
        >>> per_block(128, 128).token()
        'b128x128'
    """
    return PerBlock(rows, cols)


def to_view(x, gran):
    """Reshape ``x`` into ``gran``'s grouped view (padding with zeros if asked)."""
    vshape, axes, padded = gran.view(x.shape)
    if padded != tuple(x.shape):
        x = jnp.pad(x, [(0, p - s) for s, p in zip(x.shape, padded)])
    return x.reshape(vshape), axes


def from_view(xv, gran, shape):
    """Inverse of :func:`to_view`."""
    _, _, padded = gran.view(shape)
    x = xv.reshape(padded)
    if padded != tuple(shape):
        x = x[tuple(slice(0, s) for s in shape)]
    return x
