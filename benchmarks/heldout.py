"""Held-out accuracy over calibration seeds (issues 13 and 22): does a method's lead survive text unlike the
calibration text, and is it larger than the run-to-run noise?

For every configuration the built-in SmolLM2-135M is pruned from the same dense weights with several calibration
seeds (different random windows of the calibration text: ``calibration_samples(..., seed=)``) and scored on held-out
text (``TEXTS``): the raw WikiText-2 test split, two Gutenberg books, Python source (standard-library files never used
for calibration) and the decimal module's test tables (neither prose nor code). The report gives, per text, the mean
perplexity over seeds with its min-max and standard deviation, paired ratios over seeds, per calibration the methods
side by side, and the rounding-only noise floor: the same seed with the calibration samples in another order (the
same windows, so the same Hessians up to float rounding), or another backend.

A configuration is a key,
``method/sparsity[/mask][/damp<x>][/shrink<x>][/swap<k>][/owl[<lambda>]][/n<samples>][/<calibration>]``:
- ``mask`` (joint only): ``sparsegpt``, ``exact``, ``wanda``, ... (docs/ALGORITHM.md section 4); default: joint's
  default;
- ``damp<x>``: relative damping (default 0.01);
- ``shrink<x>`` (joint, SparseGPT): the fraction of H's off-diagonal removed (``PruneConfig.shrink``); no ``shrink``
  part means 0, whatever pyprune's default;
- ``swap<k>`` (joint only): at most k pruned/kept exchanges per row of a block (``PruneConfig.swaps``); no ``swap``
  part means none, whatever pyprune's default (keys name settings, not defaults);
- ``owl`` / ``owl<lambda>`` (unstructured fractions only): OWL's per-block sparsity allocation
  (``prune_model(sparsity_profile="owl", owl_lambda=...)``, M = 5; ``owl`` alone: lambda 0.08, pyprune's default),
  compared with the same configuration without it and, for joint, with Wanda and SparseGPT under the same allocation;
- ``n<k>``: calibration samples (default ``--nsamples``);
- calibration (``CALIB_SOURCES``; none: WikiText-2 validation alone): ``book`` (A Tale of Two Cities, never scored),
  ``code`` (Python source: ``CODE_CALIB``), ``self`` (text the dense model generates itself, pyprune.selfcalib, with
  the calibration seed), or several joined by ``+`` with the samples split evenly (``self+code``); ``mix`` is
  ``wiki+book``, half WikiText-2 validation and half the book.

Every run is cached in ``<out>/heldout_runs.json`` (written atomically after each run), so an interrupted grid
resumes; runs go in the order given (every configuration at each seed in turn, the noise floor after the first seed).
Runs cached before a text was added have no score on it (``-`` in the report); the dense model is scored on it once.

    python benchmarks/heldout.py --configs wanda/2:4/code,joint/2:4/exact/swap16/code --seeds 0,1,2 --threads 1
    python benchmarks/heldout.py --report-only          # rebuild the report from the cache
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
# Source code and structured data that every CPython install of this interpreter ships (no download): files of the
# standard library, a fixed sorted list each, read from sysconfig's "stdlib" folder. The calibration code and the
# evaluation code never share a file (checked at import).
CODE_EVAL = ("fractions.py", "functools.py", "random.py", "statistics.py", "traceback.py")
CODE_CALIB = ("argparse.py", "ast.py", "dataclasses.py", "datetime.py", "enum.py", "inspect.py", "pathlib.py",
              "shutil.py", "subprocess.py", "threading.py", "typing.py", "zipfile.py")
assert not set(CODE_EVAL) & set(CODE_CALIB)
# Neither prose nor code: the General Decimal Arithmetic test tables (operation, operands, result, conditions; one
# case a line) that CPython ships for its decimal module.
TABLES_EVAL = ("test/decimaltestdata/add.decTest", "test/decimaltestdata/divide.decTest",
               "test/decimaltestdata/multiply.decTest")
TEXTS = {  # name -> (shared path parts, or ("stdlib", files), label)
    "wikitext2": (("data", "wikitext2", "test.raw.txt"), "WikiText-2 test (raw)"),
    "pride": (("data", "gutenberg", "pg1342.txt"), "Pride and Prejudice"),
    "moby": (("data", "gutenberg", "2701-0.txt"), "Moby Dick"),
    "code": (("stdlib", CODE_EVAL), "Python source"),
    "tables": (("stdlib", TABLES_EVAL), "decimal test tables"),
}
# Calibration sources a key may name (joined by "+" for an even split; "mix" = wiki+book; none: wiki). "self": text
# the dense model generates itself (pyprune.selfcalib), drawn with the calibration seed.
CALIB_SOURCES = {"wiki": "WikiText-2 validation", "book": "A Tale of Two Cities", "code": "Python source (calibration "
                 "files)", "self": "self-generated"}
DEFAULT_CALIB = ("wiki",)
MIX = ("wiki", "book")
DEFAULT_DAMP = 0.01


def calib_part(p: str) -> tuple[str, ...] | None:
    """A key part naming a calibration (``mix``, ``code``, ``self+code``, ...) -> its sources; None if it is not one."""
    if p == "mix":
        return MIX
    names = tuple(p.split("+"))
    if all(n in CALIB_SOURCES for n in names) and len(set(names)) == len(names):
        return names
    return None


def calib_label(part: str) -> str:
    """Words for a calibration key part."""
    return " + ".join(CALIB_SOURCES[n] for n in (calib_part(part) if part else DEFAULT_CALIB))


def calib_name(sources) -> str:
    """The key part of a calibration ("" for the default)."""
    sources = tuple(sources)
    return "" if sources == DEFAULT_CALIB else "mix" if sources == MIX else "+".join(sources)


def stdlib_text(files) -> str:
    """The named standard-library files, read strictly as UTF-8 and joined in the given order."""
    import sysconfig
    from pyprune.data import read_text_file
    root = sysconfig.get_paths()["stdlib"]
    missing = [f for f in files if not os.path.isfile(os.path.join(root, f))]
    if missing:
        raise SystemExit(f"standard-library file(s) {', '.join(missing)} missing under {root!r} (this interpreter's "
                         "install lacks them)")
    return "\n".join(read_text_file(os.path.join(root, f)) for f in files)


def text_of(name: str) -> str:
    """The text of evaluation text ``name`` (TEXTS)."""
    from pyprune.data import load_text, shared_file
    parts = TEXTS[name][0]
    if parts[0] == "stdlib":
        return stdlib_text(parts[1])
    path = shared_file(*parts)
    return book_text(path) if parts[1] == "gutenberg" else load_text(path)


def text_hashes() -> dict:
    """name -> sha256 of each evaluation text and of the code calibration text, as read."""
    import hashlib
    out = {n: hashlib.sha256(text_of(n).encode()).hexdigest() for n in TEXTS}
    out["code (calibration)"] = hashlib.sha256(stdlib_text(CODE_CALIB).encode()).hexdigest()
    return out


def parse_key(key: str, nsamples: int) -> dict:
    """A configuration key -> {method, sparsity, mask, damp, swaps, nsamples, mix, calib}; raises SystemExit naming a
    bad part."""
    parts = key.split("/")
    if len(parts) < 2:
        raise SystemExit(f"configuration key {key!r}: expected method/sparsity[/mask][/damp<x>][/swap<k>][/n<k>][/mix]")
    c = dict(method=parts[0], sparsity=parts[1], mask=None, damp=DEFAULT_DAMP, swaps=0, nsamples=nsamples, mix=False,
             calib=DEFAULT_CALIB)
    seen_calib = None
    for p in parts[2:]:
        if calib_part(p) is not None:
            if seen_calib:
                raise SystemExit(f"configuration key {key!r}: two calibration parts ({seen_calib!r}, {p!r}); join "
                                 "sources with '+' (e.g. self+code)")
            seen_calib = p
            c["calib"] = calib_part(p)
            c["mix"] = c["calib"] == MIX
        elif p.startswith("damp"):
            c["damp"] = float(p[4:])
        elif p.startswith("shrink"):
            c["shrink"] = float(p[6:])
        elif p.startswith("swap") and p[4:].isdigit():
            c["swaps"] = int(p[4:])
        elif owl_part(p) is not None:
            c["owl"] = owl_part(p)
        elif p.startswith("n") and p[1:].isdigit():
            c["nsamples"] = int(p[1:])
        elif c["mask"] is None and c["method"] == "joint":
            c["mask"] = p
        else:
            raise SystemExit(f"configuration key {key!r}: unknown part {p!r}")
    cfg = config_of(c)  # validates method, sparsity, mask and damp
    if "owl" in c:
        from pyprune.owl import make_profile
        try:
            make_profile("owl", cfg.sparsity, lam=c["owl"])
        except ValueError as e:
            raise SystemExit(f"configuration key {key!r}: {e}") from None
    return c


def owl_part(p: str) -> float | None:
    """A key part ``owl`` / ``owl<lambda>`` -> the profile's lambda; None if it is not one."""
    from pyprune.owl import OWL_LAMBDA
    if p == "owl":
        return OWL_LAMBDA
    if p.startswith("owl"):
        try:
            return float(p[3:])
        except ValueError:
            return None
    return None


