"""QuantSpec: everything that defines one quantizer, as a frozen dataclass and a short string.

String grammar (tokens separated by ``/``, any order after the format)::

    int4/g128/sym         format, granularity, symmetric
    int8/ch               per-channel (natural axis), symmetric
    int8/tensor/asym      per-tensor with a zero point
    fp8_e4m3              minifloat, per tensor
    nf4/g64               codebook, groups of 64
    mxfp4  mxfp8  mxfp8_e5m2  mxfp6  mxfp6_e2m3  mxint8  nvfp4      block-format presets
    q8_0  q4_0  q4_1  q5_0  q5_1      llama.cpp's legacy block formats, bit for bit
    int4/g128/mse/s=bf16/sr   MSE clip search, bf16 scales, stochastic rounding

Granularity tokens: ``tensor``, ``ch`` / ``ch0`` (axis), ``g128`` / ``g128a0`` (axis) /
``g100p`` (pad), ``b128x128``. Range tokens: ``absmax``, ``minmax``, ``p99.9``, ``mse``,
``mse(50)``, ``fixed(-1,1)``. Scale dtype: ``s=f32|f16|bf16|e8m0|e4m3``. Rounding: ``rne``
(default), ``sr``, ``half_away`` or ``biased_trunc``. Others: ``zp=float|min``, ``ste=identity``,
``absmax_to=qmin|qmax+0.5|signed_extreme``, ``cs=f32``, ``ts`` (an extra per-tensor f32 scale,
as NVFP4).

Scale convention (libraries differ; ours is selectable): symmetric absmax scaling maps the
largest magnitude to the format's largest positive value, ``scale = absmax / qmax``
(``absmax/(2^(b-1)-1)`` for signed ints, ``absmax/6`` for fp4_e2m1, ``absmax/1`` for NF4).
``absmax_to="qmin"`` maps it to ``|qmin|`` instead (``absmax/2^(b-1)``, as llama.cpp-style
kernels do; the top value then clips by one step). ``absmax_to="qmax+0.5"`` divides by
``qmax + 0.5`` (Qwix's and AQT's default: the top value lands on a half-way point and clips to
qmax). ``absmax_to="signed_extreme"`` maps the value of largest magnitude, with its sign (the
first one on a tie), to ``qmin``: ``scale = extreme / qmin``, negative when the extreme is
positive, so that value never clips (llama.cpp's Q4_0 / Q5_0). Asymmetric: ``scale = (max-min)/(qmax-qmin)``
over a range widened to include 0, ``zero_point = qmin - round(min/scale)``, stored in ``bits``
bits; ``zero_point="min"`` keeps the group minimum itself, in value units (``x = code * scale +
min``, unsigned formats, range not widened to include 0: llama.cpp's Q4_1 / Q5_1). E8M0 scales follow the OCP MX rule ``2^(floor(log2(absmax)) - floor(log2(qmax)))``; MXINT8's
element is the fixed-point ``int8f6`` (int8 codes times 2^-6, qmax 127/64), so its stored E8M0
scale is OCP's X and its packed bytes read as OCP MXINT8.
Codes are ``round(x * (1/scale))`` with ``1/scale`` computed once per scale in float32 (as
PyTorch's fake_quantize and AQT do; XLA rewrote some ``x / scale`` that way and not others), and
a symmetric scale is ``absmax * (1/qmax)``; against ``x / scale`` this moves a value only when
``x / scale`` lies within a float32 rounding of a half-way point.

llama.cpp derives codes differently, and ``code_scale="f32"`` (token ``cs=f32``) reproduces it:
the float32 scale is computed by division (``amax / 127``), codes are ``x * (1 / scale)`` with
that unrounded scale (``1 / 0`` taken as 0), and only then is the scale cast to its storage
dtype (no clamping: a tiny scale stores as 0). Its rounding rules: ``half_away`` (C ``roundf``,
Q8_0) and ``biased_trunc`` (the code shifted to start at 0, plus 0.5 in float32, truncated:
``(int)(x * id + 8.5f)`` for Q4_0), which moves some values within a float32 ulp of a half-way
point by one step.

Example:
    >>> spec = parse_spec("int4/g128")
    >>> str(spec)
    'int4/g128'
    >>> spec.granularity
    PerGroup(size=128, axis=None, pad=False)
"""

