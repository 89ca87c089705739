"""Ablation 8 (issue #15): the sanity checks of a credible reproduction, on a small Gemma 3.

* "A quantizer at 32 bits equals the float model exactly" (Nagel et al. 2021, debugging step 1). qlab's grids are at
  most 8 bits wide (codes are stored in a byte), so there is no 32-bit quantizer to run; the check is split into
  what it is for: (a) the quantization machinery itself changes nothing (rules that keep every layer float, and
  layers wrapped only to capture statistics, give bit-identical outputs); (b) a quantizer is idempotent: a weight
  already on its grid comes back bit for bit, so re-quantizing an RTN model at its own spec changes nothing; (c)
  the error shrinks as it should with the bit width: about 6 dB of weight SQNR per bit from 2 to 8 bits, so the
  extrapolated 32-bit error (8 + 24 more bits, about 145 dB more) is below float32's own rounding.
* "Rescaling transforms (SmoothQuant, AWQ) leave float outputs unchanged within tolerance": the scales folded
  into the float model as the papers fold them (into the norm before q/k/v and gate/up; into v_proj's / up_proj's
  output columns before o_proj / down_proj), weights not quantized: the logits equal the float model's within
  float32 rounding.

``SANITY`` records the measured maximum differences (printed with ``pytest -s``); results/ablations/README.md
quotes them.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qlab
from qlab import nn as qnn
from qlab import ptq
from qlab.models.gemma3 import Gemma3, Gemma3Config
from qlab.nn import Rule
from qlab.ptq.fold import divide_output, gemma3_scale_groups, module_at

CFG = Gemma3Config.tiny(n_layers=2)
PROJ = r"layers/\d+/(attn|mlp)/\w+_proj"
BATCHES = [np.random.default_rng(i).integers(0, CFG.vocab_size, (2, 16)) for i in range(2)]
IDS = np.arange(1, 33)[None] % CFG.vocab_size
SANITY: dict[str, float] = {}


def _fwd(m, b):
    return m(b)


@pytest.fixture(scope="module")
def model():
    """A tiny Gemma whose pre-norms have spread-out weights: channels of very different size, as in trained
    models (so SmoothQuant / AWQ scales are far from 1 and the test means something)."""
    m = Gemma3(CFG, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    for blk in m.layers:
        for norm in (blk.pre_attn_norm, blk.pre_ffn_norm):
            norm.weight[...] = jnp.asarray(rng.lognormal(0.0, 1.5, CFG.d_model), jnp.float32)
    return m


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _kernel(m, path):
    return module_at(m, path).kernel


# ---- (a) the machinery at full precision -------------------------------------------------------------------

def test_float_rules_are_bit_identical(model):
    ref = model(IDS)
    qm = qnn.quantize_model(model, [Rule(PROJ)], allow_unmatched=True)  # every projection matched, kept float
    assert bool((qm(IDS) == ref).all())
    SANITY["float rules: max |logit diff|"] = _max_diff(qm(IDS), ref)


def test_capture_leaves_the_model_unchanged(model):
    ref = model(IDS)
    qm = qnn.quantize_model(model, [Rule(PROJ, weight="int4/g16")])
    before = qm(IDS)
    qnn.capture(qm, BATCHES, forward=_fwd, stats=("absmax",))  # runs on a copy
    assert bool((qm(IDS) == before).all())
    assert bool((model(IDS) == ref).all())


# ---- (b) idempotence: a weight on the grid comes back bit for bit ---------------------------------------------

@pytest.mark.parametrize("spec", ["int8/ch", "int4/g16", "nf4/g16", "fp4_e2m1/g16", "mxfp4", "nvfp4"])
def test_requantizing_an_rtn_model_changes_nothing(model, spec):
    rules = [Rule(PROJ, weight=spec)]
    once = ptq.rtn(model, rules)
    eff = qnn.effective_model(once, model)  # the float model holding the dequantized weights
    twice = ptq.rtn(eff, rules)
    for path, L in qnn.quantized_layers(once).items():
        assert bool((L.weight_value() == qnn.quantized_layers(twice)[path].weight_value()).all()), (spec, path)
    assert bool((twice(IDS) == once(IDS)).all())


# ---- (c) the error goes to zero with the bits at the rate it should ------------------------------------------

def test_weight_sqnr_grows_six_db_per_bit(model):
    w = np.concatenate([np.asarray(L.kernel[...]).ravel() for L in qlab.experiments.lm.lm_linears(model).values()])
    w = jnp.asarray(w.reshape(-1, 64))
    sqnr = [qlab.sqnr_db(w, qlab.fake_quant(w, f"int{b}/ch0")) for b in range(2, 9)]
    slopes = np.diff(sqnr)
    SANITY["int b/ch weight SQNR dB per bit (5..8)"] = float(np.mean(slopes[3:]))
    # qmax = 2^(b-1) - 1 more than doubles per bit at low b; from 5 bits on, 6.02 dB/bit (uniform rounding noise)
    assert np.all(np.diff(slopes) < 0) and np.all(np.abs(slopes[3:] - 6.02) < 0.4), slopes
    # at 32 bits the same slope puts the error ~145 dB further down: below float32 rounding (~150 dB SQNR)
    assert sqnr[-1] + 24 * 6.02 > 140


# ---- rescaling in float ---------------------------------------------------------------------------------------

def _tied(group, s):
    """A scale per input channel that a grouped-query ``into`` can hold: heads sharing a value head get one."""
    return group.to_input(group.to_output(s)) if group.repeat > 1 else s


def _fold_scales(model, scales: dict):
    """A float copy of ``model`` with ``{group: s}`` applied the way SmoothQuant / AWQ fold them: the op before
    divides its output channels by s, each layer of the group multiplies its kernel's input rows by s."""
    m = qnn.copy_model(model)
    for g, s in scales.items():
        divide_output(module_at(m, g.into), g.to_output(s))
        for p in g.layers:
            k = _kernel(m, p)
            k[...] = k[...] * jnp.asarray(s)[:, None]
    return m


