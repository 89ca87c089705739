"""qlab.analysis: candidate costs, sensitivity, allocation under a budget, and one end-to-end run."""

import itertools
import re

import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from qlab.analysis import (
    KEEP,
    allocate,
    candidate_layer,
    candidate_table,
    fisher_sensitivity,
    hutchinson_sensitivity,
    measured_sensitivity,
    sensitivity,
    sqnr_sensitivity,
    uniform_bytes,
)
from qlab.models import MLP
from qlab.nn import Rule, layer_report, model_size, quantizable_layers, quantize_model
from qlab.numerics import sqnr_db
from qlab.train import xent_loss

BITS = ["int2/ch", "int3/ch", "int4/ch", "int6/ch", "int8/ch"]


def _mse(model, batch):
    return jnp.mean((model(batch[0]) - batch[1]) ** 2)


@pytest.fixture(scope="module")
def small():
    model = MLP(32, hidden=(32,), out=6, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    batches = [(jnp.asarray(rng.normal(size=(16, 32)), jnp.float32), jnp.asarray(rng.normal(size=(16, 6)), jnp.float32))
               for _ in range(2)]
    return model, batches


# ---- candidates -----------------------------------------------------------------------------


def test_candidate_bytes_match_the_quantized_models_report(small):
    model, _ = small
    cands = ["int2/ch", "int4/ch", "int8/ch", "int4/g8", "nf4/g8", "mxfp4", "keep"]
    t = candidate_table(model, cands)
    assert list(t.columns) == ["layer", "candidate", "params", "bytes", "usable", "reason"]
    assert len(t) == 2 * len(cands)
    for c in cands[:-1]:
        rep = layer_report(quantize_model(model, [Rule(".*", weight=c)]), sqnr=False)
        want = dict(zip(rep["layer"], rep["packed_bytes"]))
        got = t[t.candidate == c].set_index("layer")["bytes"].to_dict()
        assert got == want, c
    keep = t[t.candidate == KEEP]
    assert (keep["bytes"] == 4 * keep["params"]).all()


def test_a_group_that_does_not_divide_is_unusable_with_a_reason():
    t = candidate_table(nnx.Linear(48, 4, rngs=nnx.Rngs(0)), ["int4/g32", "int4/g16", "int4/g32p"])
    assert t["usable"].tolist() == [False, True, True]
    assert "32" in t["reason"][0] and t["reason"][1] == ""


def test_an_unknown_candidate_names_the_allowed_forms():
    with pytest.raises(ValueError, match=r"int7/chh.*allowed.*'keep'"):
        candidate_table(nnx.Linear(8, 4, rngs=nnx.Rngs(0)), ["int4/ch", "int7/chh"])


def test_uniform_bytes_refuses_a_candidate_some_layer_cannot_take():
    t = candidate_table(MLP(48, hidden=(32,), out=4, rngs=nnx.Rngs(0)), ["int4/g48", "keep"])
    with pytest.raises(ValueError, match="head"):
        uniform_bytes(t, "int4/g48")


# ---- sensitivity ----------------------------------------------------------------------------


def test_sqnr_scores_fall_with_bits_and_keep_is_zero(small):
    model, _ = small
    s = sqnr_sensitivity(model, BITS + ["keep"])
    for _, g in s.groupby("layer"):
        scores = g.set_index("candidate")["score"]
        assert list(scores[BITS]) == sorted(scores[BITS], reverse=True)
        assert scores["keep"] == 0 and scores["int8/ch"] > 0
    layer = dict(quantizable_layers(model))["head"]
    w, wq = layer.kernel[...], candidate_layer(layer, "int4/ch").weight_value()
    want = w.size * 10 ** (-float(sqnr_db(w, wq)) / 10)
    assert s.set_index(["layer", "candidate"])["score"]["head", "int4/ch"] == pytest.approx(want, rel=1e-4)


def test_measured_is_the_loss_increase_of_the_one_layer_quantized_model(small):
    model, batches = small
    s = measured_sensitivity(model, ["int2/ch", "int4/ch", "keep"], _mse, batches)
    base = np.mean([float(_mse(model, b)) for b in batches])
    for r in s.itertuples():
        qm = quantize_model(model, [Rule(re.escape(r.layer), weight=None if r.candidate == KEEP else r.candidate)])
        want = np.mean([float(_mse(qm, b)) for b in batches]) - base
        assert r.score == pytest.approx(want, rel=1e-4, abs=1e-6), (r.layer, r.candidate)
    assert (s[s.candidate == "int2/ch"]["score"].abs() > 0).all()


def test_fisher_is_positive_and_falls_with_bits(small):
    model, batches = small
    s = fisher_sensitivity(model, BITS, _mse, batches)
    for _, g in s.groupby("layer"):
        assert (g["score"] > 0).all()
        assert g["score"].iloc[0] > g["score"].iloc[-1]


def test_hutchinson_trace_matches_the_exact_hessian_trace_of_a_quadratic():
    # loss = mean((x @ W + b - y)**2): the Hessian wrt W is (2/n) * kron(x^T x, I_out), trace known
    model = nnx.Linear(6, 3, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(10, 6)), jnp.float32)
    batch = (x, jnp.zeros((10, 3)))
    s = hutchinson_sensitivity(model, ["int4/ch"], _mse, [batch], samples=400)
    trace = 2.0 / (10 * 3) * float(jnp.sum(x * x)) * 3
    w = model.kernel[...]
    err = float(jnp.sum((candidate_layer(model, "int4/ch").weight_value() - w) ** 2))
    assert s.score[0] == pytest.approx(0.5 * trace / w.size * err, rel=0.15)


