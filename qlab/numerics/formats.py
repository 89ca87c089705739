"""Number formats: integers, minifloats (eXmY) and codebooks.

A format is a frozen dataclass that knows its name, its bits per element and its grid of
representable values (in "format units", before any scale). Three operations are all the
quantizers need:

* ``fmt.round(v)``: nearest representable value (saturating), in JAX, given values already
  divided by the scale;
* ``fmt.encode(v)`` / ``fmt.decode(codes)``: grid values <-> the integer codes that are
  stored (two's complement integers, IEEE-style sign|exponent|mantissa bit patterns,
  codebook indices).

Example:
    >>> fmt = get_format("fp4_e2m1")
    >>> fmt.grid().tolist()[7:]
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Union

import jax.numpy as jnp
import numpy as np

__all__ = [
    "IntFormat",
    "FixedPointFormat",
    "FloatFormat",
    "CodebookFormat",
    "Format",
    "get_format",
    "codebook",
    "FORMAT_NAMES",
    "NF4_VALUES",
    "BNB_FP4_VALUES",
]


def _round_half_even(x):
    return jnp.round(x)  # jnp.round rounds halves to even


@dataclasses.dataclass(frozen=True)
class IntFormat:
    """A ``bits``-bit integer, signed (two's complement) or unsigned.

    ``narrow=True`` drops the most negative value of a signed format, making it symmetric
    (int8 narrow is [-127, 127]).

    Example:
        >>> IntFormat(4).qmin, IntFormat(4).qmax
        (-8, 7)
        >>> IntFormat(4, narrow=True).qmin
        -7
    """

    bits: int
    signed: bool = True
    narrow: bool = False

    def __post_init__(self):
        if not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise ValueError(f"IntFormat.bits must be an integer in 1..8, got {self.bits!r}")
        if self.narrow and not self.signed:
            raise ValueError("IntFormat.narrow applies to signed formats only (signed=True)")
        if self.narrow and self.bits == 1:
            raise ValueError("IntFormat.narrow needs bits >= 2 (narrow int1 would hold only 0)")

    @property
    def name(self) -> str:
        base = f"{'int' if self.signed else 'uint'}{self.bits}"
        return base + ("n" if self.narrow else "")

    @property
    def is_int(self) -> bool:
        return True

    @property
    def qmin(self) -> int:
        if not self.signed:
            return 0
        return -(2 ** (self.bits - 1)) + (1 if self.narrow else 0)

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def max_abs(self) -> float:
        """Largest magnitude that absmax scaling maps to (the positive end, or |qmin| for int1)."""
        return float(self.qmax if self.qmax > 0 else -self.qmin)

    def grid(self) -> np.ndarray:
        return np.arange(self.qmin, self.qmax + 1, dtype=np.float32)

    def round(self, v, stochastic_noise=None):
        if stochastic_noise is not None:
            r = jnp.floor(v + stochastic_noise)
        else:
            r = _round_half_even(v)
        r = jnp.clip(r, self.qmin, self.qmax)
        # an integer code has no negative zero (XLA folds "+ 0.0", so select)
        return jnp.where(r == 0, 0.0, r)

    def encode(self, v):
        return v.astype(jnp.int8 if self.signed else jnp.uint8)

    def decode(self, codes):
        return codes.astype(jnp.float32)

    def code_bits(self, codes):
        """Codes as unsigned ``bits``-bit patterns (for packing)."""
        return (codes.astype(jnp.int32) & (2**self.bits - 1)).astype(jnp.uint8)

    def from_code_bits(self, bits):
        b = bits.astype(jnp.int32)
        if self.signed:
            b = jnp.where(b >= 2 ** (self.bits - 1), b - 2**self.bits, b)
        return self.encode(b)


@dataclasses.dataclass(frozen=True)
class FixedPointFormat:
    """Two's complement ``bits``-bit integer codes read with ``frac`` fraction bits: a code ``c``
    means ``c * 2**-frac``. OCP MX v1.0's MXINT8 element is ``FixedPointFormat(8, 6)`` (name
    ``int8f6``): 8-bit two's complement with an implicit scale of 2^-6, values
    ``[-2, 127/64]``. The code -128 (-2.0) is used, as two's complement allows: a value that
    rounds below -127/64 gets it, while the positive end saturates at 127/64.

    Example:
        >>> f = FixedPointFormat(8, 6)
        >>> f.name, f.max_abs, f.qmin
        ('int8f6', 1.984375, -2.0)
        >>> import jax.numpy as jnp
        >>> f.encode(f.round(jnp.array([0.3, -1.999, 5.0]))).tolist()
        [19, -128, 127]
    """

    bits: int = 8
    frac: int = 6

    def __post_init__(self):
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"FixedPointFormat.bits must be an integer in 2..8, got {self.bits!r}")
        if not isinstance(self.frac, int) or not 0 <= self.frac < self.bits:
            raise ValueError(f"FixedPointFormat.frac must be an integer in 0..bits-1, got {self.frac!r}")

    @property
    def name(self) -> str:
        return f"int{self.bits}f{self.frac}"

    @property
    def is_int(self) -> bool:
        return False

    @property
    def _unit(self) -> float:
        return 2.0**-self.frac

    @property
    def qmin(self) -> float:
        return -(2 ** (self.bits - 1)) * self._unit

    @property
    def qmax(self) -> float:
        return (2 ** (self.bits - 1) - 1) * self._unit

    @property
    def max_abs(self) -> float:
        return self.qmax

    def grid(self) -> np.ndarray:
        return np.arange(-(2 ** (self.bits - 1)), 2 ** (self.bits - 1), dtype=np.float32) * np.float32(self._unit)

    def round(self, v, stochastic_noise=None):
        c = v * (2.0**self.frac)  # exact: a power of two
        c = jnp.floor(c + stochastic_noise) if stochastic_noise is not None else _round_half_even(c)
        c = jnp.clip(c, -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1)
        return jnp.where(c == 0, 0.0, c) * self._unit

    def encode(self, v):
        return (v * (2.0**self.frac)).astype(jnp.int8)

    def decode(self, codes):
        return codes.astype(jnp.float32) * self._unit

    def code_bits(self, codes):
        return (codes.astype(jnp.int32) & (2**self.bits - 1)).astype(jnp.uint8)

    def from_code_bits(self, bits):
        b = bits.astype(jnp.int32)
        return jnp.where(b >= 2 ** (self.bits - 1), b - 2**self.bits, b).astype(jnp.int8)


@dataclasses.dataclass(frozen=True)
class FloatFormat:
    """A minifloat eXmY: 1 sign bit, ``exp`` exponent bits, ``man`` mantissa bits.

    Values saturate at the largest finite magnitude; no inf or NaN codes are produced.
    ``finite_only=True`` is the OCP/"fn" convention (e4m3fn): only the all-ones
    exponent with all-ones mantissa is reserved (NaN), so the top binade holds normal values.
    ``finite_only=False`` is IEEE-like (e5m2): the all-ones exponent is reserved for inf/NaN.
    Formats of 6 bits or fewer (e3m2, e2m3, e2m1) have no reserved codes at all (``ieee=False``,
    ``finite_only=False`` with ``no_specials=True``).

    Example:
        >>> FloatFormat(4, 3, finite_only=True).max_abs
        448.0
        >>> FloatFormat(5, 2).max_abs
        57344.0
    """

    exp: int
    man: int
    finite_only: bool = False
    no_specials: bool = False
    bias: int | None = None

    def __post_init__(self):
        if not (1 <= self.exp <= 8 and 0 <= self.man <= 7 and 1 + self.exp + self.man <= 8):
            raise ValueError(
                f"FloatFormat needs 1 <= exp <= 8, 0 <= man <= 7 and 1+exp+man <= 8 bits, "
                f"got exp={self.exp}, man={self.man}"
            )

    @property
    def name(self) -> str:
        known = {v: k for k, v in _FLOAT_ALIASES.items()}
        return known.get(self, f"e{self.exp}m{self.man}")

    @property
    def is_int(self) -> bool:
        return False

    @property
    def bits(self) -> int:
        return 1 + self.exp + self.man

    @property
    def exp_bias(self) -> int:
        return self.bias if self.bias is not None else 2 ** (self.exp - 1) - 1

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal number."""
        return 1 - self.exp_bias

    @property
    def emax(self) -> int:
        top = 2**self.exp - 1
        if self.no_specials or self.finite_only:
            return top - self.exp_bias
        return top - 1 - self.exp_bias

    @property
    def max_abs(self) -> float:
        if self.finite_only and not self.no_specials:
            # all-ones exponent: mantissa all-ones is NaN, so the top mantissa is 2^man - 2
            frac = 1 + (2**self.man - 2) / 2**self.man if self.man > 0 else 1.0
            if self.man == 0:
                return float(2.0 ** (self.emax - 1))
            return float(frac * 2.0**self.emax)
        return float((2 - 2.0**-self.man) * 2.0**self.emax)

    @property
    def min_subnormal(self) -> float:
        return float(2.0 ** (self.emin - self.man))

    @property
    def qmin(self) -> float:
        return -self.max_abs

    @property
    def qmax(self) -> float:
        return self.max_abs

    def grid(self) -> np.ndarray:
        return _float_grid(self)

    def round(self, v, stochastic_noise=None):
        """Round to the nearest representable value (ties to even), saturating at max_abs."""
        a = jnp.abs(v)
        _, e = jnp.frexp(a)  # a = f * 2**e, f in [0.5, 1)
        step_exp = jnp.maximum(e - 1, self.emin) - self.man
        step_exp = step_exp.astype(jnp.int32)
        scaled = jnp.ldexp(a, -step_exp)
        if stochastic_noise is not None:
            r = jnp.floor(scaled + stochastic_noise)
        else:
            r = _round_half_even(scaled)
        q = jnp.ldexp(r, step_exp)
        q = jnp.minimum(q, self.max_abs)
        return jnp.where(jnp.isnan(v), v, jnp.copysign(q, v))

    def encode(self, v):
        """Bit pattern sign|exponent|mantissa (uint8) of grid values."""
        a = jnp.abs(v)
        sign = (jnp.signbit(v)).astype(jnp.int32)
        _, e = jnp.frexp(a)
        e_unb = jnp.maximum(e - 1, self.emin)
        is_normal = a >= 2.0**self.emin
        biased = jnp.where(is_normal, e_unb + self.exp_bias, 0)
        mant_scaled = jnp.ldexp(a, (self.man - e_unb).astype(jnp.int32))
        mant = jnp.where(is_normal, mant_scaled - 2**self.man, mant_scaled)
        mant = jnp.round(mant).astype(jnp.int32)
        code = (sign << (self.exp + self.man)) | (biased.astype(jnp.int32) << self.man) | mant
        return code.astype(jnp.uint8)

    def decode(self, codes):
        c = codes.astype(jnp.int32)
        sign = (c >> (self.exp + self.man)) & 1
        biased = (c >> self.man) & (2**self.exp - 1)
        mant = (c & (2**self.man - 1)).astype(jnp.float32)
        normal = jnp.ldexp(1.0 + mant / 2**self.man, (biased - self.exp_bias).astype(jnp.int32))
        sub = jnp.ldexp(mant / 2**self.man, jnp.int32(self.emin))
        mag = jnp.where(biased == 0, sub, normal)
        return jnp.where(sign == 1, -mag, mag)

    def code_bits(self, codes):
        return codes.astype(jnp.uint8)

    def from_code_bits(self, bits):
        return bits.astype(jnp.uint8)