def profile_of(c: dict) -> dict:
    """The sparsity-profile keywords of ``prune_model`` a configuration asks for (none without ``owl``)."""
    return {"sparsity_profile": "owl", "owl_lambda": c["owl"]} if "owl" in c else {}


def config_of(c: dict):
    from pyprune import PruneConfig
    return PruneConfig(method=c["method"], sparsity=c["sparsity"], mask=c.get("mask"), damp=c.get("damp", DEFAULT_DAMP),
                       swaps=c.get("swaps", 0), shrink=c.get("shrink", 0.0))


def config_key(c: dict, nsamples: int) -> str:
    """The canonical key of a configuration (joint's mask spelled out; defaults left out)."""
    cfg = config_of(c)
    parts = [cfg.method, str(cfg.sparsity)]
    if cfg.method == "joint":
        parts.append(cfg.mask)
    if cfg.damp != DEFAULT_DAMP:
        parts.append(f"damp{cfg.damp:g}")
    if cfg.shrink:
        parts.append(f"shrink{cfg.shrink:g}")
    if cfg.swaps:
        parts.append(f"swap{cfg.swaps}")
    if "owl" in c:
        from pyprune.owl import OWL_LAMBDA
        parts.append("owl" if c["owl"] == OWL_LAMBDA else f"owl{c['owl']:g}")
    if c.get("nsamples", nsamples) != nsamples:
        parts.append(f"n{c['nsamples']}")
    cal = calib_name(c.get("calib") or (MIX if c.get("mix") else DEFAULT_CALIB))
    if cal:
        parts.append(cal)
    return "/".join(parts)


