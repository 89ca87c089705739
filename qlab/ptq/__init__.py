"""qlab.ptq: post-training quantization of pretrained models.

Two levels, one obvious place each:

* model level (this namespace): ``rtn(model, rules)``, ``gptq(model, rules, calibration_batches, ...)``,
  ``awq(...)``, ``hqq(model, rules)``, ``smoothquant(model, rules, calibration_batches, alpha=0.5)``
  return a quantized copy of an NNX model (``qlab.nn`` layers holding real codes + scales);
  ``ptq_info(qmodel)`` gives per-layer details of the run; ``calibrate_activations(qmodel, batches)`` turns the
  rules' dynamic per-tensor activation scales into static ones calibrated on data (SmoothQuant's O3). ``awq(..., share_scales=True)`` shares scales
  among layers reading one input so that ``fold_input_scales(qmodel)`` moves them into the norms before
  (no runtime divide: what GGUF export needs); ``ScaleGroup``/``scale_groups`` name those layers.
* array level, on one Flax kernel ``W (in, out)``: ``rtn_weight(W, spec)``, ``gptq_weight(W, H, spec, ...)``,
  ``awq_weight(W, X, spec, ...) -> (qtensor, s)``, ``hqq_weight(W, spec, ...)`` return a ``qlab.QTensor``;
  ``smoothquant_scales(act_absmax, W, alpha)``, ``outlier_columns(act_absmax, threshold=6.0)``; the paper's outlier-feature count ``outlier_dims`` /
  ``systematic_outliers`` and ``zero_input_features(model, {path: dims})``; AWQ's saliency ablation ``salient_channels``,
  ``rtn_keep_float``, ``rtn_scaled``.
  (They are also ``qlab.ptq.gptq.gptq`` etc. in their modules.)

Example:
    >>> import jax, jax.numpy as jnp, qlab
    >>> from qlab import ptq
    >>> X = jax.random.normal(jax.random.key(0), (256, 64))
    >>> W = jax.random.normal(jax.random.key(1), (64, 8))
    >>> q = ptq.gptq_weight(W, X.T @ X, "int4/g32")
    >>> err = lambda Q: float(jnp.sum((X @ (W - Q)) ** 2))
    >>> err(qlab.dequantize(q)) < err(qlab.dequantize(ptq.rtn_weight(W, "int4/g32")))
    True
"""

from qlab.ptq.awq import awq as awq_weight
from qlab.ptq.awq import awq_clip_search, awq_scale_search, awq_scales, awq_shared_scale_search
from qlab.ptq.fold import ScaleGroup, fold_input_scales, scale_groups
from qlab.ptq.gptq import gptq as gptq_weight
from qlab.ptq.gptq import inverse_hessian_cholesky
from qlab.ptq.hqq import hqq as hqq_weight
from qlab.ptq.hqq import shrink_lp
from qlab.ptq.outliers import (outlier_columns, outlier_dims, outlier_fraction, position_fractions,
                                systematic_outliers, zero_input_features)
from qlab.ptq.rtn import resolve_weight_spec
from qlab.ptq.saliency import rtn_keep_float, rtn_scaled, salient_channels
from qlab.ptq.rtn import rtn as rtn_weight
from qlab.ptq.smoothquant import apply_input_scale, smoothquant_scales

from qlab.ptq.apply import awq, calibrate_activations, gptq, hqq, ptq_info, rtn, smoothquant, weight_layers  # noqa: E402  (shadows module names)

__all__ = [
    "rtn",
    "gptq",
    "awq",
    "hqq",
    "smoothquant",
    "calibrate_activations",
    "ptq_info",
    "weight_layers",
    "rtn_weight",
    "gptq_weight",
    "awq_weight",
    "hqq_weight",
    "awq_scales",
    "awq_scale_search",
    "awq_shared_scale_search",
    "ScaleGroup",
    "scale_groups",
    "fold_input_scales",
    "awq_clip_search",
    "inverse_hessian_cholesky",
    "shrink_lp",
    "smoothquant_scales",
    "apply_input_scale",
    "outlier_columns",
    "outlier_fraction",
    "position_fractions",
    "outlier_dims",
    "systematic_outliers",
    "zero_input_features",
    "salient_channels",
    "rtn_keep_float",
    "rtn_scaled",
    "resolve_weight_spec",
]