@functools.lru_cache(maxsize=None)
def _float_grid(fmt: FloatFormat) -> np.ndarray:
    vals = set()
    for biased in range(2**fmt.exp):
        for m in range(2**fmt.man):
            if biased == 0:
                v = m / 2**fmt.man * 2.0**fmt.emin
            else:
                v = (1 + m / 2**fmt.man) * 2.0 ** (biased - fmt.exp_bias)
            if v <= fmt.max_abs:
                vals.add(v)
    pos = np.array(sorted(vals), dtype=np.float64)
    return np.concatenate([-pos[::-1][:-1], pos]).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class CodebookFormat:
    """A lookup table of values (NF4, bitsandbytes FP4, or your own).

    ``values`` are stored in code order: code ``i`` decodes to ``values[i]``. Rounding picks
    the nearest table value (a tie goes to the larger value). Absmax scaling maps the largest
    magnitude in the table to the largest magnitude in the data.

    Example:
        >>> cb = codebook("ternary", [-1.0, 0.0, 1.0])
        >>> cb.bits
        2
    """

    name: str
    values: tuple

    def __post_init__(self):
        vals = np.asarray(self.values, dtype=np.float64)
        if vals.ndim != 1 or vals.size < 2 or vals.size > 256:
            raise ValueError(f"CodebookFormat.values must hold 2..256 numbers, got {vals.size}")
        if not np.all(np.isfinite(vals)):
            raise ValueError("CodebookFormat.values must be finite")
        if len(set(vals.tolist())) < 2:
            raise ValueError("CodebookFormat.values must hold at least 2 distinct numbers")

    @property
    def is_int(self) -> bool:
        return False

    @property
    def bits(self) -> int:
        return max(1, int(np.ceil(np.log2(len(self.values)))))

    @property
    def max_abs(self) -> float:
        return float(np.max(np.abs(np.asarray(self.values, np.float32))))

    @property
    def qmin(self) -> float:
        return float(np.min(np.asarray(self.values, np.float32)))

    @property
    def qmax(self) -> float:
        return float(np.max(np.asarray(self.values, np.float32)))

    def grid(self) -> np.ndarray:
        return np.sort(np.asarray(self.values, np.float32))

    def _sorted(self):
        vals = np.asarray(self.values, np.float32)
        # equal values (e.g. +0 and -0) collapse onto their lowest code
        sv, order = np.unique(vals, return_index=True)
        mids = ((sv[1:].astype(np.float64) + sv[:-1]) / 2).astype(np.float32)
        return sv, order, mids

    def _index(self, v):
        sv, _, mids = self._sorted()
        # number of midpoints <= v: the index into the sorted table (ties go up)
        idx = jnp.zeros(v.shape, jnp.int32)
        for m in mids:
            idx = idx + (v >= m).astype(jnp.int32)
        return idx

    def round(self, v, stochastic_noise=None):
        sv, _, _ = self._sorted()
        if stochastic_noise is not None:
            return self.decode(self._stochastic_codes(v, stochastic_noise))
        idx = self._index(v)
        out = jnp.asarray(sv)[idx]
        return jnp.where(jnp.isnan(v), v, out)

    def _stochastic_codes(self, v, u):
        sv, order, _ = self._sorted()
        svj = jnp.asarray(sv)
        vc = jnp.clip(v, sv[0], sv[-1])
        lo = jnp.clip(jnp.searchsorted(svj, vc, side="right") - 1, 0, len(sv) - 2)
        a, b = svj[lo], svj[lo + 1]
        frac = (vc - a) / (b - a)
        pick = lo + (u < frac).astype(lo.dtype)
        return jnp.asarray(order.astype(np.uint8))[pick]

    def encode(self, v):
        """Code (index into ``values``) of grid values."""
        _, order, _ = self._sorted()
        return jnp.asarray(order.astype(np.uint8))[self._index(v)]

    def decode(self, codes):
        return jnp.asarray(np.asarray(self.values, np.float32))[codes.astype(jnp.int32)]

    def code_bits(self, codes):
        return codes.astype(jnp.uint8)

    def from_code_bits(self, bits):
        return bits.astype(jnp.uint8)