FLOOR_KINDS = {  # noise-floor run kind (run key suffix) -> what changes against the plain run
    "order1": "the same samples in another order",
    "torch": "the torch backend instead of the default (C++ on the CPU)",
}


BASELINES = ("wanda", "sparsegpt", "llmc-wanda", "llmc-sparsegpt")  # pyprune's and llm-compressor's


def run_key(ckey: str, seed: int, floor: str = "") -> str:
    """``<config>/seed<s>``, then ``/<floor kind>`` for a noise-floor run."""
    return f"{ckey}/seed{seed}" + (f"/{floor}" if floor else "")


def is_floor(e: dict) -> bool:
    """A noise-floor run (reordered samples: ``order``; another backend: ``floor``), not a configuration's run."""
    return bool(e.get("order") or e.get("floor"))


def plan(ckeys: list[str], seeds: list[int], floor: list[str], kinds=("order1",)) -> list[tuple[str, int, str]]:
    """(config key, seed, floor kind) in run order: every configuration at the first seed, the noise floor (``floor``
    configurations at the first seed, once per kind of ``FLOOR_KINDS`` in ``kinds``), then every configuration at each
    further seed."""
    runs = [(k, seeds[0], "") for k in ckeys]
    runs += [(k, seeds[0], kind) for k in floor for kind in kinds]
    runs += [(k, s, "") for s in seeds[1:] for k in ckeys]
    return runs


def reorder(calib: torch.Tensor, order: int) -> torch.Tensor:
    """The same samples in another order (order 0: unchanged)."""
    if not order:
        return calib
    perm = torch.randperm(calib.shape[0], generator=torch.Generator().manual_seed(1000 + order))
    return calib[perm]


def book_text(path: str) -> str:
    """A Gutenberg book without its licence header (from the '*** START OF' line on, when there is one)."""
    from pyprune.data import load_text, strip_gutenberg_header
    return strip_gutenberg_header(load_text(path))


def calibration(sources: dict, c: dict, seed: int, seqlen: int, generate=None) -> torch.Tensor:
    """The calibration windows of a configuration: ``nsamples`` split as evenly as possible between its sources (the
    first ``nsamples % k`` get one more), each drawn with the same seed: windows of a token stream ``sources[name]``,
    or for ``self`` ``generate(count, seed)`` (text the dense model generates). ``mix``: half WikiText-2 validation,
    half the calibration book, exactly ``mixed_calibration_samples``'s windows."""
    from pyprune.data import calibration_samples
    names = c.get("calib") or (MIX if c.get("mix") else DEFAULT_CALIB)
    n, k = c["nsamples"], len(names)
    counts = [n // k + (i < n % k) for i in range(k)]
    parts = []
    for name, count in zip(names, counts):
        if name == "self":
            if generate is None:
                raise ValueError("self-generated calibration needs the model (a generate function)")
            parts.append(generate(count, seed))
        else:
            parts.append(calibration_samples(sources[name], count, seqlen, seed=seed))
    return torch.cat(parts)


def texts(tok, seqlen: int, eval_windows: int) -> tuple[dict, dict]:
    """(calibration token streams {"wiki", "book", "code"}, evaluation windows per TEXTS name)."""
    from pyprune.data import eval_windows as windows_of, load_text, tokenize
    # the calibration splits of pyprune.data's named texts: WikiText-2 validation and A Tale of Two Cities (never
    # scored here), and the calibration code files (no file shared with the scored code)
    sources = {"wiki": tokenize(tok, load_text("wikitext2", split="calib")),
               "book": tokenize(tok, load_text("gutenberg", split="calib")),
               "code": tokenize(tok, stdlib_text(CODE_CALIB))}
    windows = {name: windows_of(tokenize(tok, text_of(name)), seqlen, eval_windows) for name in TEXTS}
    return sources, windows


def score(model, windows: dict, entry: dict, args, names=None) -> None:
    """Perplexity and per-window NLL of every text (or of ``names``) into ``entry``, with the weights cast to
    ``args.eval_dtype``."""
    from pyprune.evaluate import perplexity
    t_eval = time.perf_counter()
    model.to(getattr(torch, args.eval_dtype))
    for name, w in windows.items():
        if names is not None and name not in names:
            continue
        r = perplexity(model, w, device=args.device)
        entry[f"ppl_{name}"] = r["perplexity"]
        entry[f"window_nll_{name}"] = r["window_nll"]
    entry["eval_dtype"] = args.eval_dtype
    entry["eval_seconds"] = time.perf_counter() - t_eval


def load_cache(path: str) -> dict:
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {}


def run_all(args, todo: list[tuple[str, int, int]]) -> dict:
    from pyprune.models.driver import prune_model
    from pyprune.models.io import load_model, load_tokenizer
    from pyprune.report import atomic_write_text

    cache_path = os.path.join(args.out, "heldout_runs.json")
    cache = load_cache(cache_path)
    todo = [r for r in todo if run_key(*r) not in cache]
    dense_missing = [n for n in TEXTS if f"ppl_{n}" not in cache.get("dense", {})]
    if dense_missing:  # the dense model scored on every text (texts added since: only those)
        todo = [None] + todo
    if args.max_runs is not None:
        todo = todo[:args.max_runs]
    if not todo:
        return cache
    model = load_model(args.model)
    tok = load_tokenizer(args.model)
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    sources, windows = texts(tok, args.seqlen, args.eval_windows)
    hashes = text_hashes()
    generated = {}  # seed -> (self-generated samples, seconds), made once per process
    need = {}  # seed -> the most self-generated samples a run of this process takes
    for run in todo:
        if run is not None:
            c = parse_key(run[0], args.nsamples)
            if "self" in c["calib"]:
                k = len(c["calib"])
                need[run[1]] = max(need.get(run[1], 0), c["nsamples"] // k + (c["calib"].index("self") < c[
                    "nsamples"] % k))

    def generate(count, seed):
        """The first ``count`` self-generated samples of ``seed``, all that this process needs made at once (sample
        i is drawn from its own seeded stream, so the first 8 of 16 are the 8 that a count of 8 would draw, up to the
        rounding of another batch size)."""
        from pyprune.selfcalib import self_generated_samples
        if seed not in generated or generated[seed][0].shape[0] < count:
            t = time.perf_counter()
            ids = self_generated_samples(model, tok, max(count, need.get(seed, 0)), args.seqlen, seed=seed,
                                         device=args.device)
            generated[seed] = (ids, time.perf_counter() - t)
        gen_seconds.append(generated[seed][1])
        return generated[seed][0][:count]

    for i, run in enumerate(todo):
        t0 = time.perf_counter()
        model.to(torch.float32)
        model.load_state_dict(dense_state)
        gen_seconds = []
        names = None
        if run is None:
            k, entry, names = "dense", dict(cache.get("dense", {}), method="dense"), dense_missing
        else:
            ckey, seed, kind = run
            k = run_key(ckey, seed, kind)
            c = parse_key(ckey, args.nsamples)
            cfg = config_of(c)
            order = 1 if kind == "order1" else 0
            if kind == "torch":
                cfg = cfg.replace(backend="torch")
            calib = reorder(calibration(sources, c, seed, args.seqlen, generate), order)
            # one window per forward pass, as every recorded run (the default batches windows: the same
            # numbers up to rounding, which moves perplexities by up to the noise floor)
            report = prune_model(model, calib, cfg, device=args.device, batch_size=1, **profile_of(c))
            entry = dict(c, config=ckey, seed=seed, order=order, floor=kind or None, settings=cfg.settings(),
                         sparsity_achieved=report.sparsity, total_loss=report.total_loss,
                         prune_seconds=report.times["total"])
            if gen_seconds:  # the generation's cost (once per seed and count; cached runs reuse its samples)
                entry["generate_seconds"] = sum(gen_seconds)
        score(model, windows, entry, args, names)
        entry["text_sha256"] = hashes
        entry["seconds"] = time.perf_counter() - t0
        cache = {**load_cache(cache_path), k: entry}
        atomic_write_text(cache_path, json.dumps(cache, indent=1) + "\n")
        print(f"[{i + 1}/{len(todo)}] {k}: " + ", ".join(f"{n} {entry[f'ppl_{n}']:.2f}" for n in TEXTS)
              + f" ({entry['seconds']:.0f} s, eval {entry['eval_seconds']:.0f} s)", flush=True)
    return cache


