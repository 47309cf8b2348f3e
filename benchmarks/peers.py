"""Peer benchmark (issue 13, part 3): llm-compressor's SparseGPT and Wanda on the built-in SmolLM2-135M, on exactly
the calibration token ids and evaluation windows of ``benchmarks/heldout.py``, recorded in its cache format.

llm-compressor lives in its own virtualenv (``make peers-venv``: ``.venv-peers``, the same CPU torch 2.13.0 wheel as
``.venv``). This driver runs in the project's venv:
1. exports the built-in model (GGUF) once as a Hugging Face directory (``pyprune.models.io.serializable``) under
   ``--work``;
2. per run, writes the calibration ids of ``heldout.calibration(...)`` at the seed as a .pt file and runs
   ``benchmarks/_peers_worker.py`` with ``.venv-peers/bin/python``: llm-compressor's ``oneshot`` with
   ``SparseGPTModifier`` (block size 128, dampening 0.01) or ``WandaPruningModifier``, sparsity 0.5 or
   ``mask_structure="2:4"``, targets the decoder blocks' Linear layers (``re:model.layers.<i>``; the embeddings and
   the tied ``lm_head`` stay dense), the sequential pipeline, the samples in order, one per batch. The worker
   writes the pruned weights (safetensors) and its prune wall time and peak RSS;
3. loads the weights into the dense model, checks which tensors changed and what sparsity pattern the pruned ones
   have, and scores them with pyprune's evaluator as heldout.py does (same texts and windows, weights cast to
   ``--eval-dtype``);
4. writes the run into ``<out>/heldout_runs.json`` under ``llmc-<method>/<sparsity>/seed<k>`` (atomically, merged
   with what is there, so heldout.py's runs and these share one cache; ``dense`` is added when missing). A run
   llm-compressor fails is recorded with an ``error`` field (and no perplexities) and the grid goes on; it is
   retried only with ``--retry-failed``.

    make peers-venv
    python benchmarks/peers.py                                # llmc-{sparsegpt,wanda}/{0.5,2:4}, seed 0
    python benchmarks/peers.py --seeds 0,1,2
    python benchmarks/peers.py --nsamples 2 --seqlen 64 --eval-windows 2 --out /tmp/peers   # smoke test
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORKER = os.path.join(HERE, "_peers_worker.py")
PREFIX = "llmc-"
METHODS = ("sparsegpt", "wanda")
DEFAULT_CONFIGS = "llmc-sparsegpt/0.5,llmc-wanda/0.5,llmc-sparsegpt/2:4,llmc-wanda/2:4"
BLOCK_SIZE = 128
EXPORT_STAMP = "peers_export.json"


def load_heldout():
    """benchmarks/heldout.py as a module (its calibration, texts and cache helpers are the conventions to match)."""
    spec = importlib.util.spec_from_file_location("heldout", os.path.join(HERE, "heldout.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


heldout = load_heldout()


def parse_key(key: str) -> tuple[str, str]:
    """``llmc-<method>/<sparsity>[/mix]`` -> (method, canonical sparsity); SystemExit on anything else. ``mix``:
    heldout.py's mixed calibration (half WikiText-2, half the calibration book); see ``is_mix``."""
    from pyprune.config import Sparsity
    parts = key.split("/")
    if parts[-1] == "mix":
        parts = parts[:-1]
    if len(parts) != 2 or not parts[0].startswith(PREFIX) or parts[0][len(PREFIX):] not in METHODS:
        raise SystemExit(f"configuration key {key!r}: expected llmc-<{'|'.join(METHODS)}>/<sparsity>, e.g. "
                         "llmc-sparsegpt/2:4")
    try:
        sp = Sparsity.parse(parts[1])
    except ValueError as e:
        raise SystemExit(f"configuration key {key!r}: {e}") from None
    return parts[0][len(PREFIX):], str(sp)