from __future__ import annotations

import dataclasses
import re
from typing import Union

from qlab.numerics.formats import CodebookFormat, Format, IntFormat, get_format
from qlab.numerics.granularity import (
    Granularity,
    PerBlock,
    PerChannel,
    PerGroup,
    PerTensor,
    per_group,
)

__all__ = [
    "Absmax",
    "MinMax",
    "Percentile",
    "MSE",
    "Fixed",
    "RangeMethod",
    "QuantSpec",
    "parse_spec",
    "as_spec",
    "PRESETS",
    "SCALE_DTYPES",
]

SCALE_DTYPES = {"f32": 32, "f16": 16, "bf16": 16, "e8m0": 8, "e4m3": 8}


@dataclasses.dataclass(frozen=True)
class Absmax:
    """Range = largest finite magnitude (min and max for asymmetric specs)."""

    def token(self):
        return "absmax"


@dataclasses.dataclass(frozen=True)
class MinMax:
    """Range = [min, max] of finite values (identical to absmax for symmetric specs)."""

    def token(self):
        return "minmax"


@dataclasses.dataclass(frozen=True)
class Percentile:
    """Range = the ``q``-th percentile of |x| (symmetric) or [100-q, q] percentiles (asymmetric)."""

    q: float = 99.9

    def __post_init__(self):
        if not 0 < self.q <= 100:
            raise ValueError(f"Percentile.q must be in (0, 100], got {self.q}")

    def token(self):
        return f"p{self.q:g}"


@dataclasses.dataclass(frozen=True)
class MSE:
    """Clip search: try ``grid`` ratios of the absmax/min-max range, evenly from 1 down to
    ``min_ratio``, and keep per scale group the one with the least sum of |error|^``norm``."""

    grid: int = 100
    min_ratio: float = 0.2
    norm: float = 2.0

    def __post_init__(self):
        if self.grid < 1:
            raise ValueError(f"MSE.grid must be >= 1, got {self.grid}")
        if not 0 < self.min_ratio <= 1:
            raise ValueError(f"MSE.min_ratio must be in (0, 1], got {self.min_ratio}")

    def token(self):
        return "mse" if self == MSE() else f"mse({self.grid})"


@dataclasses.dataclass(frozen=True)
class Fixed:
    """A fixed range [lo, hi] (symmetric specs use max(|lo|, |hi|))."""

    lo: float
    hi: float

    def __post_init__(self):
        if not self.lo <= self.hi:
            raise ValueError(f"Fixed range needs lo <= hi, got lo={self.lo}, hi={self.hi}")

    def token(self):
        return f"fixed({self.lo:g},{self.hi:g})"


RangeMethod = Union[Absmax, MinMax, Percentile, MSE, Fixed]
RANGE_NAMES = "absmax, minmax, pNN (percentile, e.g. p99.9), mse, mse(N), fixed(lo,hi)"