def summarise(cache: dict) -> dict:
    """config key -> {"seeds": [...], text: (mean, min, max, sd or None), or None where no run scored the text} over
    the order-0 runs."""
    by = {}
    for e in cache.values():
        if e.get("method") == "dense" or is_floor(e) or "error" in e or not any(f"ppl_{n}" in e for n in TEXTS):
            continue
        by.setdefault(e["config"], []).append(e)
    out = {}
    for k, es in by.items():
        es.sort(key=lambda e: e["seed"])
        s = {"seeds": [e["seed"] for e in es]}
        for name in TEXTS:  # runs cached before a text was added have no score on it
            v = [e[f"ppl_{name}"] for e in es if f"ppl_{name}" in e]
            s[name] = (statistics.fmean(v), min(v), max(v), statistics.stdev(v) if len(v) > 1 else None) if v else None
        out[k] = s
    return out


def noise_floor(cache: dict) -> list[tuple[str, int, str, str, float]]:
    """(config, seed, floor kind, text, relative change) of every noise-floor run against its plain run."""
    out = []
    for e in cache.values():
        if not is_floor(e) or "error" in e:
            continue
        base = cache.get(run_key(e["config"], e["seed"]))
        if base is None:
            continue
        kind = e.get("floor") or "order1"                      # runs cached before backend floors: reordered
        for name in TEXTS:
            if f"ppl_{name}" in e and f"ppl_{name}" in base:
                out.append((e["config"], e["seed"], kind, name, e[f"ppl_{name}"] / base[f"ppl_{name}"] - 1.0))
    return out


def draws(cache: dict, config: str) -> dict:
    """Per text, the perplexity of every finished run of ``config``: its seeds and its noise-floor runs. Rounding
    amplified through the blocks moves a run as far as another seed does (the floor table), so each run is one draw
    of the same noise."""
    es = [e for e in cache.values() if e.get("config") == config and "error" not in e]  # (texts a run lacks: below)
    return {n: [e[f"ppl_{n}"] for e in es if f"ppl_{n}" in e] for n in TEXTS}