Format = Union[IntFormat, FixedPointFormat, FloatFormat, CodebookFormat]

# bitsandbytes' NF4 table (QLoRA), in code order.
NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
# bitsandbytes' FP4 (code = sign|e1 e0|m, an e2m1 variant normalised to max 1), in code order.
BNB_FP4_VALUES = tuple(
    s * v
    for s in (1.0, -1.0)
    for v in (0.0, 1 / 192, 2 / 3, 1.0, 1 / 3, 1 / 2, 1 / 6, 1 / 4)
)

_FLOAT_ALIASES = {
    "fp8_e4m3": FloatFormat(4, 3, finite_only=True),
    "fp8_e5m2": FloatFormat(5, 2),
    "fp6_e3m2": FloatFormat(3, 2, no_specials=True),
    "fp6_e2m3": FloatFormat(2, 3, no_specials=True),
    "fp4_e2m1": FloatFormat(2, 1, no_specials=True),
}


def codebook(name: str, values) -> CodebookFormat:
    """A user-defined lookup-table format.

    Example:
        >>> cb = codebook("pow2", [-4, -2, -1, 0, 1, 2, 4])
        >>> cb.bits
        3
    """
    return CodebookFormat(str(name), tuple(float(v) for v in values))


_NAMED_CODEBOOKS = {
    "nf4": CodebookFormat("nf4", NF4_VALUES),
    "fp4_bnb": CodebookFormat("fp4_bnb", BNB_FP4_VALUES),
}