def _parse_range(tok: str):
    t = tok.strip().lower()
    if t == "absmax":
        return Absmax()
    if t == "minmax":
        return MinMax()
    if t == "mse":
        return MSE()
    m = re.fullmatch(r"mse\((\d+)\)", t)
    if m:
        return MSE(grid=int(m.group(1)))
    m = re.fullmatch(r"p(\d+(?:\.\d+)?)", t)
    if m:
        return Percentile(float(m.group(1)))
    m = re.fullmatch(r"fixed\(\s*([-+0-9.e]+)\s*,\s*([-+0-9.e]+)\s*\)", t)
    if m:
        return Fixed(float(m.group(1)), float(m.group(2)))
    return None


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """One quantizer: format, granularity, symmetry, range method, scale storage, rounding.

    Fields:
        fmt: a format or its name (``"int4"``, ``"fp8_e4m3"``, ``"nf4"``, ...).
        granularity: ``per_tensor()``, ``per_channel(axis)``, ``per_group(G, axis)``, ``per_block(r, c)``.
        symmetric: no zero point (True) or an integer zero point (False; integer formats only).
        range: ``"absmax"``, ``"minmax"``, ``"p99.9"``, ``"mse"`` or a RangeMethod object.
        scale_dtype: how scales are stored: ``"f32"``, ``"f16"``, ``"bf16"``, ``"e8m0"``, ``"e4m3"``.
        rounding: ``"nearest"`` (to nearest, ties to even), ``"stochastic"`` (needs a PRNG key),
            ``"half_away"`` (ties away from zero, exactly) or ``"biased_trunc"`` (llama.cpp's
            ``(int)(v - qmin + 0.5f) + qmin`` in float32; see the module docstring).
        ste: gradient of fake_quant: ``"clipped"`` (zero outside the clip range, one on and
            inside its boundary) or ``"identity"`` (one everywhere).
        zero_point: ``"int"`` (rounded, stored in ``bits`` bits), ``"float"`` (as HQQ; stored
            like a scale) or ``"min"`` (the group minimum in value units, stored like a scale).
        absmax_to: ``"qmax"`` (scale = absmax/qmax), ``"qmin"`` (scale = absmax/|qmin|),
            ``"qmax+0.5"`` (scale = absmax/(qmax+0.5), Qwix/AQT) or ``"signed_extreme"``
            (scale = extreme/qmin, llama.cpp Q4_0).
        code_scale: ``"stored"`` (codes use the scale as stored) or ``"f32"`` (codes use the
            float32 scale before storage rounding, as llama.cpp).
        tensor_scale: an extra per-tensor f32 scale so that block scales fit their dtype (NVFP4).

    Example:
        >>> QuantSpec("int4", per_group(128))
        QuantSpec('int4/g128')
    """

    fmt: Format
    granularity: Granularity = PerTensor()
    symmetric: bool = True
    range: RangeMethod = Absmax()
    scale_dtype: str = "f16"
    rounding: str = "nearest"
    ste: str = "clipped"
    zero_point: str = "int"
    absmax_to: str = "qmax"
    tensor_scale: bool = False
    code_scale: str = "stored"

    def __post_init__(self):
        object.__setattr__(self, "fmt", get_format(self.fmt))
        if isinstance(self.range, str):
            r = _parse_range(self.range)
            if r is None:
                raise ValueError(f"QuantSpec.range: unknown {self.range!r}; allowed: {RANGE_NAMES}")
            object.__setattr__(self, "range", r)
        if not isinstance(self.granularity, (PerTensor, PerChannel, PerGroup, PerBlock)):
            raise ValueError(
                "QuantSpec.granularity must be per_tensor(), per_channel(axis), per_group(size) "
                f"or per_block(rows, cols), got {self.granularity!r}"
            )
        _check_choice("scale_dtype", self.scale_dtype, tuple(SCALE_DTYPES))
        _check_choice("rounding", self.rounding, ROUNDINGS)
        _check_choice("ste", self.ste, ("clipped", "identity"))
        _check_choice("zero_point", self.zero_point, ("int", "float", "min"))
        _check_choice("absmax_to", self.absmax_to, ABSMAX_TO)
        _check_choice("code_scale", self.code_scale, ("stored", "f32"))
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"QuantSpec.symmetric must be True or False, got {self.symmetric!r}")
        if not self.symmetric and not isinstance(self.fmt, IntFormat):
            raise ValueError(
                f"QuantSpec.symmetric=False (a zero point) is supported for integer formats only "
                f"(int1..int8, uint1..uint8), not {self.fmt.name}"
            )
        signed_int = isinstance(self.fmt, IntFormat) and self.fmt.signed
        if self.absmax_to in ("qmin", "signed_extreme") and not signed_int:
            raise ValueError(f"QuantSpec.absmax_to={self.absmax_to!r} applies to signed integer formats only")
        if self.absmax_to == "signed_extreme" and self.scale_dtype not in ("f32", "f16", "bf16"):
            raise ValueError("QuantSpec.absmax_to='signed_extreme' makes negative scales: "
                             "scale_dtype must be f32, f16 or bf16")
        if self.rounding in ("half_away", "biased_trunc") and not isinstance(self.fmt, IntFormat):
            raise ValueError(f"QuantSpec.rounding={self.rounding!r} applies to integer formats only")
        if self.zero_point == "min":
            if self.symmetric or not isinstance(self.fmt, IntFormat) or self.fmt.signed:
                raise ValueError("QuantSpec.zero_point='min' needs an asymmetric unsigned integer "
                                 "spec (e.g. 'uint4/g32/asym/zp=min')")
        if self.code_scale == "f32":
            if self.tensor_scale or self.scale_dtype in ("e8m0", "e4m3"):
                raise ValueError("QuantSpec.code_scale='f32' needs an f32/f16/bf16 scale and no tensor scale")
            if not self.symmetric and self.zero_point != "min":
                raise ValueError("QuantSpec.code_scale='f32' with a zero point needs zero_point='min'")

    # ---- derived -------------------------------------------------------------------
    @property
    def bits(self) -> int:
        return self.fmt.bits

    @property
    def scale_bits(self) -> int:
        return SCALE_DTYPES[self.scale_dtype]

    @property
    def zero_point_bits(self) -> int:
        if self.symmetric:
            return 0
        return self.fmt.bits if self.zero_point == "int" else self.scale_bits

    @property
    def absmax_divisor(self):
        """What a symmetric scale divides the clip range by: ``fmt.max_abs``, ``|qmin|`` with
        ``absmax_to="qmin"`` or ``"signed_extreme"`` (which keeps the sign), ``qmax + 0.5`` with
        ``"qmax+0.5"`` (see the scale convention above)."""
        if self.absmax_to == "qmax+0.5":
            return self.fmt.max_abs + 0.5
        return self.fmt.max_abs if self.absmax_to == "qmax" else -self.fmt.qmin

    def resolve(self, channel_axis: int, contract_axis: int) -> "QuantSpec":
        """Fill in ``axis=None`` granularities for a layer weight: per-channel scales follow
        ``channel_axis`` and groups run along ``contract_axis``.

        Example:
            >>> parse_spec("int4/g128").resolve(channel_axis=1, contract_axis=0).granularity
            PerGroup(size=128, axis=0, pad=False)
        """
        g = self.granularity.resolve(channel_axis, contract_axis)
        return self if g == self.granularity else dataclasses.replace(self, granularity=g)

    def replace(self, **changes) -> "QuantSpec":
        """A copy with some fields changed (``spec.replace(fmt="int3")``)."""
        return dataclasses.replace(self, **changes)

    # ---- string form -------------------------------------------------------------------
    def __str__(self) -> str:
        for name, preset in PRESETS.items():
            if preset == self:
                return name
        toks = [self.fmt.name if not isinstance(self.fmt, CodebookFormat) else self.fmt.name]
        if not isinstance(self.granularity, PerTensor):
            toks.append(self.granularity.token())
        if not self.symmetric:
            toks.append("asym")
        if self.range != Absmax():
            toks.append(self.range.token())
        if self.scale_dtype != "f16":
            toks.append(f"s={self.scale_dtype}")
        if self.rounding == "stochastic":
            toks.append("sr")
        if self.ste != "clipped":
            toks.append(f"ste={self.ste}")
        if self.zero_point != "int":
            toks.append(f"zp={self.zero_point}")
        if self.rounding in ("half_away", "biased_trunc"):
            toks.append(self.rounding)
        if self.absmax_to != "qmax":
            toks.append(f"absmax_to={self.absmax_to}")
        if self.code_scale != "stored":
            toks.append(f"cs={self.code_scale}")
        if self.tensor_scale:
            toks.append("ts")
        return "/".join(toks)

    def __repr__(self) -> str:
        if isinstance(self.fmt, CodebookFormat) and self.fmt.name not in ("nf4", "fp4_bnb"):
            return (
                f"QuantSpec(fmt={self.fmt!r}, granularity={self.granularity!r}, "
                f"range={self.range!r})"
            )
        return f"QuantSpec({str(self)!r})"


