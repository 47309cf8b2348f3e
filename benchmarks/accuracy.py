"""Accuracy report: the joint method against SparseGPT, Wanda and magnitude on the built-in SmolLM2-135M.

Calibrates on WikiText-2 validation text, evaluates perplexity on WikiText-2 test text and, to catch methods that
only fit their calibration domain, on a Gutenberg book (text unlike the calibration text). Each configuration is one
sequential pruning run of the whole model from the same dense weights; results are cached in
``<out>/accuracy_runs.json`` (written atomically after every run), so an interrupted report resumes where it stopped.

    python benchmarks/accuracy.py                      # the full grid (about an hour on 2 CPU cores)
    python benchmarks/accuracy.py --grid quick         # 50% and 2:4 only
    python benchmarks/accuracy.py --report-only        # rebuild the table and plots from the cache
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SPARSITIES = ("0.5", "0.6", "0.7", "2:4", "4:8")


BASE_NSAMPLES = 32          # the calibration size of the first grid; keys of other sizes carry "/n<size>"
CALIBRATION_FREE = ("dense", "magnitude")


def grid(name: str, nsamples: int = BASE_NSAMPLES) -> list[dict]:
    """Each run: method, sparsity, block size, mask and damping (joint only). Ordered by priority, so a report cut
    short still holds the main comparison: 50% and 2:4 first, then the other sparsities, then the ablations.

    At the base calibration size the grid holds everything. At another size it holds the calibrated methods of the
    main comparison and their damping ablation: dense and magnitude do not look at calibration data, so their base
    runs stand for every size, and the block-size and mask ablations are measured once, at the base size."""
    runs = _grid(name)
    if nsamples == BASE_NSAMPLES:
        return runs
    keep = [r for r in runs if r["method"] not in CALIBRATION_FREE
            and r.get("block_size") == 128 and r.get("mask") is None]
    for r in keep:
        r["nsamples"] = nsamples
    # the main comparison first, then the per-row mask scope, then the damping ablation
    return sorted(keep, key=lambda r: ("mask_scope" in r) + 2 * ("damp" in r))


def _grid(name: str) -> list[dict]:
    main = [dict(method="dense")]
    sps = ("0.5", "2:4", "0.6", "0.7", "4:8") if name == "full" else ("0.5", "2:4")
    for sp in sps:
        for method in ("magnitude", "wanda", "sparsegpt", "joint"):
            main.append(dict(method=method, sparsity=sp, block_size=128))
    ablations = []
    for sp in ("0.5", "2:4"):
        # the unstructured ablations of the joint method use the per-block mask (they were measured before the
        # per-row mask became its default; the scope comparison below covers the default)
        scope = {} if ":" in sp else dict(mask_scope="block")
        ablations.append(dict(method="joint", sparsity=sp, block_size=128, damp=0.1, **scope))
        for B in (32, 64, 256):
            ablations.append(dict(method="joint", sparsity=sp, block_size=B, **scope))
        masks = ("diag", "greedy") if sp == "0.5" else ("diag", "sparsegpt", "greedy")
        for mask in masks:
            ablations.append(dict(method="joint", sparsity=sp, block_size=32 if mask == "greedy" else 128, mask=mask,
                                  **scope))
        ablations.append(dict(method="sparsegpt", sparsity=sp, block_size=32))
        ablations.append(dict(method="sparsegpt", sparsity=sp, block_size=128, damp=0.1))
    if name == "full":
        # mask scope: per row (Wanda's comparison group; the joint method's default) against one threshold per
        # rows x B block (SparseGPT's default), for both OBS methods: each method's other choice
        for sp in ("0.5", "0.6", "0.7"):
            ablations.append(dict(method="joint", sparsity=sp, block_size=128, mask_scope="block"))
            ablations.append(dict(method="sparsegpt", sparsity=sp, block_size=128, mask_scope="row"))
    # the 50% / 2:4 comparison and its damping ablation before the other sparsities
    first = [r for r in main if r.get("sparsity") in (None, "0.5", "2:4")]
    first += [r for r in ablations if r.get("damp")]
    return first + [r for r in main if r not in first] + [r for r in ablations if r not in first]


def key(run: dict) -> str:
    if run["method"] == "dense":
        return "dense"
    cfg = config_of(run)
    parts = [cfg.method, str(cfg.sparsity), f"B{cfg.block_size}"]
    if cfg.method == "joint":  # N:M has no mask scope; its cached keys say "block", as the config once did
        parts += [cfg.mask, cfg.mask_scope or "block"]
    elif cfg.mask_scope not in (None, "block"):
        parts.append(cfg.mask_scope)
    if cfg.damp != 0.01:
        parts.append(f"damp{cfg.damp:g}")
    n = run.get("nsamples", BASE_NSAMPLES)
    if n != BASE_NSAMPLES and cfg.method not in CALIBRATION_FREE:
        parts.append(f"n{n}")
    return "/".join(parts)


def nsamples_of(entry: dict) -> int | None:
    """The calibration size of a run; None for methods that do not look at calibration data."""
    return None if entry["method"] in CALIBRATION_FREE else entry.get("nsamples") or BASE_NSAMPLES


def config_of(run: dict):
    from pyprune import PruneConfig
    # swaps: this grid's keys predate exchanges (PruneConfig.swaps), so its runs keep none whatever the default
    return PruneConfig(method=run["method"], sparsity=run["sparsity"], block_size=run["block_size"],
                       mask=run.get("mask"), mask_scope=run.get("mask_scope"), damp=run.get("damp", 0.01),
                       swaps=run.get("swaps", 0))


def load_cache(path: str) -> dict:
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {}


def run_all(args) -> dict:
    from tqdm.auto import tqdm

    from pyprune.data import calibration_samples, eval_windows, load_text, shared_file, tokenize
    from pyprune.evaluate import perplexity
    from pyprune.models.driver import prune_model
    from pyprune.models.io import load_model, load_tokenizer, resolve_model
    from pyprune.report import atomic_write_text

    cache_path = os.path.join(args.out, "accuracy_runs.json")
    cache = load_cache(cache_path)
    refresh = set(args.refresh.split(",")) if args.refresh else set()
    todo = [r for r in grid(args.grid, args.nsamples) if key(r) not in cache or key(r) in refresh]
    if args.only:
        wanted = args.only.split(",")
        todo = [r for r in todo if any(w in key(r) for w in wanted)]
    if not todo:
        return cache
    source = resolve_model("builtin")
    model = load_model(source)
    tok = load_tokenizer(source)
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    calib = calibration_samples(tokenize(tok, load_text(shared_file("data", "wikitext2", "valid.txt"))),
                                args.nsamples, args.seqlen, seed=args.seed)
    wiki = eval_windows(tokenize(tok, load_text(shared_file("data", "wikitext2", "test.txt"))), args.seqlen,
                        args.eval_windows)
    book = eval_windows(tokenize(tok, load_text(shared_file("data", "gutenberg", "pg1342.txt"))), args.seqlen,
                        args.ood_windows)
    for run in tqdm(todo, desc="configurations", dynamic_ncols=True):
        model.load_state_dict(dense_state)
        entry = dict(run, nsamples=args.nsamples if run["method"] not in CALIBRATION_FREE else None)
        if run["method"] != "dense":
            cfg = config_of(run)
            # one window per forward pass, as every recorded run (the default batches windows: the same
            # numbers up to rounding, which moves perplexities by up to the noise floor)
            report = prune_model(model, calib, cfg, device=args.device, batch_size=1)
            entry.update(mask=cfg.mask if cfg.method == "joint" else None, sparsity_achieved=report.sparsity,
                         total_loss=report.total_loss, prune_seconds=report.times["total"],
                         solve_seconds=sum(layer.seconds for layer in report.layers),
                         peak_host_rss=report.peak_host_rss, peak_device_memory=report.peak_device_memory,
                         layer_loss={layer.name: layer.loss for layer in report.layers})
        for text, windows in (("wikitext2", wiki), ("book", book)):
            result = perplexity(model, windows, device=args.device)
            entry[f"ppl_{text}"] = result["perplexity"]
            entry[f"window_nll_{text}"] = result["window_nll"]  # for paired_gaps
        # merge into what is on disk now (another run of this script may have added entries meanwhile)
        cache = {**load_cache(cache_path), key(run): entry}
        atomic_write_text(cache_path, json.dumps(cache, indent=1) + "\n")
    return cache


def reference_key(k: str) -> str:
    """SparseGPT at B=128 with the same sparsity, damping and calibration size as run k."""
    parts = k.split("/")
    return "/".join(["sparsegpt", parts[1], "B128"] + [p for p in parts[3:] if p.startswith(("damp", "n"))])


def layer_ratios(cache: dict, k: str) -> tuple[float, float] | None:
    """Median and worst per-layer loss ratio of run k against SparseGPT (B=128) at the same sparsity, damping and
    calibration size (the losses are measured with the damped H_d, so only runs with equal damping compare)."""
    e = cache[k]
    ref = cache.get(reference_key(k))
    if ref is None or ref is e or "layer_loss" not in e:
        return None
    r = [e["layer_loss"][n] / ref["layer_loss"][n] for n in e["layer_loss"]
         if n in ref["layer_loss"] and ref["layer_loss"][n] and math.isfinite(e["layer_loss"][n] or math.nan)]
    return (statistics.median(r), max(r)) if r else None


def main_key(method: str, sp: str, n: int = BASE_NSAMPLES) -> str:
    """The main comparison's run: B=128, default mask (exact for N:M, SparseGPT's saliency otherwise)."""
    if method == "dense":
        return "dense"
    return key(dict(method=method, sparsity=sp, block_size=128, nsamples=n))


def calibration_sizes(cache: dict) -> list[int]:
    return sorted({nsamples_of(e) for e in cache.values() if nsamples_of(e)})


def summary_table(cache: dict, n: int) -> list[str]:
    """Methods x sparsities, 'WikiText-2 / book' perplexity; the best calibrated method per column in bold."""
    sps = [sp for sp in SPARSITIES if any(main_key(m, sp, n) in cache for m in ("wanda", "sparsegpt", "joint"))]
    head = "| method | " + " | ".join(sps) + " |"
    rows = [head, "|" + "---|" * (len(sps) + 1)]
    best = {}
    for sp in sps:
        vals = {m: cache[main_key(m, sp, n)] for m in ("wanda", "sparsegpt", "joint") if main_key(m, sp, n) in cache}
        best[sp] = {metric: min(vals, key=lambda m: vals[m][metric]) for metric in ("ppl_wikitext2", "ppl_book")}
    if "dense" in cache:
        d = cache["dense"]
        rows.append("| dense | " + " | ".join(f"{d['ppl_wikitext2']:.1f} / {d['ppl_book']:.1f}" for _ in sps) + " |")
    for m in ("magnitude", "wanda", "sparsegpt", "joint"):
        cells = []
        for sp in sps:
            e = cache.get(main_key(m, sp, n))
            if e is None:
                cells.append("-")
                continue
            w, b = f"{e['ppl_wikitext2']:.1f}", f"{e['ppl_book']:.1f}"
            w = f"**{w}**" if best[sp]["ppl_wikitext2"] == m else w
            b = f"**{b}**" if best[sp]["ppl_book"] == m else b
            cells.append(f"{w} / {b}")
        rows.append(f"| {m} | " + " | ".join(cells) + " |")
    return rows


def write_report(cache: dict, args) -> str:
    from pyprune.report import atomic_write_text
    rows = []
    head = ("| run | method | sparsity | B | mask | calib | ppl WikiText-2 | ppl book | achieved | summed layer loss | "
            "loss / SparseGPT (median, worst layer) | prune s | peak RSS MiB |")
    rows += [head, "|" + "---|" * (head.count("|") - 1)]
    known = [key(r) for n in calibration_sizes(cache) for r in grid("full", n)]
    order = list(dict.fromkeys(known + list(cache)))
    for k in order:
        if k not in cache:
            continue
        e = cache[k]
        ratio = layer_ratios(cache, k) if e["method"] in ("joint", "sparsegpt") else None
        rows.append("| " + " | ".join([
            k, e["method"], str(e.get("sparsity", "-")), str(e.get("block_size", "-")), str(e.get("mask") or "-"),
            f"{nsamples_of(e)} x {args.seqlen}" if nsamples_of(e) else "-",
            f"{e['ppl_wikitext2']:.2f}", f"{e['ppl_book']:.2f}",
            f"{e['sparsity_achieved']:.4f}" if "sparsity_achieved" in e else "-",
            f"{e['total_loss']:.4g}" if e.get("total_loss") is not None and math.isfinite(e["total_loss"]) else "-",
            f"{ratio[0]:.3f}, {ratio[1]:.3f}" if ratio else "-",
            f"{e['prune_seconds']:.0f}" if "prune_seconds" in e else "-",
            f"{e['peak_host_rss'] / 2**20:.0f}" if e.get("peak_host_rss") else "-"]) + " |")
    hw = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    summaries = []
    for n in calibration_sizes(cache):
        summaries += [f"## Perplexity, WikiText-2 test / book, calibrated on {n} x {args.seqlen} tokens", "",
                      *summary_table(cache, n), ""]
    text = "\n".join([
        "# Accuracy: SmolLM2-135M (built-in GGUF), pruned on the CPU",
        "",
        f"Calibration: N x {args.seqlen} tokens of WikiText-2 validation text (seed {args.seed}; N in the `calib` "
        f"column). Evaluation: perplexity on {args.eval_windows} x {args.seqlen} tokens of WikiText-2 test text and "
        f"{args.ood_windows} x {args.seqlen} tokens of Pride and Prejudice (Gutenberg pg1342; text unlike the "
        f"calibration text). Hardware: {hw}. Times include Hessian collection and block re-runs; the machine was "
        "shared with other work, so treat them as rough. Magnitude and dense do not use calibration data.",
        "",
        "B=128 and each method's default masks: SparseGPT's saliency for unstructured sparsity (per rows x B block "
        "for SparseGPT, per row for the joint method) and the exact group subset for the joint method's N:M. The "
        "lowest perplexity among Wanda, SparseGPT and joint is in bold.",
        "",
        *summaries,
        *paired_gaps(cache),
        "## Every run",
        "",
        "Summed layer loss and the per-layer ratio are measured with the damped Hessian, against SparseGPT at the "
        "same sparsity, damping and calibration size.",
        "",
        *rows, ""])
    atomic_write_text(os.path.join(args.out, "accuracy.md"), text)
    atomic_write_text(os.path.join(args.out, "accuracy.json"), json.dumps(
        {"settings": vars(args), "hardware": hw, "runs": cache}, indent=1, default=str) + "\n")
    plots(cache, args.out)
    return text


def paired_gaps(cache: dict) -> list[str]:
    """Joint against SparseGPT on the same evaluation windows: the mean per-window NLL difference d (perplexity ratio
    exp(d)) and its standard error over the windows, for the main runs that stored per-window NLLs. A ratio within
    about 2 SE of 1 is not a difference the evaluation can resolve."""
    lines = []
    for n in calibration_sizes(cache):
        for sp in SPARSITIES:
            j, g = cache.get(main_key("joint", sp, n)), cache.get(main_key("sparsegpt", sp, n))
            if not j or not g:
                continue
            cells = []
            for text in ("wikitext2", "book"):
                a, b = j.get(f"window_nll_{text}"), g.get(f"window_nll_{text}")
                if not a or not b or len(a) != len(b) or len(a) < 2:
                    cells.append(None)
                    continue
                d = [x - y for x, y in zip(a, b)]
                mean, se = statistics.fmean(d), statistics.stdev(d) / math.sqrt(len(d))
                cells.append(f"{math.exp(mean):.3f} ({math.exp(mean - 2 * se):.3f}-{math.exp(mean + 2 * se):.3f})")
            if any(cells):
                lines.append(f"| {sp} | {n} x 512 | " + " | ".join(c or "-" for c in cells) + " |")
    if not lines:
        return []
    return ["## Joint against SparseGPT, paired over the evaluation windows", "",
            "Perplexity ratio joint / SparseGPT from the mean per-window NLL difference, with the range of +-2 "
            "standard errors over the windows (runs that stored per-window NLLs only).", "",
            "| sparsity | calibration | WikiText-2 | book |", "|---|---|---|---|", *lines, ""]


def headline_nsamples(cache: dict) -> int:
    """The largest calibration size whose main comparison is complete at 50% (the plots show it)."""
    done = [n for n in calibration_sizes(cache)
            if all(main_key(m, "0.5", n) in cache for m in ("wanda", "sparsegpt", "joint"))]
    return max(done) if done else BASE_NSAMPLES


def plots(cache: dict, out: str) -> None:
    n = headline_nsamples(cache)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric, title in ((axes[0], "ppl_wikitext2", "WikiText-2 test"), (axes[1], "ppl_book", "Gutenberg book")):
        for method, style in (("magnitude", "s:"), ("wanda", "^--"), ("sparsegpt", "o-"), ("joint", "D-")):
            xs, ys = [], []
            for sp in ("0.5", "0.6", "0.7"):
                k = main_key(method, sp, n)
                if k in cache:
                    xs.append(float(sp) * 100)
                    ys.append(cache[k][metric])
            if len(xs) > 1:
                ax.plot(xs, ys, style, label=method)
        if "dense" in cache:
            ax.axhline(cache["dense"][metric], color="gray", lw=0.8, label="dense")
        ax.set_yscale("log")
        ax.set_xlabel("unstructured sparsity (%)")
        ax.set_ylabel("perplexity (log scale)")
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"SmolLM2-135M: perplexity against sparsity, calibrated on {n} x 512 tokens (lower is better)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "accuracy_sparsity.png"), dpi=110)
    plt.close(fig)

    settings = [sp for sp in SPARSITIES if any(main_key(m, sp, n) in cache for m in ("wanda", "sparsegpt", "joint"))]
    bar_figure(cache, settings, [(m, lambda sp, m=m: main_key(m, sp, n), {}) for m in
                                 ("magnitude", "wanda", "sparsegpt", "joint")],
               f"SmolLM2-135M: perplexity per method and sparsity, calibrated on {n} x 512 tokens (lower is better)",
               os.path.join(out, "accuracy_methods.png"), plt)
    bars = [("wanda", lambda sp: main_key("wanda", sp, n), dict(color="C1")),
            ("joint", lambda sp: main_key("joint", sp, n), dict(color="C3"))]
    if scope_key("joint", "0.5", "block", n) in cache:  # the joint method with SparseGPT's per-block mask rule
        bars.append(("joint, mask per rows x B block",  # unstructured only ("" is no run)
                     lambda sp: "" if ":" in sp else scope_key("joint", sp, "block", n), dict(color="C3", alpha=0.4)))
    bar_figure(cache, settings, bars, f"Perplexity relative to SparseGPT (below 1: better than SparseGPT), "
               f"calibrated on {n} x 512 tokens", os.path.join(out, "accuracy_vs_sparsegpt.png"), plt,
               ref_at=lambda sp: main_key("sparsegpt", sp, n))

    sizes = calibration_sizes(cache)
    if len(sizes) > 1:
        calibration_plot(cache, sizes, out, plt)
    scope_plot(cache, sizes, out, plt)

    # block size: summed layer loss and perplexity (solve times, measured without the shared forward passes, are in
    # layer_ablations.py's plot)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (sp, mask) in enumerate((("0.5", "sparsegpt/block"), ("2:4", "exact/block"))):
        at = [(B, cache[f"joint/{sp}/B{B}/{mask}"]) for B in (32, 64, 128, 256) if f"joint/{sp}/B{B}/{mask}" in cache]
        ref = cache.get(f"sparsegpt/{sp}/B128")
        if at:
            axes[0].plot([B for B, _ in at], [e["total_loss"] for _, e in at], "D-", color=f"C{i}",
                         label=f"joint {sp}")
            for metric, style, name in (("ppl_wikitext2", "D-", "WikiText-2"), ("ppl_book", "o:", "book")):
                axes[1].plot([B for B, _ in at], [e[metric] for _, e in at], style, color=f"C{i}",
                             label=f"joint {sp}, {name}")
        if ref:
            axes[0].axhline(ref["total_loss"], ls="--", lw=0.8, color=f"C{i}", label=f"SparseGPT {sp}")
    for ax, label in ((axes[0], "summed layer loss"), (axes[1], "perplexity (log scale)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("block size B")
        ax.set_ylabel(label)
        ax.legend(fontsize=8, loc="center right")
    axes[1].set_yscale("log")
    fig.suptitle(f"Joint method against block size ({BASE_NSAMPLES} x 512 calibration tokens)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "accuracy_blocksize.png"), dpi=110)
    plt.close(fig)


def calibration_plot(cache: dict, sizes: list[int], out: str, plt) -> None:
    """Perplexity of the calibrated methods at each calibration size: does more calibration text cure the
    weight updates' over-fitting to the calibration domain?"""
    methods = ("wanda", "sparsegpt", "joint")
    settings = [sp for sp in SPARSITIES if all(main_key(m, sp, n) in cache for m in methods for n in sizes)]
    if not settings:
        return
    bars = [(f"{m}, {n} x 512", lambda sp, m=m, n=n: main_key(m, sp, n),
             dict(color=f"C{methods.index(m) + 1}", alpha=0.45 + 0.55 * sizes.index(n) / (len(sizes) - 1)))
            for m in methods for n in sizes]
    bar_figure(cache, settings, bars, "More calibration text: perplexity per calibration size (light: fewer "
               "tokens; lower is better)", os.path.join(out, "accuracy_calibration.png"), plt)