def _logit_tolerance(ref) -> float:
    return 1e-4 * float(np.max(np.abs(np.asarray(ref))))


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.85, 1.0])
def test_smoothquant_rescaling_keeps_float_outputs(model, alpha):
    st = qnn.capture(qnn.quantize_model(model, [Rule(PROJ, weight="int8/ch")]), BATCHES, forward=_fwd,
                     stats=("absmax",))
    scales = {}
    for g in gemma3_scale_groups(CFG):
        a = st[g.layers[0]]["absmax"]
        if g.repeat > 1:  # o_proj after v_proj: one scale per value-head channel
            a = g.to_input(np.max(np.asarray(a).reshape(-1, g.repeat, g.head_dim), axis=1).reshape(-1))
        w = jnp.concatenate([_kernel(model, p)[...] for p in g.layers], axis=1)  # the group's max |W_j|
        scales[g] = _tied(g, ptq.smoothquant_scales(a, w, alpha))
    spread = max(float(jnp.max(s) / jnp.min(s)) for s in scales.values())
    assert alpha == 0.0 or spread > 10  # the scales do move channels
    ref = model(IDS)
    out = _fold_scales(model, scales)(IDS)
    d = _max_diff(out, ref)
    SANITY[f"SmoothQuant alpha {alpha}: max |logit diff| / max |logit|"] = d / float(np.max(np.abs(np.asarray(ref))))
    assert d < _logit_tolerance(ref)


def test_awq_rescaling_keeps_float_outputs(model):
    """AWQ's own searched scales (share_scales=True: one per group; the runtime ones the quantized model holds)
    folded into the float model."""
    qm = ptq.awq(model, [Rule(PROJ, weight="int3/g16")], BATCHES, forward=_fwd, share_scales=True)
    layers = qnn.quantized_layers(qm)
    scales = {g: np.asarray(layers[g.layers[0]].input_scale[...])
              for g in gemma3_scale_groups(CFG) if layers[g.layers[0]].input_scale is not None}
    assert len(scales) == 2 * CFG.n_layers  # q/k/v and gate/up of each block (o / down were folded at once)
    assert max(float(np.max(s) / np.min(s)) for s in scales.values()) > 2
    ref = model(IDS)
    out = _fold_scales(model, scales)(IDS)
    d = _max_diff(out, ref)
    SANITY["AWQ (searched scales): max |logit diff| / max |logit|"] = d / float(np.max(np.abs(np.asarray(ref))))
    assert d < _logit_tolerance(ref)


def test_report(capsys):
    with capsys.disabled():
        for k, v in SANITY.items():
            print(f"sanity: {k}: {v:.3g}")
