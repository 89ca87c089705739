"""qlab.numerics: number formats and fake-quant ops in pure JAX (no Flax, no I/O)."""

from qlab.numerics.formats import (
    BNB_FP4_VALUES,
    FORMAT_NAMES,
    NF4_VALUES,
    CodebookFormat,
    FixedPointFormat,
    FloatFormat,
    IntFormat,
    codebook,
    get_format,
)
from qlab.numerics.granularity import PerBlock, PerChannel, PerGroup, PerTensor, per_block, per_channel, per_group, per_tensor
from qlab.numerics.learned import lsq_fake_quant, lsq_grad_scale, lsq_init_step, pact_fake_quant, round_ste, scale_grad
from qlab.numerics.matmul import int_matmul_supported, quantized_matmul, quantized_matmul_codes
from qlab.numerics.packing import (
    bits_per_weight,
    pack_bits,
    pack_qtensor,
    packed_nbytes,
    scale_count,
    unpack_bits,
    unpack_qtensor,
)
from qlab.numerics.metrics import quant_error, sqnr_db
from qlab.numerics.qtensor import QTensor
from qlab.numerics.quantize import dequantize, dequantize_rows, fake_quant, fake_quant_range, quantize
from qlab.numerics.spec import MSE, PRESETS, Absmax, Fixed, MinMax, Percentile, QuantSpec, as_spec, bit_width_family, parse_spec

__all__ = [
    "BNB_FP4_VALUES",
    "FORMAT_NAMES",
    "NF4_VALUES",
    "CodebookFormat",
    "FixedPointFormat",
    "FloatFormat",
    "IntFormat",
    "codebook",
    "get_format",
    "PerBlock",
    "PerChannel",
    "PerGroup",
    "PerTensor",
    "per_block",
    "per_channel",
    "per_group",
    "per_tensor",
    "lsq_fake_quant",
    "lsq_grad_scale",
    "lsq_init_step",
    "pact_fake_quant",
    "round_ste",
    "scale_grad",
    "int_matmul_supported",
    "quantized_matmul",
    "quantized_matmul_codes",
    "bits_per_weight",
    "pack_bits",
    "pack_qtensor",
    "packed_nbytes",
    "scale_count",
    "unpack_bits",
    "unpack_qtensor",
    "QTensor",
    "dequantize",
    "dequantize_rows",
    "fake_quant",
    "fake_quant_range",
    "quant_error",
    "quantize",
    "sqnr_db",
    "MSE",
    "PRESETS",
    "Absmax",
    "Fixed",
    "MinMax",
    "Percentile",
    "QuantSpec",
    "as_spec",
    "bit_width_family",
    "parse_spec",
]