ROUNDINGS = ("nearest", "stochastic", "half_away", "biased_trunc")
ABSMAX_TO = ("qmax", "qmin", "qmax+0.5", "signed_extreme")


def _check_choice(field, value, allowed):
    if value not in allowed:
        raise ValueError(f"QuantSpec.{field}: got {value!r}; allowed: {', '.join(map(repr, allowed))}")


def _mx(elem: str, block: int = 32, scale: str = "e8m0", ts: bool = False) -> QuantSpec:
    return QuantSpec(elem, per_group(block), scale_dtype=scale, tensor_scale=ts)


# OCP Microscaling v1.0 block formats (block 32, E8M0 shared scale) and NVIDIA's NVFP4
# (block 16, E4M3 block scale under a per-tensor f32 scale).
PRESETS = {
    "mxfp8": _mx("fp8_e4m3"),
    "mxfp8_e5m2": _mx("fp8_e5m2"),
    "mxfp6": _mx("fp6_e3m2"),
    "mxfp6_e2m3": _mx("fp6_e2m3"),
    "mxfp4": _mx("fp4_e2m1"),
    "mxint8": _mx("int8f6"),  # OCP: int8 elements with an implicit 2^-6, so the E8M0 byte is X
    "nvfp4": _mx("fp4_e2m1", 16, "e4m3", ts=True),
}


