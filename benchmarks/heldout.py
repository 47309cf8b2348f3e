"""Held-out accuracy over calibration seeds (issue 13): does a method's lead survive text unlike the calibration text,
and is it larger than the run-to-run noise?

For every configuration the built-in SmolLM2-135M is pruned from the same dense weights with several calibration
seeds (different random windows of WikiText-2 validation text: ``calibration_samples(..., seed=)``) and scored on
held-out text: the raw WikiText-2 test split and two Gutenberg books (text unlike the calibration text). The table
gives, per text, the mean perplexity over seeds and its min-max. Beside it, the rounding-only noise floor: the same
seed with the calibration samples in another order (the same windows, so the same Hessians up to float rounding),
which moves a run as much as a backend or summation-order change does.

Every run is cached in ``<out>/heldout_runs.json`` (written atomically after each run), so an interrupted grid
resumes; runs are ordered by priority (every configuration at the first seeds, then the noise floor, then more seeds).

    python benchmarks/heldout.py                        # the default grid
    python benchmarks/heldout.py --seeds 0,1,2 --damp   # more seeds; joint with damp 0.1 too
    python benchmarks/heldout.py --report-only          # rebuild the table from the cache
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
TEXTS = {  # name -> (shared path parts, label)
    "wikitext2": (("data", "wikitext2", "test.raw.txt"), "WikiText-2 test (raw)"),
    "pride": (("data", "gutenberg", "pg1342.txt"), "Pride and Prejudice"),
    "moby": (("data", "gutenberg", "2701-0.txt"), "Moby Dick"),
}


def configs(sparsities=("0.5", "2:4"), damp: bool = False) -> list[dict]:
    """The compared configurations: Wanda, SparseGPT, joint (default mask) and joint with Wanda's mask."""
    out = []
    for sp in sparsities:
        out += [dict(method="wanda", sparsity=sp), dict(method="sparsegpt", sparsity=sp),
                dict(method="joint", sparsity=sp), dict(method="joint", sparsity=sp, mask="wanda")]
    if damp:
        for sp in sparsities:
            out += [dict(method="joint", sparsity=sp, damp=0.1), dict(method="joint", sparsity=sp, mask="wanda",
                                                                       damp=0.1)]
    return out


def config_of(c: dict):
    from pyprune import PruneConfig
    return PruneConfig(method=c["method"], sparsity=c["sparsity"], mask=c.get("mask"), damp=c.get("damp", 0.01))


def config_key(c: dict) -> str:
    cfg = config_of(c)
    parts = [cfg.method, str(cfg.sparsity)]
    if cfg.method == "joint":
        parts.append(cfg.mask)
    if cfg.damp != 0.01:
        parts.append(f"damp{cfg.damp:g}")
    return "/".join(parts)


BASE_NSAMPLES = 32  # keys of runs at another calibration size carry "/n<size>"


def run_key(c: dict, seed: int, order: int = 0, nsamples: int = BASE_NSAMPLES) -> str:
    n = f"/n{nsamples}" if nsamples != BASE_NSAMPLES else ""
    return f"{config_key(c)}{n}/seed{seed}" + (f"/order{order}" if order else "")


def plan(cfgs: list[dict], seeds: list[int], floor: list[dict], floor_seed: int) -> list[tuple[dict, int, int]]:
    """(config, seed, order) in priority order: every configuration at the first two seeds, then the noise floor
    (``floor`` configurations at ``floor_seed`` with the samples reordered), then the further seeds."""
    first, rest = seeds[:2], seeds[2:]
    runs = [(c, s, 0) for s in first for c in cfgs]
    runs += [(c, floor_seed, 1) for c in floor]
    runs += [(c, s, 0) for s in rest for c in cfgs]
    return runs


def reorder(calib: torch.Tensor, order: int) -> torch.Tensor:
    """The same samples in another order (order 0: unchanged)."""
    if not order:
        return calib
    perm = torch.randperm(calib.shape[0], generator=torch.Generator().manual_seed(1000 + order))
    return calib[perm]


