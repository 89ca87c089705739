"""llama.cpp (llama-cpp-python, ``make llama``) as the real client of qlab's GGUF export of Gemma 3 270M.

On the first 256 tokens of Pride and Prejudice: llama.cpp's perplexity of the exported Q8_0 / Q4_0 (RTN
and GPTQ) files is within 2% of qlab's evaluation of the same quantized weights, and its argmax token
agrees with qlab's at >= 95% of positions; and llama.cpp on the original Q4_K_M file against qlab's float
evaluation of it checks qlab's Gemma implementation by a second one.
"""

import numpy as np
import pytest

from qlab import ptq
from qlab.data import load_austen
from qlab.evaluate import token_nll
from qlab.export.gguf import export_gguf
from qlab.models.gemma3 import gemma3_gguf_path, load_gemma3
from qlab.nn import Rule

N_TOKENS = 256
pytestmark = pytest.mark.slow
# an optional extra built from source (`make test-llama` builds it and runs this file); `make test` reports the skip
pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: `make test-llama` builds it and runs these")


@pytest.fixture(scope="module")
def gemma():
    model, tok = load_gemma3()
    ids = tok.encode(load_austen("prideprejudice")).ids[:N_TOKENS]
    return model, tok, ids


def _llama_logits(path, ids):
    from llama_cpp import Llama  # noqa: PLC0415 -- the optional extra, checked by importorskip above
    llm = Llama(str(path), n_ctx=len(ids), n_batch=len(ids), logits_all=True, verbose=False, n_threads=2)
    llm.eval(ids)
    out = np.asarray(llm.scores[: len(ids)], np.float64)
    llm.close()
    return out


def _nll(logits, ids):
    ls = logits - logits.max(axis=1, keepdims=True)
    ls = ls - np.log(np.exp(ls).sum(axis=1, keepdims=True))
    return -ls[np.arange(len(ids) - 1), ids[1:]]


def _compare(qmodel, path, ids):
    """(qlab perplexity, llama.cpp perplexity, argmax agreement)."""
    ref = np.asarray(qmodel(np.asarray([ids]))[0], np.float64)
    theirs = _llama_logits(path, ids)
    ppl_q = float(np.exp(token_nll(qmodel, np.asarray(ids))[0].mean()))
    ppl_l = float(np.exp(_nll(theirs, ids).mean()))
    agree = float((ref[:-1].argmax(1) == theirs[:-1].argmax(1)).mean())
    print(f"\n{path.name}: qlab ppl {ppl_q:.3f}, llama.cpp ppl {ppl_l:.3f}, argmax agreement {agree:.3f}")
    return ppl_q, ppl_l, agree


def test_llamacpp_original_q4_k_m_matches_qlab_float(gemma):
    model, _, ids = gemma
    ppl_q, ppl_l, agree = _compare(model, gemma3_gguf_path(), ids)
    assert ppl_l == pytest.approx(ppl_q, rel=0.01)
    assert agree >= 0.95


@pytest.mark.parametrize("spec,method", [("q8_0", "rtn"), ("q4_0", "rtn"), ("q4_0", "gptq")])
def test_llamacpp_runs_qlab_export(gemma, tmp_path, spec, method):
    model, tok, ids = gemma
    if method == "rtn":
        qm = ptq.rtn(model, [Rule("embed", weight="q8_0"), Rule(r"layers/.*_proj", weight=spec)])
    else:  # few calibration rows (GPTQ on Gemma is slow); text other than the evaluated tokens
        calib = tok.encode(load_austen("emma")).ids[:512]
        batches = [np.asarray([calib[i:i + 128]]) for i in range(0, 512, 128)]
        qm = ptq.gptq(model, [Rule(r"layers/.*_proj", weight=spec)], batches, forward=lambda m, b: m(b))
    path = export_gguf(qm, tmp_path / f"gemma-{spec}-{method}.gguf", source=gemma3_gguf_path())
    ppl_q, ppl_l, agree = _compare(qm, path, ids)
    assert ppl_l == pytest.approx(ppl_q, rel=0.02)
    assert agree >= 0.95