def pooled(cache: dict, a: str, b: str) -> dict | None:
    """Per text: (ratio of the mean perplexities of ``a`` and ``b`` over all their draws, its approximate 95% range:
    exp(+-2 standard errors of the log ratio, Welch), draws of a, draws of b), or None for a text where either has
    fewer than 3 draws; None when no text has enough."""
    da, db = draws(cache, a), draws(cache, b)
    out = {n: None for n in TEXTS}
    for n in TEXTS:
        if len(da[n]) < 3 or len(db[n]) < 3:
            continue
        ma, mb = statistics.fmean(da[n]), statistics.fmean(db[n])
        se = math.sqrt(statistics.variance(da[n]) / len(da[n]) / ma ** 2
                       + statistics.variance(db[n]) / len(db[n]) / mb ** 2)
        out[n] = (ma / mb, ma / mb * math.exp(-2 * se), ma / mb * math.exp(2 * se), len(da[n]), len(db[n]))
    return out if any(v is not None for v in out.values()) else None


def sparsity_of(key: str) -> str:
    return key.split("/")[1]


def calib_of(key: str) -> str:
    """The calibration part of a configuration key ("" for the default, WikiText-2 alone)."""
    return next((p for p in key.split("/")[2:] if calib_part(p) is not None), "")


def verdicts(summary: dict) -> list[str]:
    """Per sparsity, calibration and text: the lowest mean, and which configurations' seed ranges lie wholly above
    its range."""
    lines = []
    keys = list(summary)
    for sp, cal in sorted({(sparsity_of(k), calib_of(k)) for k in keys}):
        for name, (_, label) in TEXTS.items():
            ks = [k for k in keys if sparsity_of(k) == sp and calib_of(k) == cal and summary[k][name] is not None]
            if len(ks) < 2:
                continue
            ranked = sorted(ks, key=lambda k: summary[k][name][0])
            best = ranked[0]
            beaten = [k for k in ranked[1:] if summary[k][name][1] > summary[best][name][2]]
            overlap = [k for k in ranked[1:] if k not in beaten]
            lines.append(f"- {sp}, calibration {calib_label(cal)}, {label}: lowest mean `{best}`; ranges apart from "
                         f"{', '.join(f'`{k}`' for k in beaten) or 'none'}; overlapping "
                         f"{', '.join(f'`{k}`' for k in overlap) or 'none'}.")
    return lines


def paired(cache: dict, a: str, b: str) -> dict:
    """Per text: (ratios a / b at each seed both ran, window-paired 95% range of the ratio pooled over those seeds).

    The window range: the per-window NLL differences of every shared seed, mean +- 2 standard errors, as a ratio of
    perplexities (exp of the NLL difference)."""
    out = {}
    for name in TEXTS:
        r, d = [], []
        for e in cache.values():
            if e.get("config") == a and not is_floor(e):
                f = cache.get(run_key(b, e["seed"]))
                if f is not None and f"ppl_{name}" in e and f"ppl_{name}" in f:
                    r.append(e[f"ppl_{name}"] / f[f"ppl_{name}"])
                    d += [x - y for x, y in zip(e[f"window_nll_{name}"], f[f"window_nll_{name}"])]
        win = None
        if len(d) > 1:
            m, se = statistics.fmean(d), statistics.stdev(d) / math.sqrt(len(d))
            win = (math.exp(m - 2 * se), math.exp(m + 2 * se))
        out[name] = (r, win)
    return out


def comparisons(summary: dict) -> list[tuple[str, str]]:
    """(a, b): every joint configuration against Wanda and SparseGPT (pyprune's and llm-compressor's) at its sparsity
    (with the same calibration), every
    llm-compressor run against pyprune's, every configuration with a calibration lever (n, mix) against the same
    configuration without it, every configuration with OWL's allocation (owl) against the same configuration without
    it, and every joint configuration with an update lever (swap, damp) against the same configuration without
    it."""
    pairs = []
    for a in summary:
        parts = a.split("/")
        owl = [p for p in parts[2:] if owl_part(p) is not None]
        extra = [p for p in parts[2:] if p.startswith("n") and p[1:].isdigit() or calib_part(p) is not None]
        suffix = "".join("/" + p for p in parts[2:] if p in extra or p in owl)  # baselines: the same allocation
        if parts[0].startswith("llmc-"):  # llm-compressor's run (benchmarks/peers.py) against pyprune's
            b = "/".join([parts[0][len("llmc-"):], *parts[1:]])
            if b in summary:
                pairs.append((a, b))
        if parts[0] == "joint":
            for m in BASELINES:
                b = f"{m}/{parts[1]}{suffix}"
                if b in summary:
                    pairs.append((a, b))
        if owl:  # OWL's allocation: the same configuration with every block at the target
            b = "/".join(p for p in parts if p not in owl)
            if b in summary:
                pairs.append((a, b))
        if extra:  # the calibration lever: the same configuration on the default calibration
            b = "/".join(p for p in parts if p not in extra)
            if b in summary:
                pairs.append((a, b))
        cal = calib_of(a)
        if "+" in cal and "self" in cal.split("+"):  # self-generated text added to a text: against that text alone
            rest = calib_name([n for n in calib_part(cal) if n != "self"])
            b = "/".join([p for p in parts if p != cal] + ([rest] if rest else []))
            if b in summary:
                pairs.append((a, b))
        levers = [p for p in parts[2:] if p.startswith(("swap", "damp"))]
        if parts[0] == "joint" and levers:
            b = "/".join(p for p in parts if p not in levers)
            if b in summary:
                pairs.append((a, b))
    return pairs


# Evaluation texts of the same kind as a calibration source (marked in the per-calibration tables).
SAME_KIND = {"wiki": ("wikitext2",), "book": ("pride", "moby"), "code": ("code",), "self": ()}


