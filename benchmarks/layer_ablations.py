"""Layer-level ablations on real Hessians: numerical precision, block size up to B = cols, and the mask options.

The full-model grid (``accuracy.py``) runs every method sequentially, so after the first block each method sees
its own pruned inputs. Here every method prunes the same dense layers of the built-in SmolLM2-135M with the same
Hessians (collected from WikiText-2 validation text by a forward pass of the dense model), which isolates the
algorithm's own choices:

* precision: the joint method and SparseGPT as the driver runs them (Hessian accumulated and solved in float32)
  against everything in float64;
* block size: B in {32, 64, 128, 256, cols}; B = cols is the exact optimum for its mask (docs/ALGORITHM.md section 6);
* masks: SparseGPT's saliency, the joint diagonal ``G_jj``, greedy OBS (at B = 32), per-row scope; for
  N:M the exact group subset as well.

Every loss is the layer objective of docs/ALGORITHM.md section 1 evaluated in float64 with the undamped Hessian (the
reconstruction error on the calibration tokens), reported relative to SparseGPT's (float32, B=128, block mask).
Times are the summed wall time of ``prune_layer`` on the layers (float32 unless the label says fp64).

    python benchmarks/layer_ablations.py            # writes results/layer_ablations.{md,json}
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
LAYERS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")


def variants(sp: str, rows: int, cols: int) -> list[tuple[str, dict, torch.dtype]]:
    """(label, PruneConfig arguments, compute dtype). Everything runs in float32, as the driver does, except the two
    float64 runs that measure what precision costs. The first is the reference (SparseGPT, float32)."""
    structured = ":" in sp
    default_mask = "exact" if structured else "sparsegpt"
    f32, f64 = torch.float32, torch.float64
    out = [("sparsegpt", dict(method="sparsegpt"), f32),
           ("sparsegpt fp64", dict(method="sparsegpt"), f64),
           ("wanda", dict(method="wanda"), f32),
           (f"joint B128 {default_mask}", dict(method="joint", mask_scope="block"), f32),
           (f"joint B128 {default_mask} fp64", dict(method="joint", mask_scope="block"), f64)]
    # the joint rows compare algorithms on SparseGPT's per-block mask rule (mask_scope="block"); the joint method's
    # default per-row rule is the last row
    for B in (32, 64, 256):
        out.append((f"joint B{B} {default_mask}", dict(method="joint", block_size=B, mask_scope="block"), f32))
    if rows * cols <= 576 * 576:    # one block over all columns: a rows x (cols/2)^3 batched solve, square layers only
        out.append((f"joint B=cols {default_mask}", dict(method="joint", block_size=cols, mask_scope="block"), f32))
    masks = ("diag", "sparsegpt") if structured else ("diag",)
    for mask in masks:
        out.append((f"joint B128 {mask}", dict(method="joint", mask=mask, mask_scope="block"), f32))
    # greedy costs rows x B^3 / 2 per block (about 30 s per layer at B=128 on 2 CPU cores): measured at B=32
    out.append(("joint B32 greedy", dict(method="joint", block_size=32, mask="greedy", mask_scope="block"), f32))
    if not structured:
        out.append(("sparsegpt row", dict(method="sparsegpt", mask_scope="row"), f32))
        out.append(("joint B128 sparsegpt row", dict(method="joint", mask_scope="row"), f32))
    return out


def collect(model, calib: torch.Tensor, blocks: list[int]) -> dict:
    """Hessians of the chosen layers from one dense forward pass: float32 (ops.accumulate_hessian, as the driver
    does) and float64 (the reference)."""
    from pyprune import ops
    layers = model.model.layers
    acc, handles = {}, []
    for b in blocks:
        for name in LAYERS:
            mod = layers[b].get_submodule(name)

            def hook(module, inputs, output, key=f"{b}.{name}"):
                x = inputs[0].detach().reshape(-1, inputs[0].shape[-1])
                st = acc.setdefault(key, dict(H32=torch.zeros(x.shape[1], x.shape[1]), n32=0,
                                             H64=torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64), n=0))
                st["n32"] = ops.accumulate_hessian(st["H32"], st["n32"], x)
                st["n"] = ops.accumulate_hessian(st["H64"], st["n"], x.double())
            handles.append(mod.register_forward_hook(hook))
    stop = max(blocks) + 1
    with torch.no_grad():
        saved = model.model.layers
        model.model.layers = torch.nn.ModuleList(list(saved)[:stop])     # no need to run the blocks after the last
        try:
            for ids in calib:
                model(input_ids=ids[None], use_cache=False)
        finally:
            model.model.layers = saved
            for h in handles:
                h.remove()
    return {k: dict(W=layers[int(k.split(".")[0])].get_submodule(k.split(".", 1)[1]).weight.detach().clone(), **v)
            for k, v in acc.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--blocks", default="0,15", help="comma-separated decoder block indices")
    p.add_argument("--sparsities", default="0.5,2:4")
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(HERE, "results"))
    args = p.parse_args(argv)
    from tqdm.auto import tqdm

    from pyprune import PruneConfig, prune_layer
    from pyprune.algorithms.common import layer_objective
    from pyprune.data import calibration_samples, load_text, shared_file, tokenize
    from pyprune.models.io import load_model, load_tokenizer, resolve_model
    from pyprune.report import atomic_write_text

    source = resolve_model("builtin")
    model, tok = load_model(source), load_tokenizer(source)
    calib = calibration_samples(tokenize(tok, load_text(shared_file("data", "wikitext2", "valid.txt"))),
                                args.nsamples, args.seqlen, seed=0)
    data = collect(model, calib, [int(b) for b in args.blocks.split(",")])
    results: dict[str, dict[str, dict]] = {}
    jobs = [(sp, name) for sp in args.sparsities.split(",") for name in data]
    for sp, name in tqdm(jobs, desc="layers", dynamic_ncols=True):
        d = data[name]
        cols = d["W"].shape[1]
        per = results.setdefault(sp, {}).setdefault(name, {})
        for label, kw, dt in variants(sp, d["W"].shape[0], cols):
            H = d["H64"] if dt == torch.float64 else d["H32"]
            t0 = time.perf_counter()
            res = prune_layer(d["W"].to(dt), H, PruneConfig(sparsity=sp, **kw))
            secs = time.perf_counter() - t0
            per[label] = dict(loss=float(layer_objective(d["W"].double(), res.weight.double(), d["H64"]).sum()),
                              seconds=secs, sparsity=float(res.mask.float().mean()))
    text = report(results, args)
    os.makedirs(args.out, exist_ok=True)
    atomic_write_text(os.path.join(args.out, "layer_ablations.md"), text)
    atomic_write_text(os.path.join(args.out, "layer_ablations.json"),
                      json.dumps(dict(settings=vars(args), results=results), indent=1) + "\n")
    blocksize_plot(results, os.path.join(args.out, "layer_ablations_blocksize.png"))
    print(text)
    return 0


def report(results: dict, args) -> str:
    hw = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    lines = ["# Layer-level ablations on real Hessians (SmolLM2-135M, dense inputs)", "",
             f"Hessians from {args.nsamples} x {args.seqlen} tokens of WikiText-2 validation text through the dense "
             f"model; layers {', '.join(LAYERS)} of blocks {args.blocks}. Loss: the section 1 objective in float64 "
             "with the undamped Hessian, as a ratio to SparseGPT's (float32, B=128, block mask); geometric mean "
             f"and worst over the layers. Seconds: wall time of one layer's `prune_layer` on {hw}, summed. "
             "B=cols (one block over all columns: the exact optimum for its mask) runs on the square 576 x 576 "
             "layers only (q_proj, o_proj); its mean is over those.", ""]
    for sp, per in results.items():
        layers = list(per)
        labels = list(dict.fromkeys(lab for n in layers for lab in per[n]))
        ref = labels[0]
        lines += [f"## Sparsity {sp}", "", "| variant | loss / SparseGPT (geo. mean) | worst layer | "
                  + " | ".join(layers) + " | seconds |", "|" + "---|" * (len(layers) + 4)]
        for label in labels:
            have = [n for n in layers if label in per[n]]
            r = {n: per[n][label]["loss"] / per[n][ref]["loss"] for n in have}
            gm = statistics.geometric_mean(r.values())
            secs = sum(per[n][label]["seconds"] for n in have)
            lines.append(f"| {label} | {gm:.4f} | {max(r.values()):.4f} | "
                         + " | ".join(f"{r[n]:.4f}" if n in r else "-" for n in layers) + f" | {secs:.1f} |")
        lines.append("")
    return "\n".join(lines)


def blocksize_plot(results: dict, path: str) -> None:
    """Joint method: layer loss (relative to SparseGPT) and solve time against B, per sparsity."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (sp, per) in enumerate(results.items()):
        mask = "exact" if ":" in sp else "sparsegpt"
        Bs = (32, 64, 128, 256)
        ratio = [statistics.geometric_mean(per[n][f"joint B{B} {mask}"]["loss"] / per[n]["sparsegpt"]["loss"]
                                           for n in per) for B in Bs]
        secs = [sum(per[n][f"joint B{B} {mask}"]["seconds"] for n in per) for B in Bs]
        ref_secs = sum(per[n]["sparsegpt"]["seconds"] for n in per)
        axes[0].plot(Bs, ratio, "D-", color=f"C{i}", label=f"joint {sp}")
        axes[1].plot(Bs, secs, "D-", color=f"C{i}", label=f"joint {sp}")
        axes[1].axhline(ref_secs, ls="--", lw=0.8, color=f"C{i}", label=f"SparseGPT {sp}")
    axes[0].axhline(1.0, ls="--", lw=0.8, color="gray", label="SparseGPT")
    for ax, label in ((axes[0], "layer loss / SparseGPT (geometric mean)"), (axes[1], "solve time, s (CPU, fp32)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("block size B")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle("Joint method on real Hessians (SmolLM2-135M, same dense inputs): loss and time against B")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