FORMAT_NAMES = (
    [f"int{b}" for b in range(1, 9)]
    + [f"uint{b}" for b in range(1, 9)]
    + [f"int{b}n" for b in range(2, 9)]
    + ["int<b>f<frac> (fixed point, e.g. int8f6)"]
    + list(_FLOAT_ALIASES)
    + ["eXmY (e.g. e3m4)"]
    + list(_NAMED_CODEBOOKS)
)


def get_format(name) -> Format:
    """Look up a format by name (or pass a format through).

    Names: ``int1``..``int8``, ``uint1``..``uint8``, ``int2n``..``int8n`` (narrow),
    ``int8f6`` (fixed point: int8 codes times 2^-6, the MXINT8 element), ``fp8_e4m3``, ``fp8_e5m2``, ``fp6_e3m2``, ``fp6_e2m3``, ``fp4_e2m1``, any ``eXmY``
    (saturating, no reserved codes), ``nf4``, ``fp4_bnb``.

    Example:
        >>> get_format("int4n").qmin
        -7
    """
    if isinstance(name, (IntFormat, FixedPointFormat, FloatFormat, CodebookFormat)):
        return name
    if not isinstance(name, str):
        raise TypeError(f"format must be a name or a format object, got {type(name).__name__}")
    key = name.strip().lower()
    if key in _FLOAT_ALIASES:
        return _FLOAT_ALIASES[key]
    if key in _NAMED_CODEBOOKS:
        return _NAMED_CODEBOOKS[key]
    alias = {"fp8": "fp8_e4m3", "e4m3": "fp8_e4m3", "e4m3fn": "fp8_e4m3", "e5m2": "fp8_e5m2",
             "fp6": "fp6_e3m2", "e3m2": "fp6_e3m2", "e2m3": "fp6_e2m3", "fp4": "fp4_e2m1",
             "e2m1": "fp4_e2m1"}  # fmt: skip
    if key in alias:
        return _FLOAT_ALIASES[alias[key]]
    m = re.fullmatch(r"(u?)int([1-8])(n?)", key)
    if m:
        return IntFormat(int(m.group(2)), signed=not m.group(1), narrow=bool(m.group(3)))
    m = re.fullmatch(r"int([2-8])f([0-7])", key)
    if m:
        return FixedPointFormat(int(m.group(1)), int(m.group(2)))
    m = re.fullmatch(r"e([1-8])m([0-7])", key)
    if m:
        return FloatFormat(int(m.group(1)), int(m.group(2)), no_specials=True)
    raise ValueError(f"format: unknown name {name!r}; allowed: {', '.join(FORMAT_NAMES)}")