def _ggml(fmt: str, **kw) -> QuantSpec:
    return QuantSpec(fmt, per_group(32), code_scale="f32", **kw)


# llama.cpp's legacy block formats (ggml-quants.c quantize_row_*_ref): blocks of 32 along the
# input axis, f16 scales; codes from the f32 scale.
PRESETS.update({
    "q8_0": _ggml("int8", rounding="half_away"),
    "q4_0": _ggml("int4", absmax_to="signed_extreme", rounding="biased_trunc"),
    "q5_0": _ggml("int5", absmax_to="signed_extreme", rounding="biased_trunc"),
    "q4_1": _ggml("uint4", symmetric=False, zero_point="min", rounding="biased_trunc"),
    "q5_1": _ggml("uint5", symmetric=False, zero_point="min", rounding="biased_trunc"),
})
_PRESET_ALIASES = {"mxfp8_e4m3": "mxfp8", "mxfp6_e3m2": "mxfp6", "mxfp4_e2m1": "mxfp4"}


def parse_spec(text: str) -> QuantSpec:
    """Parse a short spec string (see the module docstring for the grammar).

    Example:
        >>> parse_spec("int8/tensor/asym").symmetric
        False
        >>> str(parse_spec("mxfp4"))
        'mxfp4'
    """
    if isinstance(text, QuantSpec):
        return text
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"spec: expected a non-empty string like 'int4/g128', got {text!r}")
    toks = [t.strip() for t in text.strip().split("/") if t.strip()]
    head = toks[0].lower()
    head = _PRESET_ALIASES.get(head, head)
    if head in PRESETS:
        fields = {f.name: getattr(PRESETS[head], f.name) for f in dataclasses.fields(QuantSpec)}
    else:
        try:
            fields = {"fmt": get_format(head)}
        except ValueError as e:
            raise ValueError(
                f"spec {text!r}: {e}; or a block preset: {', '.join(PRESETS)}"
            ) from None
    for tok in toks[1:]:
        t = tok.lower()
        if t == "tensor":
            fields["granularity"] = PerTensor()
        elif (m := re.fullmatch(r"ch(-?\d+)?", t)):
            fields["granularity"] = PerChannel(None if m.group(1) is None else int(m.group(1)))
        elif (m := re.fullmatch(r"g(\d+)(?:a(-?\d+))?(p?)", t)):
            ax = None if m.group(2) is None else int(m.group(2))
            fields["granularity"] = PerGroup(int(m.group(1)), ax, bool(m.group(3)))
        elif (m := re.fullmatch(r"b(\d+)x(\d+)", t)):
            fields["granularity"] = PerBlock(int(m.group(1)), int(m.group(2)))
        elif t in ("sym", "asym"):
            fields["symmetric"] = t == "sym"
        elif (r := _parse_range(t)) is not None:
            fields["range"] = r
        elif (m := re.fullmatch(r"(?:s|scale)=(\w+)", t)):
            fields["scale_dtype"] = m.group(1)
        elif t in ("sr", "stochastic"):
            fields["rounding"] = "stochastic"
        elif t in ("rne", "nearest"):
            fields["rounding"] = "nearest"
        elif t in ("half_away", "biased_trunc"):
            fields["rounding"] = t
        elif (m := re.fullmatch(r"ste=(\w+)", t)):
            fields["ste"] = m.group(1)
        elif (m := re.fullmatch(r"zp=(\w+)", t)):
            fields["zero_point"] = m.group(1)
        elif (m := re.fullmatch(r"absmax_to=([\w.+]+)", t)):
            fields["absmax_to"] = m.group(1)
        elif (m := re.fullmatch(r"cs=(\w+)", t)):
            fields["code_scale"] = m.group(1)
        elif t == "ts":
            fields["tensor_scale"] = True
        else:
            raise ValueError(
                f"spec {text!r}: unknown token {tok!r}; allowed: granularity (tensor, ch, ch<axis>, "
                f"g<size>, g<size>a<axis>, g<size>p, b<rows>x<cols>), sym|asym, range ({RANGE_NAMES}), "
                "s=<f32|f16|bf16|e8m0|e4m3>, sr|rne|half_away|biased_trunc, ste=<clipped|identity>, "
                "zp=<int|float|min>, absmax_to=<qmax|qmin|qmax+0.5|signed_extreme>, cs=<stored|f32>, ts"
            )
    return QuantSpec(**fields)