def default_mask(sp: str) -> str:
    return "exact" if ":" in sp else "sparsegpt"


def default_joint(sp: str) -> str:
    """The key of the joint method's defaults at sparsity ``sp`` (pyprune.config's default_shrink, DEFAULT_SWAPS)."""
    from pyprune.config import DEFAULT_SWAPS, default_shrink
    s = default_shrink(sp)
    return "/".join(["joint", sp, default_mask(sp)] + ([f"shrink{s:g}"] if s else [])
                    + ([f"swap{DEFAULT_SWAPS}"] if DEFAULT_SWAPS else []))


def by_calibration(summary: dict) -> list[str]:
    """Per sparsity and calibration (default sample count): every configuration's mean perplexity per text, the
    lowest in bold, the texts of the calibration's kind marked; then joint's defaults (``default_joint``), joint
    with 16 exchanges and no shrink, and joint without either against the better of SparseGPT and Wanda (ratio of
    means; below 1: joint wins)."""
    out, wins = [], []
    names = list(TEXTS)
    groups = sorted({(sparsity_of(k), calib_of(k)) for k in summary if not any(
        p.startswith("n") and p[1:].isdigit() for p in k.split("/")[2:]) and not k.startswith("llmc-")})
    for sp, cal in groups:
        ks = sorted(k for k in summary if sparsity_of(k) == sp and calib_of(k) == cal and not k.startswith("llmc-")
                    and not any(p.startswith("n") and p[1:].isdigit() for p in k.split("/")[2:]))
        if len(ks) < 2:
            continue
        kind = {n for src in (calib_part(cal) if cal else DEFAULT_CALIB) for n in SAME_KIND[src]}
        out += [f"### {sp}, calibration: {calib_label(cal)}", "",
                "| config | seeds | " + " | ".join(TEXTS[n][1] + (" (same kind)" if n in kind else "") for n in names)
                + " |", "|" + "---|" * (len(names) + 2)]
        best = {n: min((summary[k][n][0] for k in ks if summary[k][n] is not None), default=None) for n in names}
        for k in ks:
            cells = ["-" if summary[k][n] is None else (lambda v: f"**{v:.2f}**" if v == best[n] else f"{v:.2f}")(
                summary[k][n][0]) for n in names]
            out.append(f"| {k} | {len(summary[k]['seeds'])} | " + " | ".join(cells) + " |")
        out.append("")
        suffix = f"/{cal}" if cal else ""
        base = [summary.get(f"{m}/{sp}{suffix}") for m in ("sparsegpt", "wanda")]
        for j in dict.fromkeys((default_joint(sp) + suffix, f"joint/{sp}/{default_mask(sp)}/swap16{suffix}",
                                f"joint/{sp}/{default_mask(sp)}{suffix}")):
            if j not in summary or not any(base):
                continue
            cells = []
            for n in names:
                bs = [b[n][0] for b in base if b is not None and b[n] is not None]
                if summary[j][n] is None or not bs:
                    cells.append("-")
                    continue
                r = summary[j][n][0] / min(bs)
                cells.append(f"{r:.3f}" + (" win" if r < 1 else " **loss**"))
            wins.append(f"| `{j}` | {len(summary[j]['seeds'])} | " + " | ".join(cells) + " |")
    if wins:
        out += ["### Joint against the better of SparseGPT and Wanda on the same calibration", "",
                "Ratio of mean perplexities (below 1: joint wins); the baseline is whichever of pyprune's SparseGPT "
                "and Wanda has the lower mean on that text, over the seeds each ran.", "",
                "| joint | seeds | " + " | ".join(TEXTS[n][1] for n in names) + " |",
                "|" + "---|" * (len(names) + 2), *wins, ""]
    return out


def fmt_range(v: list[float]) -> str:
    return f"{statistics.fmean(v):.3f} ({min(v):.3f}-{max(v):.3f})" if v else "-"


def at_windows(cache: dict, windows: int) -> dict:
    """The cache as if every run had been scored on the first ``windows`` evaluation windows of each text: a text's
    perplexity recomputed from its first ``windows`` per-window NLLs (every window predicts the same number of
    tokens, so the perplexity is exp of their mean), and dropped from a run scored on fewer windows."""
    out = {}
    for k, e in cache.items():
        e = dict(e)
        for n in TEXTS:
            w = e.pop(f"window_nll_{n}", None)
            ppl = e.pop(f"ppl_{n}", None)
            if w is not None and len(w) >= windows:
                e[f"window_nll_{n}"] = w[:windows]
                e[f"ppl_{n}"] = ppl if len(w) == windows else math.exp(statistics.fmean(w[:windows]))
        out[k] = e
    return out


REPORTS = {  # file -> (what it holds, its evaluation windows: None for --eval-windows)
    "heldout.md": ("every run scored on at least --eval-windows windows per text (the issue 13 runs)", None),
    "heldout_domains.md": ("every run, on the first 20 windows per text (the issue 22 runs have 20)", 20),
}


