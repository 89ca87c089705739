"""Ablation 4 (issue #15): LLM.int8() outlier features on Gemma 3 270M.

    python experiments/ablation_llm_int8.py [--eval-tokens 1024] [--out results/ablations/llm_int8]

Three parts, on the first ``--eval-tokens`` tokens of Pride and Prejudice (the text formats4 scores):

* **outlier features** (Dettmers et al. 2022): the inputs of every attention / MLP projection are captured in one
  float pass; per layer, a feature is an outlier when its magnitude is >= 6 at >= 6% of the sequence positions
  (:func:`qlab.ptq.outlier_dims`); a hidden dimension is *systematic* when it is an outlier in >= 25% of the layers
  that read the hidden state (the 36 normed block inputs of q/k/v and gate/up, :func:`qlab.ptq.systematic_outliers`).
  Per block and input site: ``outliers.csv``.
* **W8A8**: int8 per-channel weights (symmetric absmax, fake-quantized with their scales computed without the
  decomposed rows) with int8 activations per tensor (absmax, or asymmetric "zeropoint"), per token ("vector-wise",
  symmetric or zeropoint), and per token with LLM.int8's decomposition at thresholds 4 / 6 / 8 (input columns whose
  magnitude exceeds the threshold anywhere in the sequence stay float with their weight rows:
  ``qlab.nn.Rule(outlier_threshold=...)``). Dynamic activation ranges; float32 products of the fake-quantized
  operands. Every projection is quantized, the tied embedding stays float.
* **zeroing** (the paper's "remove the outlier features"): the systematic hidden dimensions set to zero in the
  input of every q/k/v and gate/up projection (their weight rows zeroed: :func:`qlab.ptq.zero_input_features`),
  against as many random non-systematic dimensions (3 seeds, one draw per seed shared by all those projections).

Metrics per run: perplexity with its standard error, the paired ratio to float (``compare_to_reference``), KL to
float and top-1 agreement. Writes the study layout (``results/README.md``): ``runs/<hash>.json`` as each run
finishes (resumable), ``runs.csv``, ``layers.csv`` (per projection: the columns kept float at each threshold, the
features zeroed), ``outliers.csv``, ``study.json``, ``outliers.png`` and ``README.md``; ``--readme`` rewrites the
tables, plot and README from the stored runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qlab import ptq  # noqa: E402
from qlab.evaluate import compare_to_reference  # noqa: E402
from qlab.experiments import config_hash  # noqa: E402
from qlab.experiments.results import atomic_write_text, read_runs, rebuild_tables, write_run  # noqa: E402
from qlab.nn import Rule, capture, quantize_model  # noqa: E402

STUDY = "llm_int8"
SCRIPT = "experiments/ablation_llm_int8.py"
PROJ = r"layers/\d+/(attn|mlp)/\w+_proj"
#: attention call sites (q.k^T, p.v) stay float
CALL_SITES = r"(.*/)?(einsum|dot|matmul|dot_general)_\d+"
#: the input site of each projection: q/k/v read the normed block input, gate/up the normed MLP input
SITES = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "attn_out",
         "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "mlp_hidden"}
#: the projection whose captured input stands for each site
SITE_LAYER = {"attn_in": "attn/q_proj", "attn_out": "attn/o_proj", "mlp_in": "mlp/gate_proj",
              "mlp_hidden": "mlp/down_proj"}
#: W8A8 activation schemes: (label, activation spec, LLM.int8 threshold)
SCHEMES = {
    "tensor_absmax": ("A8 per-tensor absmax", "int8", None),
    "tensor_zeropoint": ("A8 per-tensor zeropoint", "int8/asym", None),
    "vector_wise": ("A8 per-token absmax (vector-wise)", "int8/ch", None),
    "vector_zeropoint": ("A8 per-token zeropoint", "int8/ch/asym", None),
    "llm_int8_t4": ("vector-wise + decomposition, threshold 4", "int8/ch", 4.0),
    "llm_int8_t6": ("vector-wise + decomposition, threshold 6 (LLM.int8)", "int8/ch", 6.0),
    "llm_int8_t8": ("vector-wise + decomposition, threshold 8", "int8/ch", 8.0),
}
SEEDS = (0, 1, 2)
#: LLM.int8() Table 1 (C4 perplexity, 125M model), the rows our schemes correspond to
PAPER = {"float": 25.65, "tensor_absmax": 30.93, "tensor_zeropoint": 56.66, "vector_wise": 35.84,
         "vector_zeropoint": 25.72, "llm_int8_t6": 25.83}
PAPER_ROW = {"float": "float 25.65", "tensor_absmax": "absmax row-wise 30.93 (per-tensor A, per-row W)",
             "tensor_zeropoint": "zeropoint 56.66 (per-tensor W and A)", "vector_wise": "absmax vector-wise 35.84",
             "vector_zeropoint": "zeropoint vector-wise 25.72", "llm_int8_t6": "LLM.int8() 25.83",
             "llm_int8_t4": "-", "llm_int8_t8": "-"}


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def command(args: dict) -> str:
    """The command line that reproduces this study with ``args``.

    >>> command({"model": "gemma3", "eval_tokens": 1024})
    'python experiments/ablation_llm_int8.py --eval-tokens 1024'
    """
    extra = "" if args["model"] == "gemma3" else f" --model {args['model']}"
    return f"python {SCRIPT} --eval-tokens {args['eval_tokens']}{extra}"


def jobs(args: dict) -> list[dict]:
    """Every run's config in run order, each with its ``config_hash``: float, the W8A8 schemes, then the zeroing
    runs (the systematic dimensions, then random ones).

    >>> js = jobs({"model": "gemma3", "eval_tokens": 1024})
    >>> len(js), js[0]["method"], js[-1]["method"], js[-1]["seed"]
    (12, 'float', 'zero_random', 2)
    """
    base = dict(study=STUDY, model=args["model"], data="austen", eval_tokens=args["eval_tokens"])
    out = [dict(base, method="float")]
    for name, (_, act, thr) in SCHEMES.items():
        out.append(dict(base, method="w8a8", scheme=name, weight="int8/ch", act=act, outlier_threshold=thr))
    out.append(dict(base, method="zero_outliers", zero_scope="systematic"))
    out += [dict(base, method="zero_random", zero_scope="systematic", seed=s) for s in SEEDS]
    for c in out:
        c["config_hash"] = config_hash({**c, "script_args": args})
    return out


def rules_for(act: str | None, threshold: float | None):
    """The W8A8 rules: int8 per-channel weights and ``act`` on every projection (``threshold``: LLM.int8
    decomposition), the embedding and the attention's own products float.

    >>> [r.pattern for r in rules_for("int8/ch", 6.0)][-1], rules_for("int8/ch", 6.0)[-1].outlier_threshold
    ('layers/\\\\d+/(attn|mlp)/\\\\w+_proj', 6.0)
    """
    return [Rule("embed"), Rule(CALL_SITES),
            Rule(PROJ, weight="int8/ch", act=act, outlier_threshold=threshold, int_matmul=False)]


def site_inputs(stats: dict, site: str) -> dict[str, np.ndarray]:
    """``{block path: captured inputs}`` of one input site (``attn_in`` ...) from :func:`qlab.nn.capture` stats.

    >>> site_inputs({"layers/0/attn/q_proj": {"inputs": 1}, "layers/0/mlp/gate_proj": {"inputs": 2}}, "mlp_in")
    {'layers/0': 2}
    """
    suffix = "/" + SITE_LAYER[site]
    return {p[: -len(suffix)]: s["inputs"] for p, s in stats.items() if p.endswith(suffix)}


def outlier_table(stats: dict) -> tuple[pd.DataFrame, dict]:
    """Per block and input site: width, the largest magnitude, the paper's outlier features (>= 6 at >= 6% of
    positions: count and dims), and the features above 4 / 6 / 8 anywhere (the columns LLM.int8 keeps float at
    that threshold); with ``{"attn_in" | "mlp_in" | "hidden": (systematic dims, per-dim layer counts)}``.

    >>> x = np.zeros((50, 4), np.float32); x[:5, 2] = 9.0; x[0, 1] = 5.0
    >>> st = {f"layers/{i}/{s}": {"inputs": x} for i in range(2) for s in SITE_LAYER.values()}
    >>> t, sys_ = outlier_table(st)
    >>> t[["block", "site", "outliers", "above_4", "above_8"]].values.tolist()[0], sys_["hidden"][0].tolist()
    ([0, 'attn_in', 1, 2, 1], [2])
    """
    rows = []
    for site in SITE_LAYER:
        for blk, x in site_inputs(stats, site).items():
            x = np.asarray(x, np.float32)
            a = np.abs(x).max(0)
            dims = ptq.outlier_dims(x)
            rows.append(dict(block=int(blk.split("/")[-1]), site=site, width=x.shape[1], positions=x.shape[0],
                             absmax=float(a.max()), median_absmax=float(np.median(a)),
                             outliers=len(dims), outlier_dims=" ".join(map(str, dims)),
                             **{f"above_{t}": int((a > t).sum()) for t in (4, 6, 8)}))
    table = pd.DataFrame(rows).sort_values(["block", "site"], kind="stable").reset_index(drop=True)
    hid = {**{f"{b}/attn_in": x for b, x in site_inputs(stats, "attn_in").items()},
           **{f"{b}/mlp_in": x for b, x in site_inputs(stats, "mlp_in").items()}}
    systematic = {"attn_in": ptq.systematic_outliers(site_inputs(stats, "attn_in")),
                  "mlp_in": ptq.systematic_outliers(site_inputs(stats, "mlp_in")),
                  "hidden": ptq.systematic_outliers(hid)}
    return table, systematic


def zero_features(paths, width: int, systematic_dims, seed: int | None = None) -> dict[str, np.ndarray]:
    """``{projection path: input features to zero}``: the systematic hidden dimensions in the input of every
    q/k/v/gate/up projection among ``paths`` (o_proj and down_proj read other feature spaces); with ``seed``, as
    many random dimensions drawn once from the ``width - len(systematic_dims)`` others.

    >>> ps = ["layers/0/attn/q_proj", "layers/0/attn/o_proj", "layers/0/mlp/up_proj"]
    >>> z = zero_features(ps, 8, [2, 5]); sorted(z), z["layers/0/mlp/up_proj"].tolist()
    (['layers/0/attn/q_proj', 'layers/0/mlp/up_proj'], [2, 5])
    >>> r = zero_features(ps, 8, [2, 5], seed=0)["layers/0/attn/q_proj"].tolist(); len(r), {2, 5} & set(r)
    (2, set())
    """
    dims = np.asarray(systematic_dims, np.int64)
    if seed is not None:
        pool = np.setdiff1d(np.arange(width), dims)
        dims = np.sort(np.random.default_rng(seed).choice(pool, size=len(dims), replace=False))
    return {p: dims for p in paths if SITES[p.rsplit("/", 1)[-1]] in ("attn_in", "mlp_in") and len(dims)}


def _environment() -> str:
    return f"{os.cpu_count()} shared CPU cores, jax {jax.__version__}, {platform.machine()}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval-tokens", type=int, default=1024)
    ap.add_argument("--model", default="gemma3", choices=("gemma3", "gemma3_tiny"))
    ap.add_argument("--out", default=str(ROOT / "results" / "ablations" / STUDY))
    ap.add_argument("--readme", action="store_true", help="only rewrite tables, plot and README from the stored runs")
    ns = ap.parse_args()
    out = Path(ns.out)
    args = {"model": ns.model, "eval_tokens": ns.eval_tokens}
    if ns.readme:
        return write_study(out, args, jobs(args))
    from qlab.data.text import load_austen  # deferred: the heavy loaders are not needed for --readme
    from qlab.experiments.lm import TINY_TEXT, lm_model

    t_start = time.time()
    model, tok = lm_model(ns.model)
    text = load_austen("prideprejudice") if ns.model == "gemma3" else TINY_TEXT
    ids = jnp.asarray([tok.encode(text).ids[: ns.eval_tokens]], jnp.int32)
    log(f"model loaded ({time.time() - t_start:.0f}s); {ids.shape[1]} tokens")

    t = time.time()
    qm0 = quantize_model(model, [Rule(PROJ, weight="int8/ch")], allow_unmatched=True)
    stats = capture(qm0, [ids], forward=lambda m, b: m.features(b), stats=("absmax", "inputs"),
                    max_input_rows=ns.eval_tokens)
    del qm0
    capture_s = time.time() - t
    table, systematic = outlier_table(stats)
    atomic_write_text(out / "outliers.csv", table.to_csv(index=False))
    sys_dims = systematic["hidden"][0]
    for st in stats.values():  # the runs need only the absmax: free the captured inputs (memory)
        st.pop("inputs", None)
    log(f"captured {len(stats)} layers in {capture_s:.0f}s; per-layer outliers {int(table.outliers.sum())}, "
        f"systematic hidden dims {sys_dims.tolist()}")
    configs = jobs(args)
    width = int(table[table.site == "attn_in"].width.iloc[0])
    done = {r["row"]["config_hash"] for r in read_runs(out)}
    for cfg in configs:
        if cfg["config_hash"] in done:
            continue
        t = time.time()
        layers, zeroed = None, None
        if cfg["method"] == "float":
            qm = model
        elif cfg["method"] == "w8a8":
            qm = quantize_model(model, rules_for(cfg["act"], cfg["outlier_threshold"]), allow_unmatched=True)
            thr = cfg["outlier_threshold"]
            if thr is not None:
                layers = []
                for p, s in stats.items():
                    n = int((np.asarray(s["absmax"]) > thr).sum())
                    layers.append(dict(config_hash=cfg["config_hash"], layer=p, width=len(s["absmax"]),
                                       float_columns=n, float_fraction=n / len(s["absmax"])))
        else:
            feats = zero_features(list(stats), width, sys_dims, cfg.get("seed"))
            qm = ptq.zero_input_features(model, feats)
            layers = [dict(config_hash=cfg["config_hash"], layer=p, width=len(stats[p]["absmax"]),
                           zeroed=len(d), zeroed_dims=" ".join(map(str, d))) for p, d in feats.items()]
            zeroed = len(next(iter(feats.values()))) if feats else 0
        quant_s = time.time() - t
        t = time.time()
        c = compare_to_reference(qm, model, ids, any_structure=True, chunk=128)
        row = {**cfg, "perplexity": c.ppl, "perplexity_se": c.ppl_se, "float_perplexity": c.ref_ppl,
               "float_perplexity_se": c.ref_ppl_se, "ppl_ratio": c.ppl_ratio, "ppl_ratio_se": c.ppl_ratio_se,
               "kl": c.kl, "kl_se": c.kl_se, "top1": c.top1, "top1_se": c.top1_se,
               "zeroed_features": zeroed if cfg["method"].startswith("zero") else None,
               "quant_s": quant_s, "eval_s": time.time() - t}
        write_run(out, row, layers)
        del qm
        log(f"{cfg['method']} {cfg.get('scheme') or cfg.get('zero_scope') or ''} {cfg.get('seed', '')}: "
            f"ppl {c.ppl:.3f} +- {c.ppl_se:.3f}, ratio {c.ppl_ratio:.4f} +- {c.ppl_ratio_se:.4f} "
            f"({row['eval_s']:.0f}s)")
    sysinfo = {k: v[0].tolist() for k, v in systematic.items()}
    sysinfo["layer_counts_hidden"] = systematic["hidden"][1].tolist()
    write_study(out, args, configs, wall_s=time.time() - t_start, systematic=sysinfo, capture_s=capture_s)


def write_study(out: Path, args: dict, configs: list[dict], wall_s: float = 0.0, systematic=None,
                capture_s: float | None = None):
    """Rebuild ``runs.csv`` / ``layers.csv`` from the stored runs, then write ``study.json``, the plot and
    ``README.md``."""
    rebuild_tables(out, [c["config_hash"] for c in configs])
    path = out / "study.json"
    before = json.loads(path.read_text()) if path.exists() else {}
    study = dict(name=STUDY, description="Ablation 4: LLM.int8() outlier features in Gemma 3 270M: their count "
                                         "(Dettmers et al.'s definition), W8A8 activation schemes with and without "
                                         "the mixed-precision decomposition, and zeroing the outlier features",
                 source=SCRIPT, command=command(args), args=args, schemes={k: v[0] for k, v in SCHEMES.items()},
                 systematic=systematic if systematic is not None else before.get("systematic"),
                 capture_s=capture_s if capture_s is not None else before.get("capture_s"),
                 wall_s=before.get("wall_s", 0.0) + wall_s, environment=before.get("environment", _environment()),
                 runs=configs)
    atomic_write_text(path, json.dumps(study, indent=1))
    runs = pd.read_csv(out / "runs.csv")
    outl = pd.read_csv(out / "outliers.csv")
    plot(out, runs, outl)
    atomic_write_text(out / "README.md", readme(runs, outl, study))


def scheme_table(runs: pd.DataFrame) -> pd.DataFrame:
    """The float and W8A8 rows: scheme, perplexity +- se, paired ratio +- se, KL, top-1, with the paper's figure.

    >>> r = pd.DataFrame({"method": ["float", "w8a8"], "scheme": [None, "vector_wise"], "perplexity": [17.0, 18.0],
    ...                   "perplexity_se": [1.0, 1.1], "ppl_ratio": [1.0, 1.05], "ppl_ratio_se": [0.0, 0.01],
    ...                   "kl": [0.0, 0.02], "top1": [1.0, 0.95]})
    >>> scheme_table(r)[["scheme", "ratio", "paper C4 ppl (OPT-125M)"]].values.tolist()
    [['float', 1.0, 'float 25.65'], ['A8 per-token absmax (vector-wise)', 1.05, 'absmax vector-wise 35.84']]
    """
    t = runs[runs.method.isin(["float", "w8a8"])].copy()
    key = t["scheme"].where(t.method == "w8a8", "float")
    t["scheme"] = [("float" if k == "float" else SCHEMES[k][0]) for k in key]
    t["paper C4 ppl (OPT-125M)"] = [PAPER_ROW[k] for k in key]
    t = t.rename(columns={"perplexity": "ppl", "perplexity_se": "ppl_se", "ppl_ratio": "ratio",
                          "ppl_ratio_se": "ratio_se"})
    return t[["scheme", "ppl", "ppl_se", "ratio", "ratio_se", "kl", "top1", "paper C4 ppl (OPT-125M)"]].reset_index(
        drop=True)


def zero_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Zeroing runs: per scope, the outlier features against random ones (mean +- std over the seeds).

    >>> r = pd.DataFrame({"method": ["zero_outliers", "zero_random", "zero_random"], "zero_scope": ["per_layer"] * 3,
    ...                   "perplexity": [90.0, 17.0, 19.0], "ppl_ratio": [5.0, 1.0, 1.2], "zeroed_features": [7, 7, 7]})
    >>> zero_table(r)[["zeroed", "ppl", "ratio"]].values.tolist()
    [['outlier features', '90', '5'], ['random features (2 seeds)', '18 +- 1.414', '1.1 +- 0.1414']]
    """
    rows = []
    for scope, g in runs[runs.method.str.startswith("zero")].groupby("zero_scope", sort=False):
        o, r = g[g.method == "zero_outliers"], g[g.method == "zero_random"]
        for label, sel in (("outlier features", o), (f"random features ({len(r)} seeds)", r)):
            if not len(sel):
                continue
            fmt = (lambda c: f"{sel[c].mean():.4g}") if len(sel) == 1 else (
                lambda c: f"{sel[c].mean():.4g} +- {sel[c].std(ddof=1):.4g}")
            rows.append(dict(scope=scope, zeroed=label, features=int(sel.zeroed_features.iloc[0]),
                             ppl=fmt("perplexity"), ratio=fmt("ppl_ratio")))
    return pd.DataFrame(rows)[["scope", "zeroed", "features", "ppl", "ratio"]] if rows else pd.DataFrame()


