"""The pieces the Gemma ablation scripts share: calibration windows, the comparison row, the channel plot."""

from __future__ import annotations

import numpy as np

from qlab import plot
from qlab.evaluate import ReferenceComparison, compare_to_reference
from qlab.experiments.lm import calibration_windows, lm_model


def test_calibration_windows_are_seeded_bos_led_text_windows():
    a = calibration_windows("gemma3_tiny", "tiny_text", seqs=4, length=16)
    b = calibration_windows("gemma3_tiny", "tiny_text", seqs=4, length=16)
    model, tok = lm_model("gemma3_tiny")
    assert a.shape == (4, 16) and a.dtype == np.int32 and (a == b).all()
    assert (a[:, 0] == model.config.bos_id).all()
    text = np.asarray(tok.encode(__import__("qlab.experiments.lm", fromlist=["TINY_TEXT"]).TINY_TEXT).ids[1:])
    for w in a:  # each window's body is a contiguous run of the text
        starts = [s for s in range(len(text) - 15) if (text[s:s + 15] == w[1:]).all()]
        assert starts


def test_comparison_row_names_the_study_columns():
    model, tok = lm_model("gemma3_tiny")
    ids = np.asarray(tok.encode("the quick brown fox jumps over the lazy dog").ids[:12])
    c = compare_to_reference(model, model, ids)
    r = c.row()
    assert set(r) == {"perplexity", "perplexity_se", "float_perplexity", "float_perplexity_se", "ppl_ratio",
                      "ppl_ratio_se", "kl", "kl_se", "top1", "top1_se"}
    assert r["perplexity"] == r["float_perplexity"] == c.ppl and r["ppl_ratio"] == 1.0
    assert isinstance(c, ReferenceComparison)


def test_channel_maxima_draws_one_panel_per_alpha():
    a = np.array([1.0, 2.0, 50.0, 1.0])
    fig = plot.channel_maxima({"absmax": a, "smoothed_0.5": np.sqrt(a), "smoothed_0.8": a ** 0.2}, "x", log=True)
    assert len(fig.axes) == 3
    assert fig.axes[0].get_title() == "x: before (max/median 33.3)"
    assert fig.axes[0].get_yscale() == "log"