def write_report(cache: dict, args, name: str = "heldout.md") -> str:
    from pyprune.report import atomic_write_text
    windows = REPORTS[name][1] or args.eval_windows
    cache = at_windows(cache, windows)
    summary = summarise(cache)
    names = list(TEXTS)
    head = ("| config | seeds | " + " | ".join(f"{TEXTS[n][1]}: mean (min-max) sd" for n in names)
            + " | prune s |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    if "dense" in cache:
        d = cache["dense"]
        rows.append("| dense | - | " + " | ".join(f"{d[f'ppl_{n}']:.2f}" if f"ppl_{n}" in d else "-" for n in names)
                    + " | - |")
    for k, s in sorted(summary.items(), key=lambda kv: (sparsity_of(kv[0]), kv[0])):
        secs = [e["prune_seconds"] for e in cache.values() if e.get("config") == k and not is_floor(e)
                and "error" not in e]
        cells = [f"{s[n][0]:.2f} ({s[n][1]:.2f}-{s[n][2]:.2f})" + (f" {s[n][3]:.2f}" if s[n][3] is not None else "")
                 if s[n] is not None else "-" for n in names]
        rows.append(f"| {k} | {','.join(map(str, s['seeds']))} | " + " | ".join(cells)
                    + f" | {statistics.fmean(secs):.0f} |")
    floor = noise_floor(cache)
    floor_rows = ["| config | seed | run | text | perplexity change |", "|---|---|---|---|---|"]
    floor_rows += [f"| {c} | {s} | {FLOOR_KINDS[kind]} | {TEXTS[n][1]} | {100 * d:+.2f}% |"
                   for c, s, kind, n, d in floor]
    worst = max((abs(d) for *_, d in floor), default=float("nan"))
    pair_rows, pool_rows = [], []
    for a, b in comparisons(summary):
        p = paired(cache, a, b)
        pair_rows.append(f"| `{a}` / `{b}` | " + " | ".join(
            fmt_range(p[n][0]) + (f"; windows {p[n][1][0]:.3f}-{p[n][1][1]:.3f}" if p[n][1] else "")
            for n in names) + " |")
        q = pooled(cache, a, b) if a.startswith("joint/") and b.split("/")[0] in BASELINES else None
        if q is not None:
            first = next(v for v in q.values() if v is not None)
            pool_rows.append(f"| `{a}` / `{b}` | {first[3]} / {first[4]} | " + " | ".join(
                f"{q[n][0]:.3f} ({q[n][1]:.3f}-{q[n][2]:.3f})" + (" **<1**" if q[n][2] < 1 else "")
                if q[n] is not None else "-" for n in names) + " |")
    hw = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    ew = {e.get("eval_dtype", "float32") for e in cache.values()}
    text = "\n".join([
        "# Held-out accuracy over calibration seeds: SmolLM2-135M (built-in GGUF), pruned on the CPU",
        "",
        f"Calibration: {args.nsamples} x {args.seqlen} tokens of WikiText-2 validation text at random positions unless "
        "the key says otherwise (`n<k>`: k samples; `mix`: half of them from A Tale of Two Cities); each seed draws "
        f"other windows. Evaluation: perplexity on the first {windows} x {args.seqlen}-token windows of the "
        "raw WikiText-2 test split, of two Gutenberg books (after the licence header), of Python source "
        f"({', '.join(CODE_EVAL)} of this interpreter's standard library; calibration code: "
        f"{', '.join(CODE_CALIB)}) and of the decimal module's test tables ({', '.join(TABLES_EVAL)}, neither prose "
        f"nor code); this file: {REPORTS[name][0]}; a '-' where a run was not scored on a text. Weights cast to {'/'.join(sorted(ew))} for the evaluation (pruning runs in float32). "
        "B = 128, damping 0.01 unless the key says otherwise; `joint/<s>/<mask>` names joint's mask "
        "(`sparsegpt`: SparseGPT's saliency per row, the 50% default; `exact`: the best subset per group, the N:M "
        f"default; `wanda`: Wanda's mask); `swap<k>`: at most k exchanges of a pruned and a kept weight per row of a "
        "block, each lowering the row's exact block loss (no `swap` in the key: none, whatever pyprune's default). "
        "SparseGPT and Wanda are pyprune's; `llmc-*` rows are llm-compressor 0.14's (benchmarks/peers.py, same "
        f"calibration token ids, same evaluation). Hardware: {hw}.",
        "",
        "Texts (sha256 of the text as read, recorded by the runs; the standard-library files are those of Python "
        f"{platform.python_version()} here):",
        "",
        *[f"- {n}: `{h}`" for n, h in sorted({(n, h) for e in cache.values()
                                               for n, h in (e.get("text_sha256") or {}).items()})],
        "",
        "## Perplexity: mean over seeds (min-max) and standard deviation",
        "",
        *rows,
        "",
        "## Per calibration: the methods side by side (mean perplexity over seeds)",
        "",
        *by_calibration(summary),
        "## Which differences the seeds resolve",
        "",
        "Per sparsity and text: the configuration with the lowest mean, and the configurations whose whole seed range "
        "lies above its range (apart) or not (overlapping).",
        "",
        *verdicts(summary),
        "",
        "## Paired (same calibration windows): perplexity ratio over seeds, mean (min-max); and the 95% range over "
        "the evaluation windows, pooled over seeds",
        "",
        "| pair | " + " | ".join(TEXTS[n][1] for n in names) + " |",
        "|" + "---|" * (len(names) + 1),
        *pair_rows,
        "",
        "## Every draw pooled: seeds and noise-floor runs",
        "",
        "Each run of a configuration (every seed and every noise-floor run) taken as one draw of seed and rounding "
        "noise: the ratio of joint's mean perplexity to the baseline's, with an approximate 95% range (plus or minus "
        "two standard errors of the log ratio, unpaired); **<1** where the whole range lies below 1. Pairs where "
        "both have at least 3 draws.",
        "",
        "| pair | draws | " + " | ".join(TEXTS[n][1] for n in names) + " |",
        "|" + "---|" * (len(names) + 2),
        *pool_rows,
        "",
        "## Rounding-only noise floor",
        "",
        "The same calibration windows in another order, or the same run with another kernel backend: the Hessians "
        "and solves are equal up to float32 rounding, so any change is rounding, amplified through the blocks by the "
        "mask choice. " + (
            f"Largest change: {100 * worst:.1f}%." if floor else "Not measured yet (no reordered run finished)."),
        "",
        *floor_rows,
        ""])
    atomic_write_text(os.path.join(args.out, name), text)
    return text


PLOTTED = ("wanda", "sparsegpt", "joint/{sp}/{mask}", "llmc-wanda", "llmc-sparsegpt")


def plot(cache: dict, out: str) -> str | None:
    """heldout.png: per sparsity, perplexity relative to Wanda on the same calibration (mean over seeds, min-max bars)
    of SparseGPT, joint (default mask) and llm-compressor's runs, per text, on WikiText-2 alone and on the mix."""
    summary = summarise(cache)
    sps = sorted({sparsity_of(k) for k in summary})
    cals = sorted({calib_of(k) for k in summary}, key=lambda c: (c != "", c != "mix", c))
    panels = [(sp, f"/{cal}" if cal else "") for sp in sps for cal in cals if f"wanda/{sp}{'/' + cal if cal else ''}"
              in summary]
    if not panels:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for ax, (sp, cal) in zip(axes[0], panels):
        base = summary[f"wanda/{sp}{cal}"]
        names = [n for n in TEXTS if base[n] is not None]
        mask = "exact" if ":" in sp else "sparsegpt"
        shown = [(lab, f"{m}/{sp}{cal}" if "{" not in m else m.format(sp=sp, mask=mask) + cal)
                 for lab, m in (("SparseGPT", "sparsegpt"), ("joint", "joint/{sp}/{mask}"),
                                ("llmc SparseGPT", "llmc-sparsegpt"), ("llmc Wanda", "llmc-wanda"))]
        shown = [(lab, k) for lab, k in shown if k in summary and all(summary[k][n] is not None for n in names)]
        width = 0.8 / max(len(shown), 1)
        for j, (lab, k) in enumerate(shown):
            mean = [summary[k][n][0] / base[n][0] for n in names]
            lo = [m - summary[k][n][1] / base[n][0] for m, n in zip(mean, names)]
            hi = [summary[k][n][2] / base[n][0] - m for m, n in zip(mean, names)]
            ax.bar([i + (j - (len(shown) - 1) / 2) * width for i in range(len(names))], mean, width,
                   yerr=[lo, hi], capsize=2, label=f"{lab} ({len(summary[k]['seeds'])} seeds)")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xticks(range(len(names)), [TEXTS[n][1].replace(" (raw)", "") for n in names], fontsize=8)
        ax.set_ylim(0.7, 1.25)
        ax.set_title(f"{sp}, calibration: {calib_label(cal[1:])}", fontsize=8)
        ax.set_ylabel("perplexity / Wanda's (lower is better)", fontsize=8)
        ax.legend(fontsize=7)
    fig.suptitle("SmolLM2-135M: perplexity relative to Wanda on the same calibration (mean over seeds, min-max)",
                 fontsize=10)
    fig.tight_layout()
    path = os.path.join(out, "heldout.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="wanda/0.5,sparsegpt/0.5,joint/0.5,joint/0.5/wanda",
                   help="comma-separated configuration keys, in run order (default: %(default)s)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated calibration seeds (default: %(default)s)")
    p.add_argument("--floor", default="joint/0.5", help="configuration keys that get a reordered-samples run at the "
                   "first seed: the noise floor (default: %(default)s; empty for none)")
    p.add_argument("--floor-kinds", default="order1", help="comma-separated kinds of noise-floor run for each --floor "
                   "key: " + "; ".join(f"{k}: {v}" for k, v in FLOOR_KINDS.items()) + " (default: %(default)s)")
    p.add_argument("--nsamples", type=int, default=16, help="calibration samples (default: %(default)s)")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--eval-dtype", default="bfloat16", choices=("bfloat16", "float32"),
                   help="weights' dtype for the evaluation (default: %(default)s; 1.8x faster on this CPU, dense "
                   "perplexity within 0.02%% of float32)")
    p.add_argument("--max-runs", type=int, default=None, help="stop after this many new runs (for timing)")
    p.add_argument("--model", default="builtin")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(HERE, "results"))
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    canon = lambda k: config_key(parse_key(k, args.nsamples), args.nsamples)  # noqa: E731
    ckeys = [canon(k) for k in args.configs.split(",") if k]
    floor = [canon(k) for k in args.floor.split(",") if k]
    kinds = [k for k in args.floor_kinds.split(",") if k]
    bad = [k for k in kinds if k not in FLOOR_KINDS]
    if bad:
        p.error(f"--floor-kinds: unknown kind(s) {', '.join(bad)}; choose from {', '.join(FLOOR_KINDS)}")
    todo = plan(ckeys, [int(s) for s in args.seeds.split(",")], floor, kinds)
    cache = load_cache(os.path.join(args.out, "heldout_runs.json")) if args.report_only else run_all(args, todo)
    for name in REPORTS:
        text = write_report(cache, args, name)
    print(text)
    plot(cache, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