def plot(out: Path, runs: pd.DataFrame, outl: pd.DataFrame):
    """``outliers.png``: per block and input site the outlier-feature count and the largest magnitude; the W8A8
    schemes' perplexity ratio to float."""
    from qlab.plot import figure, save

    fig = figure(figsize=(13, 4))
    ax1, ax2, ax3 = fig.subplots(1, 3)
    for i, site in enumerate(SITE_LAYER):
        s = outl[outl.site == site]
        ax1.plot(s.block, s.outliers, "o-", color=f"C{i}", label=f"{site} ({int(s.width.iloc[0])} dims)")
        ax2.semilogy(s.block, s.absmax, "o-", color=f"C{i}", label=site)
    ax1.set_xlabel("block")
    ax1.set_ylabel("outlier features (|x| >= 6 at >= 6% of positions)")
    ax1.legend(fontsize=7)
    ax2.axhline(6, color="k", ls="--", lw=1)
    ax2.set_xlabel("block")
    ax2.set_ylabel("max |x| over the tokens (log)")
    ax2.legend(fontsize=7)
    t = scheme_table(runs)
    t = t[t.scheme != "float"]
    y = np.arange(len(t))
    ax3.barh(y, t.ratio - 1, xerr=t.ratio_se, color="C0")
    ax3.set_yticks(y, t.scheme, fontsize=7)
    ax3.invert_yaxis()
    ax3.set_xscale("symlog", linthresh=0.01)
    ax3.set_xlabel("perplexity ratio to float - 1 (paired se)")
    ax3.set_title("W8A8, int8 per-channel weights", fontsize=9)
    fig.suptitle("Gemma 3 270M: outlier features per block and input site; W8A8 schemes", fontsize=10)
    save(fig, out / "outliers.png")


