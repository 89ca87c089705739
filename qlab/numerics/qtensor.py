"""QTensor: a quantized array as integer (or bit-pattern) codes + scale (+ zero point) + its spec.

``codes`` has the original shape (int8/uint8); ``scale`` and ``zero_point`` have the grouped-view
shape of the spec's granularity (see ``qlab.numerics.granularity``); ``tensor_scale`` is the
optional second-level float32 scale (NVFP4). ``qlab.quantize`` makes one, ``qlab.dequantize`` reads
it back, ``qlab.numerics.packing`` serializes it.

Example:
    >>> import jax.numpy as jnp
    >>> from qlab.numerics.spec import parse_spec
    >>> q = QTensor(jnp.zeros((4, 256), jnp.int8), jnp.ones((4, 2, 1)), None, None, parse_spec("int4/g128"),
    ...             (4, 256), jnp.float32)
    >>> q.packed_bytes   # 1024 codes * 4 bits + 8 scales * 16 bits
    528
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from qlab.numerics.sizes import bits_per_weight, packed_nbytes
from qlab.numerics.spec import QuantSpec

__all__ = ["QTensor"]


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class QTensor:
    """Quantized array: integer/bit-pattern ``codes`` + ``scale`` (+ ``zero_point``) + ``spec``.

    ``codes`` has the original shape (int8/uint8); ``scale`` and ``zero_point`` have the
    grouped-view shape of the spec's granularity (see ``qlab.numerics.granularity``);
    ``tensor_scale`` is the optional second-level f32 scale (NVFP4). A pytree: the arrays are
    its leaves, the spec, shape and dtype its static part.

    Example:
        >>> import jax.numpy as jnp
        >>> from qlab.numerics.quantize import quantize
        >>> q = quantize(jnp.ones((4, 256)), "int4/g128")
        >>> q.packed_bytes, q.bits_per_weight
        (528, 4.125)
    """

    codes: jax.Array
    scale: jax.Array
    zero_point: jax.Array | None
    tensor_scale: jax.Array | None
    spec: QuantSpec
    shape: tuple
    dtype: np.dtype

    def tree_flatten(self):
        return (self.codes, self.scale, self.zero_point, self.tensor_scale), (
            self.spec,
            self.shape,
            self.dtype,
        )

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def packed_bytes(self) -> int:
        """Bytes this tensor occupies packed: codes at ``bits`` bits, scales, zero points."""
        return packed_nbytes(self.spec, self.shape)

    @property
    def bits_per_weight(self) -> float:
        return bits_per_weight(self.spec, self.shape)

    def __repr__(self):
        return (
            f"QTensor(spec={str(self.spec)!r}, shape={self.shape}, dtype={np.dtype(self.dtype).name}, "
            f"scale_shape={tuple(self.scale.shape)}, packed_bytes={self.packed_bytes})"
        )