def book_text(path: str) -> str:
    """A Gutenberg book without its licence header (from the '*** START OF' line on, when there is one)."""
    from pyprune.data import load_text
    text = load_text(path)
    at = text.find("*** START OF")
    if at >= 0:
        text = text[text.find("\n", at) + 1:]
    return text


def load_cache(path: str) -> dict:
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {}


def run_all(args, todo: list[tuple[dict, int, int]]) -> dict:
    from pyprune.data import calibration_samples, eval_windows, load_text, shared_file, tokenize
    from pyprune.evaluate import perplexity
    from pyprune.models.driver import prune_model
    from pyprune.models.io import load_model, load_tokenizer
    from pyprune.report import atomic_write_text

    cache_path = os.path.join(args.out, "heldout_runs.json")
    cache = load_cache(cache_path)
    todo = [r for r in todo if run_key(*r, args.nsamples) not in cache]
    if "dense" not in cache:
        todo = [None] + todo
    if args.max_runs is not None:
        todo = todo[:args.max_runs]
    if not todo:
        return cache
    model = load_model(args.model)
    tok = load_tokenizer(args.model)
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    calib_tokens = tokenize(tok, load_text(shared_file("data", "wikitext2", "valid.txt")))
    windows = {}
    for name, (parts, _) in TEXTS.items():
        path = shared_file(*parts)
        text = book_text(path) if parts[1] == "gutenberg" else load_text(path)
        windows[name] = eval_windows(tokenize(tok, text), args.seqlen, args.eval_windows)
    for i, run in enumerate(todo):
        t0 = time.perf_counter()
        model.load_state_dict(dense_state)
        if run is None:
            k, entry = "dense", dict(method="dense")
        else:
            c, seed, order = run
            k = run_key(c, seed, order, args.nsamples)
            cfg = config_of(c)
            calib = reorder(calibration_samples(calib_tokens, args.nsamples, args.seqlen, seed=seed), order)
            report = prune_model(model, calib, cfg, device=args.device)
            n = f"/n{args.nsamples}" if args.nsamples != BASE_NSAMPLES else ""
            entry = dict(c, config=config_key(c) + n, seed=seed, order=order, nsamples=args.nsamples,
                         settings=cfg.settings(), sparsity_achieved=report.sparsity, total_loss=report.total_loss,
                         prune_seconds=report.times["total"])
        t_eval = time.perf_counter()
        for name, w in windows.items():
            r = perplexity(model, w, device=args.device)
            entry[f"ppl_{name}"] = r["perplexity"]
            entry[f"window_nll_{name}"] = r["window_nll"]
        entry["eval_seconds"] = time.perf_counter() - t_eval
        entry["seconds"] = time.perf_counter() - t0
        cache = {**load_cache(cache_path), k: entry}
        atomic_write_text(cache_path, json.dumps(cache, indent=1) + "\n")
        print(f"[{i + 1}/{len(todo)}] {k}: " + ", ".join(f"{n} {entry[f'ppl_{n}']:.2f}" for n in TEXTS)
              + f" ({entry['seconds']:.0f} s, eval {entry['eval_seconds']:.0f} s)", flush=True)
    return cache


def on_windows(cache: dict, k: int) -> dict:
    """The cache with every perplexity taken over the first ``k`` windows of its text (runs scored on more windows
    stay comparable with runs scored on fewer: each window is scored on its own, so a prefix is an exact smaller
    evaluation). Runs with fewer than ``k`` windows keep their own."""
    out = {}
    for key_, e in cache.items():
        e = dict(e)
        for name in TEXTS:
            w = e.get(f"window_nll_{name}")
            if w and len(w) >= k:
                e[f"ppl_{name}"] = math.exp(statistics.fmean(w[:k]))
        out[key_] = e
    return out