def scope_key(method: str, sp: str, scope: str, n: int) -> str:
    return key(dict(method=method, sparsity=sp, block_size=128, mask_scope=scope, nsamples=n))


def scope_plot(cache: dict, sizes: list[int], out: str, plt) -> None:
    """Unstructured masks: one threshold per rows x B block against the same fraction in every row (Wanda's
    comparison group), for both OBS methods, at the largest calibration size that has the per-row runs."""
    with_rows = [n for n in sizes if scope_key("joint", "0.5", "row", n) in cache]
    if not with_rows:
        return
    n = max(with_rows)
    bars = [("wanda", lambda sp: main_key("wanda", sp, n), dict(color="C1"))]
    for i, method in enumerate(("sparsegpt", "joint")):
        for scope in ("block", "row"):
            bars.append((f"{method}, mask per {scope}", lambda sp, m=method, sc=scope: scope_key(m, sp, sc, n),
                         dict(color=f"C{i + 2}", alpha=0.5 if scope == "block" else 1.0)))
    bar_figure(cache, ["0.5", "0.6", "0.7"], bars, f"Mask scope: per block (light) or per row, calibrated on {n} x 512 "
               "tokens (lower is better)", os.path.join(out, "accuracy_maskscope.png"), plt)


RATIO_BOTTOM, RATIO_TOP = 0.7, 1.2  # the zoom of the perplexity-ratio plot