@pytest.mark.parametrize("method", ["measured", "fisher", "hutchinson"])
def test_a_data_driven_sensitivity_without_data_is_an_error(small, method):
    model, _ = small
    with pytest.raises(ValueError, match="no data"):
        sensitivity(model, ["int4/ch"], method)
    with pytest.raises(ValueError, match="no batches"):
        sensitivity(model, ["int4/ch"], method, data=(_mse, []))


def test_an_unknown_sensitivity_method_is_an_error(small):
    with pytest.raises(ValueError, match="allowed.*sqnr"):
        sensitivity(small[0], ["int4/ch"], "hessian")


# ---- allocation -----------------------------------------------------------------------------


def _table(spec):
    rows = [dict(layer=f"l{i}", candidate=f"c{j}", params=8, bytes=b, usable=True, score=s)
            for i, opts in enumerate(spec) for j, (b, s) in enumerate(opts)]
    return pd.DataFrame(rows)


def _brute(spec, budget):
    best = np.inf
    for pick in itertools.product(*spec):
        if sum(b for b, _ in pick) <= budget:
            best = min(best, sum(s for _, s in pick))
    return best


options = st.lists(st.tuples(st.integers(1, 40), st.floats(0, 10, allow_nan=False)), min_size=1, max_size=4)
tables = st.lists(options, min_size=1, max_size=4)


@settings(max_examples=150, deadline=None)
@given(tables, st.integers(0, 60))
def test_dp_is_optimal_within_budget_and_beats_greedy(spec, extra):
    t = _table(spec)
    budget = sum(min(b for b, _ in o) for o in spec) + extra
    dp, gr, mi = (allocate(t, budget_bytes=budget, method=m) for m in ("dp", "greedy", "milp"))
    for a in (dp, gr, mi):
        assert a.total_bytes <= budget
        assert a.total_bytes == a.choices["bytes"].sum() and a.damage == pytest.approx(a.choices["score"].sum())
        assert a.choices["layer"].tolist() == [f"l{i}" for i in range(len(spec))]
    assert dp.exact
    assert dp.damage == pytest.approx(_brute(spec, budget), abs=1e-9)
    assert mi.damage == pytest.approx(dp.damage, abs=1e-6)
    assert dp.damage <= gr.damage + 1e-9


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(1, 10**6), st.floats(0, 10, allow_nan=False)), min_size=1,
                         max_size=5), min_size=1, max_size=6), st.floats(0, 1))