def summarise(cache: dict) -> dict:
    """config key -> {"seeds": [...], text: (mean, min, max, sd or None)} over the order-0 runs."""
    by = {}
    for e in cache.values():
        if e.get("method") == "dense" or e.get("order"):
            continue
        by.setdefault(e["config"], []).append(e)
    out = {}
    for k, es in by.items():
        es.sort(key=lambda e: e["seed"])
        s = {"seeds": [e["seed"] for e in es]}
        for name in TEXTS:
            v = [e[f"ppl_{name}"] for e in es]
            s[name] = (statistics.fmean(v), min(v), max(v), statistics.stdev(v) if len(v) > 1 else None)
        out[k] = s
    return out


def noise_floor(cache: dict) -> list[tuple[str, int, str, float]]:
    """(config, seed, text, relative change) of every reordered run against its order-0 run."""
    out = []
    for e in cache.values():
        if not e.get("order"):
            continue
        base = cache.get(f"{e['config']}/seed{e['seed']}")  # config carries the calibration size
        if base is None:
            continue
        for name in TEXTS:
            out.append((e["config"], e["seed"], name, e[f"ppl_{name}"] / base[f"ppl_{name}"] - 1.0))
    return out


def verdicts(summary: dict) -> list[str]:
    """Pairs whose seed ranges do not overlap (min of one above max of the other), per sparsity and text."""
    lines = []
    keys = list(summary)
    for sp in sorted({k.split("/")[1] for k in keys}):
        ks = [k for k in keys if k.split("/")[1] == sp]
        for name, (_, label) in TEXTS.items():
            ranked = sorted(ks, key=lambda k: summary[k][name][0])
            best = ranked[0]
            beaten = [k for k in ranked[1:] if summary[k][name][1] > summary[best][name][2]]
            overlap = [k for k in ranked[1:] if k not in beaten]
            lines.append(f"- {sp}, {label}: lowest mean `{best}`; ranges apart from "
                         f"{', '.join(f'`{k}`' for k in beaten) or 'none'}; overlapping "
                         f"{', '.join(f'`{k}`' for k in overlap) or 'none'}.")
    return lines


def paired_seed_ratios(cache: dict, a: str, b: str) -> dict:
    """Per text: the perplexity ratio a / b at each seed both ran (same calibration windows)."""
    out = {}
    for name in TEXTS:
        r = []
        for e in cache.values():
            if e.get("config") == a and not e.get("order"):
                f = cache.get(f"{b}/seed{e['seed']}")
                if f is not None:
                    r.append(e[f"ppl_{name}"] / f[f"ppl_{name}"])
        out[name] = r
    return out