def export_model(model, tok, source: str, work: str) -> str:
    """The model as a Hugging Face directory ``<work>/model`` (float32 safetensors, config, tokenizer), written once
    per source file version (a stamp names it) and reused after."""
    from pyprune.models.io import resolve_model, serializable
    src = resolve_model(source)
    st = os.stat(str(src))
    stamp = {"source": str(src), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    out = os.path.join(work, "model")
    stamp_path = os.path.join(out, EXPORT_STAMP)
    if os.path.exists(stamp_path):
        with open(stamp_path) as f:
            if json.load(f) == stamp:
                return out
    tmp = out + f".tmp{os.getpid()}"
    serializable(model).save_pretrained(tmp)
    tok.save_pretrained(tmp)
    with open(os.path.join(tmp, EXPORT_STAMP), "w") as f:
        json.dump(stamp, f)
    if os.path.exists(out):
        import shutil
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def error_of(log_path: str, rc: int) -> str:
    """A short account of a failed worker: the exception line of its log, where it was raised, its exit status."""
    import re
    try:
        with open(log_path, errors="replace") as f:
            lines = [ln.rstrip() for ln in f if ln.strip()]
    except OSError:
        lines = []
    tb = max((i for i, ln in enumerate(lines) if ln.startswith("Traceback")), default=None)
    tail = lines[tb + 1:] if tb is not None else lines
    exc = [ln for ln in tail if not ln.startswith(" ")][-1:] or ["no output"]
    frames = [re.match(r'\s*File "([^"]+)", line (\d+), in (\S+)', ln) for ln in tail]
    frames = [f for f in frames if f]
    where = f" (raised in {os.path.basename(frames[-1][1])}:{frames[-1][2]}, {frames[-1][3]})" if frames else ""
    return f"{exc[0][:1000]}{where}; worker exit status {rc}"


def run_worker(args, method: str, sparsity: str, model_dir: str, calib_path: str, tag: str):
    """Run the llm-compressor worker; (meta dict or None, error or None, weights path, log path)."""
    weights = os.path.join(args.work, f"{tag}.safetensors")
    meta_path = os.path.join(args.work, f"{tag}.json")
    log_path = os.path.join(args.work, f"{tag}.log")
    for p in (weights, meta_path):
        if os.path.exists(p):
            os.remove(p)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [args.peers_python, WORKER, "--model", model_dir, "--calib", calib_path, "--method", method,
           "--sparsity", sparsity, "--block-size", str(BLOCK_SIZE), "--damp", str(heldout.DEFAULT_DAMP),
           "--threads", str(args.threads), "--weights", weights, "--meta", meta_path]
    t0 = time.perf_counter()
    try:
        with open(log_path, "w") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=args.work,
                                timeout=args.timeout).returncode
    except subprocess.TimeoutExpired:
        return None, f"worker timed out after {args.timeout} s", weights, log_path
    if rc != 0 or not (os.path.exists(meta_path) and os.path.exists(weights)):
        return None, error_of(log_path, rc), weights, log_path
    with open(meta_path) as f:
        meta = json.load(f)
    meta["worker_seconds"] = time.perf_counter() - t0
    return meta, None, weights, log_path