def bit_width_family(spec) -> QuantSpec:
    """``spec`` with an integer format's bit width set to 8 (signedness and narrow range kept; other
    formats unchanged). Specs with the same family differ at most in an integer bit width, which
    ``fake_quant(..., bits=)`` can trace, so models using them can train as one vmapped program.

    Example:
        >>> bit_width_family("int2/ch") == bit_width_family("int8/ch"), bit_width_family("int4/g32")
        (True, QuantSpec('int8/g32'))
    """
    s = as_spec(spec)
    f = s.fmt
    return s.replace(fmt=IntFormat(8, f.signed, f.narrow)) if isinstance(f, IntFormat) else s


def plain_absmax_int(spec) -> bool:
    """Whether ``spec`` is the plain integer family that qlab's integer matmul and CPU kernel take:
    a static-width integer format, symmetric, absmax range mapped to qmax or |qmin|, round to
    nearest, codes from the stored scale, no second-level scale, an f32/f16/bf16 scale.

    Example:
        >>> plain_absmax_int("int4/g128"), plain_absmax_int("int4/g128/asym"), plain_absmax_int("int8/s=e8m0")
        (True, False, False)
    """
    s = as_spec(spec)
    return (
        type(s.fmt) is IntFormat
        and s.symmetric
        and isinstance(s.range, Absmax)
        and s.rounding == "nearest"
        and s.absmax_to in ("qmax", "qmin")
        and s.code_scale == "stored"
        and not s.tensor_scale
        and s.scale_dtype in ("f32", "f16", "bf16")
    )


def as_spec(spec) -> QuantSpec | None:
    """Accept a QuantSpec, a spec string, or None (keep float).

    Example:
        >>> as_spec("int8/ch").bits
        8
    """
    if spec is None or isinstance(spec, QuantSpec):
        return spec
    return parse_spec(spec)

