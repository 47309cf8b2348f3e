"""The llm-compressor side of benchmarks/peers.py: runs in .venv-peers (``make peers-venv``), never imports pyprune.

Loads a Hugging Face model directory in float32, prunes it with llm-compressor's ``oneshot`` and one modifier
(SparseGPTModifier or WandaPruningModifier) on the given calibration token ids (a (nsamples, seqlen) LongTensor in a
.pt file, fed in that order, one sample per batch, through a DataLoader so that llm-compressor neither shuffles,
re-tokenises nor truncates them), and writes the model's weights as safetensors plus a JSON of measurements:
prune wall time (the ``oneshot`` call), peak RSS during it (VmHWM reset just before it, the way pyprune's report
measures its own), RSS before it, the peak of the start-up and load, the peak including the save, the per-module
losses SparseGPT reports, versions.

    .venv-peers/bin/python benchmarks/_peers_worker.py --model DIR --calib ids.pt --method sparsegpt \\
        --sparsity 2:4 --weights out.safetensors --meta out.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def rss_status() -> dict:
    """VmRSS and VmHWM of this process in bytes (Linux /proc)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument("--calib", required=True, help=".pt file with a (nsamples, seqlen) LongTensor of token ids")
    p.add_argument("--method", required=True, choices=("sparsegpt", "wanda"))
    p.add_argument("--sparsity", required=True, help="a fraction (0.5) or N:M (2:4)")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--damp", type=float, default=0.01)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--weights", required=True, help="output .safetensors")
    p.add_argument("--meta", required=True, help="output .json")
    args = p.parse_args(argv)

    import torch
    torch.set_num_threads(args.threads)
    import llmcompressor
    import transformers
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from safetensors.torch import save_model

    meta = {"llmcompressor": llmcompressor.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "threads": torch.get_num_threads()}
    if ":" in args.sparsity:
        n, m = (int(x) for x in args.sparsity.split(":"))
        fraction, structure = n / m, args.sparsity
    else:
        fraction, structure = float(args.sparsity), "0:0"
    common = dict(sparsity=fraction, mask_structure=structure, targets=[r"re:model\.layers\.\d+$"])
    if args.method == "sparsegpt":
        modifier = SparseGPTModifier(**common, block_size=args.block_size, dampening_frac=args.damp)
    else:
        modifier = WandaPruningModifier(**common)
    meta["modifier"] = {"class": type(modifier).__name__,
                        **{k: v for k, v in modifier.model_dump().items()
                           if k in ("sparsity", "mask_structure", "targets", "ignore", "block_size",
                                    "dampening_frac", "sparsity_profile")}}

    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32,
                                                              local_files_only=True).eval()
    meta["load_seconds"] = time.perf_counter() - t0
    ids = torch.load(args.calib)
    if ids.dim() != 2 or ids.dtype != torch.long:
        raise SystemExit(f"{args.calib}: expected a (nsamples, seqlen) LongTensor, got {ids.dtype} {tuple(ids.shape)}")
    meta["nsamples"], meta["seqlen"] = int(ids.shape[0]), int(ids.shape[1])
    # batch_size=None: each item is one batch, as is; the order is the tensor's
    loader = torch.utils.data.DataLoader([{"input_ids": row[None, :].clone()} for row in ids], batch_size=None)

    # SparseGPT's per-module loss (llm-compressor only logs it): sum (w - q)^2 / d^2 / 2 under its own H, which is
    # 2/nsamples X^T X with nsamples counted in sequences, not tokens: seqlen times pyprune's H at batch size 1
    names = {id(mod): name for name, mod in model.named_modules()}
    losses = {}
    if args.method == "sparsegpt":
        import llmcompressor.modifiers.pruning.sparsegpt.base as sgpt_base
        original = sgpt_base.sparsify_weight

        def sparsify_weight(module, **kwargs):
            loss, weight = original(module=module, **kwargs)
            losses[names.get(id(module), "?")] = float(loss)
            return loss, weight

        sgpt_base.sparsify_weight = sparsify_weight

    before = rss_status()
    meta["rss_before_bytes"] = before.get("VmRSS")
    meta["load_peak_rss_bytes"] = before.get("VmHWM")  # start-up and model load
    meta["peak_rss_reset"] = reset_peak_rss()
    t0 = time.perf_counter()
    oneshot(model=model, dataset=loader, recipe=[modifier], num_calibration_samples=int(ids.shape[0]),
            max_seq_length=int(ids.shape[1]), pipeline="sequential")
    meta["prune_seconds"] = time.perf_counter() - t0
    meta["peak_rss_bytes"] = rss_status().get("VmHWM")
    meta["layer_losses"] = losses

    tmp = args.weights + ".tmp"
    save_model(model, tmp)  # drops the tied lm_head copy of the embeddings
    os.replace(tmp, args.weights)
    # ru_maxrss would not do: a child inherits the peak of the process it was forked from (the driver's)
    meta["peak_rss_with_save_bytes"] = rss_status().get("VmHWM")
    with open(args.meta + ".tmp", "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(args.meta + ".tmp", args.meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