def bar_figure(cache: dict, settings: list[str], bars: list, title: str, path: str, plt, ref_at=None) -> None:
    """WikiText-2 and book perplexity side by side: a group of bars per sparsity setting, one bar per
    (label, key of the run at a setting, bar style). With ``ref_at`` (key of the reference run at a setting) the bars
    are perplexity ratios to that run, on a linear scale with the reference at 1."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / len(bars)
    for ax, metric, name in ((axes[0], "ppl_wikitext2", "WikiText-2 test"), (axes[1], "ppl_book", "Gutenberg book")):
        for j, (label, key_at, style) in enumerate(bars):
            at = [(i, sp, key_at(sp)) for i, sp in enumerate(settings)
                  if key_at(sp) in cache and (ref_at is None or ref_at(sp) in cache)]
            vals = [cache[k][metric] / (cache[ref_at(sp)][metric] if ref_at else 1.0) for _, sp, k in at]
            xs = [i + (j - (len(bars) - 1) / 2) * width for i, _, _ in at]
            if ref_at is not None:  # a zoomed linear axis: bars above it are cut and labelled with their value
                ax.bar(xs, [min(v, RATIO_TOP) for v in vals], width, label=label, **style)
                for x, v in zip(xs, vals):
                    ax.text(x, min(v, RATIO_TOP), f"{v:.2f}" if v > RATIO_TOP else f"{v:.3f}", ha="center",
                            va="bottom", fontsize=6, rotation=90)
            else:
                ax.bar(xs, vals, width, label=label, **style)
        if ref_at is not None:
            ax.axhline(1.0, color="C2", lw=1.0, label="SparseGPT (= 1)")
            ax.set_ylim(RATIO_BOTTOM, RATIO_TOP + 0.06)
            ax.set_ylabel("perplexity / SparseGPT's")
        else:
            if "dense" in cache:
                ax.axhline(cache["dense"][metric], color="gray", lw=0.8, label="dense")
            ax.set_yscale("log")
            ax.set_ylabel("perplexity (log scale)")
        ax.set_xticks(range(len(settings)), settings)
        ax.set_xlabel("sparsity")
        ax.set_title(name)
        if ref_at is None:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    if ref_at is not None:  # one legend under both panels, clear of the bars
        fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=len(bars) + 1, fontsize=8)
        fig.tight_layout(rect=(0, 0.07, 1, 1))
    else:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", choices=("full", "quick"), default="full")
    p.add_argument("--only", help="run only configurations whose key contains one of these comma-separated texts")
    p.add_argument("--refresh", help="comma-separated keys of cached runs to run again (the new entry replaces the "
                   "old one; e.g. to record per-window NLLs for paired comparisons)")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--ood-windows", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(HERE, "results"))
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    cache = load_cache(os.path.join(args.out, "accuracy_runs.json")) if args.report_only else run_all(args)
    print(write_report(cache, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