def _md(t: pd.DataFrame) -> str:
    return t.to_markdown(index=False, floatfmt=".4g")


def readme(runs: pd.DataFrame, outl: pd.DataFrame, study: dict) -> str:
    """The study's README.md (tables from the stored runs; the findings are written from them)."""
    sysinfo = study.get("systematic") or {}
    per_site = outl.pivot_table(index="block", columns="site", values="outliers", aggfunc="sum")[list(SITE_LAYER)]
    absmax = outl.pivot_table(index="block", columns="site", values="absmax", aggfunc="max")[list(SITE_LAYER)]
    counts = per_site.astype(int).astype(str) + " (" + absmax.round(1).astype(str) + ")"
    counts.columns = [f"{c} ({int(outl[outl.site == c].width.iloc[0])})" for c in counts.columns]
    fl = runs[runs.method == "float"].iloc[0]
    return f"""# Ablation 4: LLM.int8() outlier features in Gemma 3 270M

{study['description']}.

What ran: `{study['command']}` ({study['wall_s'] / 60:.0f} min wall, model loading included; {study['environment']});
{len(runs)} runs. Setup in the script's docstring.

## Outlier features

Per block and input site: the paper's outlier features (magnitude >= 6 at >= 6% of the {int(outl.positions.iloc[0])}
positions) and, in brackets, the largest magnitude; the site's width in the header (`attn_in`: the normed input of
q/k/v, `attn_out`: o_proj's input, `mlp_in`: the normed input of gate/up, `mlp_hidden`: down_proj's input).

{counts.reset_index().to_markdown(index=False)}

Systematic hidden dimensions (an outlier in >= 25% of the 36 normed inputs `attn_in` + `mlp_in`): {sysinfo.get('hidden')};
over `attn_in` only: {sysinfo.get('attn_in')}; over `mlp_in` only: {sysinfo.get('mlp_in')}.

## W8A8

Perplexity on the first {int(fl['eval_tokens'])} tokens of Pride and Prejudice with its standard error, the paired
ratio to float, KL(float || quantized) per token and top-1 agreement:

{_md(scheme_table(runs))}

## Zeroing the outlier features

{_md(zero_table(runs))}

![outliers](outliers.png)
"""


if __name__ == "__main__":
    main()