def write_report(cache: dict, args) -> str:
    from pyprune.report import atomic_write_text
    summary = summarise(cache)
    names = list(TEXTS)
    head = "| config | seeds | " + " | ".join(f"{TEXTS[n][1]}: mean (min-max)" for n in names) + " | prune s |"
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    if "dense" in cache:
        d = cache["dense"]
        rows.append("| dense | - | " + " | ".join(f"{d[f'ppl_{n}']:.2f}" for n in names) + " | - |")
    for k, s in summary.items():
        secs = [e["prune_seconds"] for e in cache.values() if e.get("config") == k and not e.get("order")]
        cells = [f"{s[n][0]:.2f} ({s[n][1]:.2f}-{s[n][2]:.2f})" for n in names]
        rows.append(f"| {k} | {','.join(map(str, s['seeds']))} | " + " | ".join(cells)
                    + f" | {statistics.fmean(secs):.0f} |")
    floor = noise_floor(cache)
    floor_rows = ["| config | seed | text | perplexity change from reordering the samples |", "|---|---|---|---|"]
    floor_rows += [f"| {c} | {s} | {TEXTS[n][1]} | {100 * d:+.2f}% |" for c, s, n, d in floor]
    worst = max((abs(d) for *_, d in floor), default=float("nan"))
    pairs = []
    for a in summary:
        parts = a.split("/")
        if parts[0] != "joint" or parts[2] != "wanda":
            continue
        sp, suffix = parts[1], "".join("/" + p for p in parts[3:])
        plain = "".join("/" + p for p in parts[3:] if not p.startswith("damp"))  # Wanda has no damping
        for b in (f"wanda/{sp}", f"joint/{sp}/" + ("exact" if ":" in sp else "sparsegpt"), f"sparsegpt/{sp}"):
            b = b + suffix if b + suffix in summary else b + plain
            if b in summary:
                r = paired_seed_ratios(cache, a, b)
                pairs.append(f"| `{a}` / `{b}` | " + " | ".join(
                    (f"{statistics.fmean(r[n]):.3f} ({min(r[n]):.3f}-{max(r[n]):.3f})" if r[n] else "-")
                    for n in names) + " |")
    hw = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    text = "\n".join([
        "# Held-out accuracy over calibration seeds: SmolLM2-135M (built-in GGUF), pruned on the CPU",
        "",
        f"Calibration: {args.nsamples} x {args.seqlen} tokens of WikiText-2 validation text at random positions; each "
        "seed draws other windows. Evaluation: perplexity on the first "
        f"{args.eval_windows} x {args.seqlen}-token windows of the raw WikiText-2 test split and of two Gutenberg "
        "books (after the licence header), text unlike the calibration text. B = 128, damping 0.01 unless the key "
        "says otherwise; joint's default masks (SparseGPT's saliency per row at 50%, the exact group subset at "
        f"2:4); `joint/.../wanda` is the joint update on Wanda's mask. Hardware: {hw} (shared; times are rough).",
        "",
        "## Perplexity: mean over seeds (min-max)",
        "",
        *rows,
        "",
        "## Which differences the seeds resolve",
        "",
        "Per sparsity and text: the configuration with the lowest mean, and the configurations whose whole seed range "
        "lies above its range (apart) or not (overlapping).",
        "",
        *verdicts(summary),
        "",
        "## Paired over seeds (same calibration windows): perplexity ratio, mean (min-max)",
        "",
        "| pair | " + " | ".join(TEXTS[n][1] for n in names) + " |",
        "|" + "---|" * (len(names) + 1),
        *pairs,
        "",
        "## Rounding-only noise floor",
        "",
        "The same calibration windows in another order: the Hessians are equal up to float32 summation order, so "
        "any change is rounding, amplified by the mask choice. " + (
            f"Largest change: {100 * worst:.1f}%." if floor else "Not measured yet (no reordered run finished)."),
        "",
        *floor_rows,
        ""])
    atomic_write_text(os.path.join(args.out, "heldout.md"), text)
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1", help="comma-separated calibration seeds")
    p.add_argument("--sparsities", default="0.5,2:4")
    p.add_argument("--damp", action="store_true", help="also joint (both masks) with damp 0.1")
    p.add_argument("--configs", help="comma-separated configuration keys to run, in this priority order "
                   "(e.g. wanda/0.5,joint/0.5/wanda); default: all")
    p.add_argument("--floor", default="joint/0.5/sparsegpt,joint/2:4/exact",
                   help="configuration keys that get a reordered-samples run at --floor-seed (the noise floor)")
    p.add_argument("--floor-seed", type=int, default=0)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=20)
    p.add_argument("--max-runs", type=int, default=None, help="stop after this many new runs (for timing)")
    p.add_argument("--model", default="builtin")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(HERE, "results"))
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    cfgs = configs(tuple(args.sparsities.split(",")), args.damp)
    if args.configs:
        by_key = {config_key(c): c for c in cfgs}
        missing = [k for k in args.configs.split(",") if k not in by_key]
        if missing:
            raise SystemExit(f"unknown configuration keys {missing}; known: {', '.join(by_key)}")
        cfgs = [by_key[k] for k in args.configs.split(",")]
    every = {config_key(c): c for c in configs(("0.5", "2:4", "0.6", "0.7", "4:8"), damp=True)}
    floor = [every[k] for k in (args.floor.split(",") if args.floor else []) if k in every]
    todo = plan(cfgs, [int(s) for s in args.seeds.split(",")], floor, args.floor_seed)
    cache = load_cache(os.path.join(args.out, "heldout_runs.json")) if args.report_only else run_all(args, todo)
    print(write_report(on_windows(cache, args.eval_windows), args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