def pattern(dense: dict, pruned: dict, block_names: set, method: str, sparsity: str) -> dict:
    """What the pruned weights really are. ``block_names``: the 2-D weights of the decoder blocks' Linear layers.

    - which tensors changed (``changed_other``: any outside those Linear weights);
    - ``sparsity``: zeros over the Linear weights; per-row zero fraction min/max;
    - unstructured: the fraction of rows with exactly ``int(p * cols)`` zeros (Wanda's rule), and for SparseGPT a
      histogram of the zeros per rows x 128 column block minus ``int(p * rows * 128)`` (its threshold rule takes one
      more); N:M: the fraction of groups of M input columns holding exactly / at least N zeros;
    - ``kept_equal_dense``: whether every nonzero weight is its dense value (Wanda: no update);
    - ``dense_zeros``: zeros the dense weights already had."""
    from pyprune.config import Sparsity
    sp = Sparsity.parse(sparsity)
    zeros = total = dense_zeros = 0
    row_min, row_max = 1.0, 0.0
    nm_exact = nm_atleast = groups = 0
    excess = {}
    rows_exact = rows_total = 0
    kept_equal = True
    pruned_modules = 0
    changed_other = sorted(k for k in pruned if k not in block_names
                           and (k not in dense or not torch.equal(pruned[k], dense[k])))
    missing = sorted(k for k in block_names if k not in pruned)
    for k in sorted(block_names & set(pruned)):
        W, D = pruned[k].float(), dense[k].float()
        z = W == 0
        zeros += int(z.sum())
        total += z.numel()
        dense_zeros += int((D == 0).sum())
        pruned_modules += bool(z.any())
        frac = z.float().mean(1)
        row_min, row_max = min(row_min, float(frac.min())), max(row_max, float(frac.max()))
        kept_equal = kept_equal and torch.equal(W[~z], D[~z])
        rows, cols = z.shape
        if sp.structured:
            g = z.reshape(rows, cols // sp.m, sp.m).sum(-1)
            nm_exact += int((g == sp.n).sum())
            nm_atleast += int((g >= sp.n).sum())
            groups += g.numel()
        else:
            rows_exact += int((z.sum(1) == int(sp.fraction * cols)).sum())
            rows_total += rows
        if not sp.structured and method == "sparsegpt":
            for b0 in range(0, cols, BLOCK_SIZE):
                blk = z[:, b0:b0 + BLOCK_SIZE]
                e = int(blk.sum()) - int(sp.fraction * blk.numel())
                excess[e] = excess.get(e, 0) + 1
    out = {"linear_weights": len(block_names), "pruned_modules": pruned_modules, "missing": missing,
           "changed_other": changed_other, "sparsity": zeros / total if total else float("nan"),
           "row_sparsity_min": row_min, "row_sparsity_max": row_max, "kept_equal_dense": kept_equal,
           "dense_zeros": dense_zeros}
    if sp.structured:
        out[f"groups_exactly_{sp.n}_of_{sp.m}"] = nm_exact / groups if groups else float("nan")
        out[f"groups_at_least_{sp.n}_of_{sp.m}"] = nm_atleast / groups if groups else float("nan")
        out["groups"], out["groups_not_exactly_n"] = groups, groups - nm_exact
    else:
        out["rows_exactly_int_fraction"] = rows_exact / rows_total if rows_total else float("nan")
    if excess:
        out[f"zeros_per_rows_x_{BLOCK_SIZE}_block_minus_int_fraction"] = {str(k): v for k, v in sorted(excess.items())}
    return out


def block_linear_weights(model) -> set:
    """State-dict names of the 2-D weights of every Linear layer inside the decoder blocks."""
    from pyprune.models.discover import find_blocks
    path, blocks = find_blocks(model)
    return {f"{path}.{i}.{name}.weight" for i, block in enumerate(blocks) for name, mod in block.named_modules()
            if isinstance(mod, torch.nn.Linear)}


def run_all(args, todo: list[tuple[str, int]]) -> dict:
    from safetensors.torch import load_file

    from pyprune.models.io import load_model, load_tokenizer
    from pyprune.report import atomic_write_text

    cache_path = os.path.join(args.out, "heldout_runs.json")
    cache = heldout.load_cache(cache_path)
    todo = [r for r in todo if heldout.run_key(r[0], r[1]) not in cache
            or (args.retry_failed and "error" in cache[heldout.run_key(r[0], r[1])])]
    runs = ([None] if "dense" not in cache else []) + todo
    if not runs:
        return cache
    os.makedirs(args.work, exist_ok=True)
    t0 = time.perf_counter()
    model = load_model(args.model)
    tok = load_tokenizer(args.model)
    model.to(torch.float32)
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    names = block_linear_weights(model)
    model_dir = export_model(model, tok, args.model, args.work) if todo else None
    sources, windows = heldout.texts(tok, args.seqlen, args.eval_windows)
    print(f"set-up {time.perf_counter() - t0:.0f} s (model, export, tokenised texts)", flush=True)
    for i, run in enumerate(runs):
        t0 = time.perf_counter()
        model.to(torch.float32)
        model.load_state_dict(dense_state)
        if run is None:
            k, entry = "dense", dict(method="dense")
        else:
            ckey, seed = run
            k = heldout.run_key(ckey, seed)
            method, sparsity = parse_key(ckey)
            mix = ckey.endswith("/mix")
            c = dict(method=PREFIX + method, sparsity=sparsity, mask=None, nsamples=args.nsamples, mix=mix,
                     damp=heldout.DEFAULT_DAMP if method == "sparsegpt" else None)
            calib = heldout.calibration(sources, c, seed, args.seqlen)
            calib_path = os.path.join(args.work, f"calib-n{args.nsamples}-l{args.seqlen}-seed{seed}{'-mix' if mix else ''}.pt")
            torch.save(calib, calib_path)
            tag = f"{method}-{sparsity.replace(':', 'of')}-seed{seed}{'-mix' if mix else ''}"
            meta, error, weights, log_path = run_worker(args, method, sparsity, model_dir, calib_path, tag)
            entry = dict(c, config=ckey, seed=seed, order=0, seqlen=args.seqlen, log=log_path)
            if error is not None:
                entry.update(error=error, eval_windows=args.eval_windows, eval_dtype=args.eval_dtype)
                cache = {**heldout.load_cache(cache_path), k: entry}
                atomic_write_text(cache_path, json.dumps(cache, indent=1) + "\n")
                print(f"[{i + 1}/{len(runs)}] {k}: FAILED: {error}", flush=True)
                continue
            state = load_file(weights)
            if not args.keep_weights:
                os.remove(weights)
            pat = pattern(dense_state, state, names, method, sparsity)
            tied = [n for n in dense_state if n not in state]
            unexpected = model.load_state_dict(state, strict=False).unexpected_keys
            model.tie_weights()
            if unexpected or pat["missing"]:
                raise RuntimeError(f"{k}: the worker's weights do not fit the model: unexpected {unexpected[:5]}, "
                                   f"missing {pat['missing'][:5]}")
            llmc_loss = sum(meta["layer_losses"].values()) if meta["layer_losses"] else None
            settings = dict(meta["modifier"], pipeline="sequential", batch_size=1,
                            llmcompressor=meta["llmcompressor"], torch=meta["torch"],
                            transformers=meta["transformers"], threads=meta["threads"])
            entry.update(settings=settings, sparsity_achieved=pat["sparsity"], pattern=pat,
                         # llm-compressor's H is 2/nsamples X^T X with nsamples counted in sequences: seqlen times
                         # pyprune's (tokens), so its loss is seqlen times the loss pyprune would report
                         total_loss=llmc_loss / args.seqlen if llmc_loss is not None else None,
                         llmc_total_loss=llmc_loss, not_in_weights=tied,
                         prune_seconds=meta["prune_seconds"], peak_rss=meta["peak_rss_bytes"],
                         rss_before_prune=meta["rss_before_bytes"], load_peak_rss=meta["load_peak_rss_bytes"],
                         peak_rss_with_save=meta["peak_rss_with_save_bytes"],
                         worker_seconds=meta["worker_seconds"], load_seconds=meta["load_seconds"])
        heldout.score(model, windows, entry, args)
        entry["eval_windows"] = args.eval_windows
        entry["seconds"] = time.perf_counter() - t0
        cache = {**heldout.load_cache(cache_path), k: entry}
        atomic_write_text(cache_path, json.dumps(cache, indent=1) + "\n")
        extra = ""
        if run is not None:
            extra = (f"; prune {entry['prune_seconds']:.0f} s, peak RSS {entry['peak_rss'] / 2**20:.0f} MiB, "
                     f"sparsity {entry['sparsity_achieved']:.4f}")
        print(f"[{i + 1}/{len(runs)}] {k}: " + ", ".join(f"{n} {entry[f'ppl_{n}']:.2f}" for n in heldout.TEXTS)
              + f" ({entry['seconds']:.0f} s, eval {entry['eval_seconds']:.0f} s{extra})", flush=True)
    return cache


def describe(pat: dict) -> str:
    """One table cell from ``pattern``'s record."""
    parts = [f"groups of {q.split('_')[-1]} without exactly {q.split('_')[2]} zeros: {pat['groups_not_exactly_n']} "
             f"of {pat['groups']}" for q in pat if q.startswith("groups_exactly")]
    parts += [f"rows at int(p cols): {v:.4f}" for q, v in pat.items() if q == "rows_exactly_int_fraction"]
    parts += [f"zeros - int(p n) per {BLOCK_SIZE}-column block: "
              + ", ".join(f"{x:+d} x{c}" for x, c in sorted((int(a), c) for a, c in v.items()))
              for q, v in pat.items() if q.startswith("zeros_per")]
    parts += [f"rows {pat['row_sparsity_min']:.3f}-{pat['row_sparsity_max']:.3f}",
              f"{pat['pruned_modules']}/{pat['linear_weights']} modules",
              f"CHANGED {','.join(pat['changed_other'])}" if pat["changed_other"] else "others unchanged"]
    return "; ".join(parts)


def report(cache: dict, args) -> str:
    """llm-compressor's runs beside pyprune's runs of the same method, sparsity and seed (when the cache has them)."""
    from pyprune.report import atomic_write_text
    names = list(heldout.TEXTS)
    head = ("| run | " + " | ".join(heldout.TEXTS[n][1] for n in names)
            + " | prune s | peak RSS MiB | sparsity | pattern |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    if "dense" in cache:
        d = cache["dense"]
        rows.append("| dense | " + " | ".join(f"{d[f'ppl_{n}']:.2f}" for n in names) + " | - | - | - | - |")
    keys = sorted((k for k, e in cache.items() if str(e.get("config", "")).startswith(PREFIX)),
                  key=lambda k: (cache[k]["sparsity"], cache[k]["config"], cache[k]["seed"]))
    for k in keys:
        e = cache[k]
        ours = heldout.run_key(e["config"][len(PREFIX):], e["seed"])
        for key, f in ((k, e), (ours, cache.get(ours))):
            if f is None:
                continue
            if "error" in f:
                rows.append(f"| {key} | failed: {f['error'][:200]} |" + " |" * (len(names) + 3))
                continue
            desc = describe(f["pattern"]) if f.get("pattern") else "-"
            rss = f"{f['peak_rss'] / 2**20:.0f}" if f.get("peak_rss") else "-"
            spa = f"{f['sparsity_achieved']:.4f}" if f.get("sparsity_achieved") is not None else "-"
            rows.append(f"| {key} | " + " | ".join(f"{f[f'ppl_{n}']:.2f}" for n in names)
                        + f" | {f['prune_seconds']:.0f} | {rss} | {spa} | {desc} |")
    hw = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    threads = sorted({cache[k]["settings"]["threads"] for k in keys if "settings" in cache[k]})
    text = "\n".join([
        "# Peers: llm-compressor's SparseGPT and Wanda against pyprune's (SmolLM2-135M, CPU)",
        "",
        f"Calibration and evaluation as heldout.md (calibration {args.nsamples} x {args.seqlen}, {args.eval_windows} "
        f"evaluation windows per text, weights cast to {args.eval_dtype} for the evaluation). `llmc-*`: "
        "llm-compressor's `oneshot` with `SparseGPTModifier` (block 128, dampening 0.01) or `WandaPruningModifier`, "
        "the sequential pipeline, the decoder blocks' Linear layers, run in its own process with "
        f"{'/'.join(map(str, threads)) or '-'} thread(s); prune s is the `oneshot` call, peak RSS that process's "
        "peak during it. Rows without the prefix are pyprune's runs of the same configuration and seed from "
        f"heldout.py. Hardware: {hw}.",
        "",
        *rows,
        ""])
    atomic_write_text(os.path.join(args.out, "peers.md"), text)
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma-separated llmc-<method>/<sparsity> keys "
                   "(default: %(default)s)")
    p.add_argument("--seeds", default="0", help="comma-separated calibration seeds (default: %(default)s)")
    p.add_argument("--nsamples", type=int, default=16, help="calibration samples (default: %(default)s)")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--eval-dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="threads of the llm-compressor process (default: this process's torch threads, %(default)s)")
    p.add_argument("--timeout", type=float, default=None, help="seconds before a worker is stopped (default: none)")
    p.add_argument("--model", default="builtin")
    p.add_argument("--device", default="cpu")
    p.add_argument("--peers-python", default=os.path.join(ROOT, ".venv-peers", "bin", "python"),
                   help="the interpreter with llmcompressor (default: %(default)s; make peers-venv)")
    p.add_argument("--work", default=os.path.join(ROOT, ".cache", "peers"),
                   help="exported model, calibration ids, worker logs (default: %(default)s)")
    p.add_argument("--keep-weights", action="store_true", help="keep each run's pruned safetensors in --work")
    p.add_argument("--retry-failed", action="store_true", help="run again the cached runs that failed")
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(HERE, "results"))
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    ckeys = []
    for k in (k for k in args.configs.split(",") if k):
        method, sparsity = parse_key(k)
        ckeys.append(f"{PREFIX}{method}/{sparsity}" + ("/mix" if k.endswith("/mix") else ""))
    seeds = [int(s) for s in args.seeds.split(",") if s]
    os.makedirs(args.out, exist_ok=True)
    if args.report_only:
        cache = heldout.load_cache(os.path.join(args.out, "heldout_runs.json"))
    else:
        if not os.access(args.peers_python, os.X_OK):
            raise SystemExit(f"{args.peers_python} not found: build it with `make peers-venv`")
        cache = run_all(args, [(k, s) for s in seeds for k in ckeys])
    print(report(cache, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