def test_binned_dp_never_exceeds_the_budget(spec, frac):
    t = _table(spec)
    lo, hi = sum(min(b for b, _ in o) for o in spec), sum(max(b for b, _ in o) for o in spec)
    budget = int(lo + frac * (hi - lo))
    dp = allocate(t, budget_bytes=budget, max_bins=16)
    gr = allocate(t, budget_bytes=budget, method="greedy")
    assert dp.total_bytes <= budget and dp.damage <= gr.damage + 1e-9
    assert dp.damage >= _brute(spec, budget) - 1e-9


def test_a_budget_below_the_smallest_size_names_it():
    t = _table([[(10, 1.0), (20, 0.0)], [(5, 1.0), (7, 0.0)]])
    with pytest.raises(ValueError, match=r"below the smallest reachable size, 15 bytes"):
        allocate(t, budget_bytes=14)
    assert allocate(t, budget_bytes=15).damage == 2.0


def test_a_layer_with_no_usable_candidate_is_named():
    t = _table([[(10, 1.0)], [(5, 1.0), (7, 0.0)]])
    t.loc[t.layer == "l0", "usable"] = False
    with pytest.raises(ValueError, match="l0"):
        allocate(t, budget_bytes=100)


def test_unusable_rows_are_never_chosen_and_bpw_budgets_convert():
    t = _table([[(1, 5.0), (4, 0.0)], [(1, 5.0), (4, 0.0)]])
    t.loc[(t.layer == "l0") & (t.candidate == "c1"), "usable"] = False
    a = allocate(t, budget_bpw=4.0)  # 16 params at 4 bits = 8 bytes
    assert a.budget_bytes == 8 and a.choices["candidate"].tolist() == ["c0", "c1"]


# ---- end to end -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained():
    from qlab.data import digits_dataset
    from qlab.train import train

    ds = digits_dataset(seed=0)
    model = MLP(64, hidden=(64, 32), out=10, rngs=nnx.Rngs(0))
    train(model, ds.train, steps=60, batch_size=64, learning_rate=3e-3, progress=False)
    x, y = ds.val
    batches = [(jnp.asarray(x[i:i + 90]), jnp.asarray(y[i:i + 90])) for i in (0, 90)]
    return model, batches


def _loss(model, batches):
    return float(np.mean([float(xent_loss(model, b)) for b in batches]))


def test_end_to_end_measured_allocation_on_digits(trained):
    model, batches = trained
    s = sensitivity(model, BITS + ["keep"], "measured", data=(xent_loss, batches))
    other = model_size(model)["packed_bytes"] - uniform_bytes(s, "keep")  # biases stay f32
    damages = {}
    for uniform in ("int3/ch", "int4/ch", "int8/ch"):
        budget = uniform_bytes(s, uniform)
        a = allocate(s, budget_bytes=budget)
        qm = quantize_model(model, a.rules())
        assert model_size(qm)["packed_bytes"] == a.total_bytes + other
        assert a.total_bytes <= budget
        assert a.damage <= s[s.candidate == uniform]["score"].sum() + 1e-9  # at least as good as uniform
        damages[uniform] = a.damage
    assert damages["int8/ch"] <= damages["int4/ch"] <= damages["int3/ch"]
    a8 = allocate(s, budget_bytes=uniform_bytes(s, "int8/ch"))
    assert not set(a8.choices["candidate"]) & {"int2/ch", "int3/ch"}  # 8-bit room: no layer is squeezed low
    a4 = allocate(s, budget_bytes=uniform_bytes(s, "int4/ch"))
    base = _loss(model, batches)
    mixed = _loss(quantize_model(model, a4.rules()), batches) - base
    int2 = _loss(quantize_model(model, [Rule(".*", weight="int2/ch")]), batches) - base
    assert mixed < int2
