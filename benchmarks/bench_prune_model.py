"""Whole-model benchmark: ``pyprune.prune_model`` on a Llama-2-70B-shaped model (random bf16 weights, CPU-resident
blocks), the joint method and SparseGPT in the same process, with every block's time split into phases.

What a user pruning a 70B model waits for is the block loop of ``pyprune.models.driver`` times 80 blocks. This script
builds a Llama model of the chosen shape with ``--blocks`` decoder blocks (transformers ``LlamaConfig``, built on the
meta device and materialised on the CPU, weights drawn N(0, 0.02) on the compute device and copied home; RMSNorm
weights 1; tied embeddings), feeds it ``--nsamples`` x ``--seqlen`` random token ids, and runs the real driver,
``prune_model(model, ids, PruneConfig(method, sparsity, block_size), device=...)``, once per method on the same
weights (re-drawn from the same seed before each run).

Phases are measured by wrapping library functions inside this process only (restored afterwards; nothing in the
package is changed). Each wrapper synchronises the device before and after (torch.cuda.synchronize on CUDA), so a
phase's time is its work, and times are exclusive (a phase nested in another is subtracted from it):

  transfer        BlockStore.load / BlockStore.done (the block's .to(device) and back home)
  forward_observe observe_block minus the Hessian accumulations inside it (the block's forward passes under the
                  MatrixObserver that finds its matrices and their inputs)
  hessian         accumulate_hessian as the driver calls it (argument checks included)
  setup           hessian_setup: the damped H and its inverse Cholesky factor, once per Hessian
  mask            mask selection: joint's select_block_mask; SparseGPT's smallest_mask / ops.nm_select (N:M)
  exchange        joint's exchanges and the solve of their final set (ops.refine_solve: PruneConfig.swaps > 0)
  solve           the method's core (ALGORITHMS[method]) minus mask selection and trailing updates: for joint the
                  batched masked solves (ops.masked_solve, also reported alone as masked_solve_op) plus
                  G = U_B^T U_B and W1 -= E U_B; for SparseGPT its column-by-column loop (both: the core's own
                  fp32 copy of W and the result's cast back)
  trailing        the trailing update W[:, b1:] -= E U[b0:b1, b1:] (Tensor.addmm_ called by the core)
  forward_next    run_block_all: the pruned block's forward passes that make the next block's inputs
  other           the block's wall time minus all of the above (weight copies in and out of the group solve,
                  the reports' sparsity counts, discovery bookkeeping)
  capture         capture_inputs, once per model (the model's forward with pass-through blocks)

The floor beside each phase is its work at the peak rates measured in the same process (``_timing.measure_peaks``
and a pageable host<->device copy), with the work counted from the arguments of the wrapped calls (formulas in
FORMULAS). The 80-block headline is extrapolated from the measured per-block times (``extrapolate``).

Usage: python benchmarks/bench_prune_model.py [--shape 70b|small|tiny] [--blocks N] [--nsamples N] [--seqlen N]
       [--device cpu|cuda] [--methods joint,sparsegpt] [--out DIR] [--name NAME]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _timing, when imported from a test
from _timing import bench, environment, fmt, markdown_table, measure_peaks, out_dir, sync  # noqa: E402

SHAPES = {
    # Llama-2-70B: hidden 8192, intermediate 28672, 64 heads, 8 KV heads (GQA). The vocabulary is Llama's 32000 but
    # only the embedding is used (the capture stops before the LM head); the blocks are what is measured.
    "70b": dict(hidden=8192, intermediate=28672, heads=64, kv_heads=8, vocab=32000, blocks=2, nsamples=128,
                seqlen=2048),
    "small": dict(hidden=512, intermediate=1792, heads=8, kv_heads=2, vocab=2048, blocks=2, nsamples=8, seqlen=256),
    "tiny": dict(hidden=128, intermediate=448, heads=4, kv_heads=2, vocab=256, blocks=2, nsamples=2, seqlen=64),
}
FULL_BLOCKS = 80  # Llama-2-70B's decoder blocks

PHASES = ["transfer", "forward_observe", "hessian", "setup", "mask", "exchange", "solve", "trailing", "forward_next"]
WHAT = {
    "capture": "capture_inputs (once per model, not per block)",
    "transfer": "host<->device: BlockStore.load / done",
    "forward_observe": "block forwards under the observer (observe_block minus hessian)",
    "hessian": "Hessian accumulation (accumulate_hessian)",
    "setup": "damped H + inverse Cholesky factor (hessian_setup)",
    "mask": "mask selection",
    "exchange": "joint's exchanges and the solve of their final set (ops.refine_solve, PruneConfig.swaps > 0)",
    "solve": "solves: joint masked solves + in-block update; SparseGPT column loop",
    "trailing": "trailing updates (addmm_ right of each B-block)",
    "forward_next": "block forwards for the next inputs (run_block_all)",
    "other": "rest of the block's wall time (copies, bookkeeping)",
    "total": "block total",
}
FORMULAS = {
    "transfer": "bytes of the block / pageable host-to-device rate + the same / device-to-host rate (both measured "
                "here; 0 when the block already lives on the compute device)",
    "forward_observe": "2 T P + 2 n s^2 h flops at the bf16 matmul peak (P: the block's matrix weights, T = n s "
                       "tokens of n samples of length s, h hidden; causal attention QK^T and PV, the half above the "
                       "diagonal skipped)",
    "hessian": "T c (c + 1) flops per Hessian of c columns (the upper triangle of 2 T c^2) at the bf16 matmul peak",
    "setup": "4/3 c^3 flops per Hessian (Cholesky c^3 / 3 + the triangular solve against I, c^3 as BLAS counts it) "
             "at the fp32 matmul peak",
    "mask": "5 bytes per weight (read the fp32 weight, write the bool mask) at the device copy rate",
    "exchange": "fp32 peak; per row and B-block c^3 / 2 + c^2 K / 2 (+ c^2 K / 2 for unstructured rows: every "
                "pair) to factor and set up, 3 c B + 3 c^2 (+ 2 c K) per exchange made, 2 c^2 + B^2 / 2 for the "
                "final solve (c pruned, K = B - c kept); multiply-adds, 2 flops each",
    "solve": "fp32 peak; joint: per row and B-block k^3/3 + 2 k^2 + 2 B k (Cholesky of G[M, M], two triangular "
             "solves, e = U_B[:, M] lambda; k = pruned per row) plus 2 r B^2 + 2 B^3 per block (W1 -= E U_B, G); "
             "SparseGPT: r B (B + 1) per B-block (its rank-1 column updates inside the block)",
    "trailing": "sum over B-blocks of 2 r B (c - b1) flops (about r c^2 per r x c matrix) at the fp32 matmul peak",
    "forward_next": "as forward_observe",
}
RATE_OF = {"forward_observe": "bf16", "forward_next": "bf16", "hessian": "bf16", "setup": "fp32", "solve": "fp32",
           "exchange": "fp32",
           "trailing": "fp32", "mask": "copy"}


# ------------------------------------------------------------------------------------------------- phase timer
class Phases:
    """Exclusive wall times of named phases, per block (set by BlockStore.load / done) or per model outside the
    blocks; the work (flops or bytes) of each phase for its floor; the device is synchronised at every boundary."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.stack: list[list] = []          # [name, seconds of timed children, exclusive]
        self.block: int | None = None
        self.block_t0 = 0.0
        self.times: dict = defaultdict(lambda: defaultdict(float))   # block or "model" -> phase -> s
        self.work: dict = defaultdict(lambda: defaultdict(float))    # block -> phase -> flops or bytes
        self.sub: dict = defaultdict(lambda: defaultdict(float))     # block -> informational inclusive times
        self.calls: dict = defaultdict(int)                          # block -> timed calls (device syncs / 2)
        self.totals: dict[int, float] = {}

    @property
    def key(self):
        return "model" if self.block is None else self.block

    @property
    def top(self) -> str | None:
        return self.stack[-1][0] if self.stack else None

    @contextlib.contextmanager
    def phase(self, name: str, exclusive: bool = True):
        sync(self.device)
        entry = [name, 0.0, exclusive]
        self.stack.append(entry)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            sync(self.device)
            dt = time.perf_counter() - t0
            self.stack.pop()
            self.calls[self.key] += 1
            if exclusive:
                self.times[self.key][name] += dt - entry[1]
                if self.stack:
                    self.stack[-1][1] += dt
            else:  # informational: recorded inclusive; its timed children still count for the parent
                self.sub[self.key][name] += dt
                if self.stack:
                    self.stack[-1][1] += entry[1]

    def add_work(self, name: str, amount: float) -> None:
        self.work[self.key][name] += float(amount)

    def begin_block(self, i: int) -> None:
        sync(self.device)
        self.block = i
        self.block_t0 = time.perf_counter()

    def end_block(self, i: int) -> None:
        sync(self.device)
        self.totals[i] = time.perf_counter() - self.block_t0
        self.block = None


def _block_bytes(block: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(block.parameters()) + list(block.buffers()))


def _forward_flops(block: torch.nn.Module, hidden: list[torch.Tensor]) -> float:
    """2 T P for the block's matrices plus causal attention (QK^T and PV, 2 n s^2 h) over the given batches."""
    P = sum(p.numel() for p in block.parameters() if p.dim() >= 2)
    flops = 0.0
    for h in hidden:  # (batch, seq, hidden)
        batch, seq, width = h.shape[0], h.shape[-2], h.shape[-1]
        flops += 2.0 * batch * seq * P + 2.0 * batch * seq * seq * width
    return flops


def _obs_work(W: torch.Tensor, config, method: str) -> dict:
    """Flops (solve, trailing) and bytes (mask) of one OBS-method call on W (rows x cols)."""
    rows, cols = W.shape
    B = config.block_size
    frac = config.sparsity.fraction
    solve = trailing = 0.0
    for b0 in range(0, cols, B):
        b1 = min(b0 + B, cols)
        Bb = b1 - b0
        trailing += 2.0 * rows * Bb * (cols - b1)
        if method == "joint":
            k = frac * Bb
            solve += rows * (k ** 3 / 3 + 2 * k * k + 2 * Bb * k) + 2.0 * rows * Bb * Bb + 2.0 * Bb ** 3
        else:
            solve += float(rows) * Bb * (Bb + 1)
    return {"solve": solve, "trailing": trailing, "mask": 5.0 * rows * cols}


@contextlib.contextmanager
def instrument(ph: Phases):
    """Wrap the library functions that make up the block loop (in this process only) and restore them after.
    A missing name means the library changed: the error says which hook to update."""
    from pyprune import algorithms, ops
    from pyprune.algorithms import common, joint, sparsegpt
    from pyprune.models import driver

    patches: list[tuple[object, str, object]] = []

    def patch(owner, name, make):
        if isinstance(owner, dict):
            if name not in owner:
                raise RuntimeError(f"bench_prune_model: hook {name!r} not found in the library; update the benchmark")
            orig = owner[name]
            owner[name] = make(orig)
        else:
            if not hasattr(owner, name):
                raise RuntimeError(f"bench_prune_model: hook {getattr(owner, '__name__', owner)}.{name} not found "
                                   "in the library; update the benchmark")
            orig = getattr(owner, name)
            setattr(owner, name, make(orig))
        patches.append((owner, name, orig))

    def timed(phase, exclusive=True, work=None):
        def make(orig):
            def wrapper(*args, **kwargs):
                if work is not None:
                    for k, v in work(*args, **kwargs).items():
                        ph.add_work(k, v)
                with ph.phase(phase, exclusive):
                    return orig(*args, **kwargs)
            wrapper.__wrapped__ = orig
            return wrapper
        return make

    def hessian_work(H, n, X, *a, **k):
        cols = X.shape[-1]
        return {"hessian": (X.numel() // cols) * cols * (cols + 1.0)}

    def setup_work(H, *a, **k):
        return {"setup": 4.0 / 3.0 * float(H.shape[0]) ** 3}

    def forward_work(phase):
        def work(block, inputs, *a, **k):
            return {phase: _forward_flops(block, inputs.hidden)}
        return work

    def core(method):
        def make(orig):
            def wrapper(W, H, config, *args, **kwargs):
                if kwargs.get("mask") is None:
                    for k, v in _obs_work(W, config, method).items():
                        ph.add_work(k, v)
                with ph.phase("solve"):
                    return orig(W, H, config, *args, **kwargs)
            return wrapper
        return make

    def exchange(orig):
        def wrapper(G, U_B, W1, mask, rounds, **kw):
            with ph.phase("exchange"):
                out = orig(G, U_B, W1, mask, rounds, **kw)
            from bench_refine_solve import engine_fma  # the engine's multiply-adds per row, elementwise
            fma = engine_fma(mask.sum(1).double(), G.shape[0], out[3].double(), pairs=not kw.get("m"))
            ph.add_work("exchange", 2.0 * float(fma.sum()))
            return out
        return wrapper

    def load(orig):
        def wrapper(store, i, *a, **k):
            ph.begin_block(i)
            block = store.blocks[i]
            if driver.device_of(block) != store.device:
                ph.add_work("transfer_h2d", _block_bytes(block))
            with ph.phase("transfer"):
                return orig(store, i, *a, **k)
        return wrapper

    def done(orig):
        def wrapper(store, i, block, *a, **k):
            if store.homes.get(i, store.device) != store.device:
                ph.add_work("transfer_d2h", _block_bytes(block))
            try:
                with ph.phase("transfer"):
                    return orig(store, i, block, *a, **k)
            finally:
                ph.end_block(i)
        return wrapper

    orig_addmm_ = torch.Tensor.addmm_
    had_own = "addmm_" in torch.Tensor.__dict__

    def addmm_(self, *args, **kwargs):
        if ph.top == "solve":  # only the algorithm cores' own trailing updates
            with ph.phase("trailing"):
                return orig_addmm_(self, *args, **kwargs)
        return orig_addmm_(self, *args, **kwargs)

    try:
        patch(driver, "capture_inputs", timed("capture"))
        patch(driver, "observe_block", timed("forward_observe", work=forward_work("forward_observe")))
        patch(driver, "accumulate_hessian", timed("hessian", work=hessian_work))
        patch(driver, "run_block_all", timed("forward_next", work=forward_work("forward_next")))
        patch(driver.BlockStore, "load", load)
        patch(driver.BlockStore, "done", done)
        patch(algorithms, "hessian_setup", timed("setup", work=setup_work))
        patch(common, "hessian_setup", timed("setup", work=setup_work))  # obs_setup without a shared setup
        patch(algorithms.ALGORITHMS, "joint", core("joint"))
        patch(algorithms.ALGORITHMS, "sparsegpt", core("sparsegpt"))
        patch(joint, "select_block_mask", timed("mask"))
        patch(sparsegpt, "smallest_mask", timed("mask"))
        patch(ops, "nm_select", timed("mask"))  # SparseGPT's N:M groups (inside joint's select_block_mask: nested)
        patch(ops, "masked_solve", timed("masked_solve_op", exclusive=False))
        patch(ops, "refine_solve", exchange)
        torch.Tensor.addmm_ = addmm_
        yield ph
    finally:
        if had_own:
            torch.Tensor.addmm_ = orig_addmm_
        elif "addmm_" in torch.Tensor.__dict__:
            del torch.Tensor.addmm_
        for owner, name, orig in reversed(patches):
            if isinstance(owner, dict):
                owner[name] = orig
            else:
                setattr(owner, name, orig)


# -------------------------------------------------------------------------------------------------- the model
def build_model(shape: dict, blocks: int, seqlen: int):
    """A Llama model of the shape, built on the meta device and materialised (uninitialised) on the CPU in bf16;
    ``init_weights`` draws the weights."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    config = LlamaConfig(hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                         num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                         num_hidden_layers=blocks, vocab_size=shape["vocab"],
                         max_position_embeddings=max(4096, seqlen), tie_word_embeddings=True,
                         attn_implementation="sdpa")
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to(torch.bfloat16)
    model.to_empty(device="cpu")  # pages are touched block by block, by init_weights
    model.tie_weights()
    model.model.rotary_emb = LlamaRotaryEmbedding(config=config)  # fp32 inverse frequencies, as transformers builds
    return model.eval()


def init_weights(model, seed: int, device: torch.device) -> None:
    """Weights N(0, 0.02) (matrices, embedding), norms 1; drawn on ``device`` in parameter order from ``seed`` (the
    same weights every call) and copied into the CPU parameters."""
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
                continue
            for r0 in range(0, p.shape[0], max(1, (1 << 27) // p.shape[1])):  # 128 Mi values at a time
                rows = p[r0:r0 + max(1, (1 << 27) // p.shape[1])]
                x = torch.randn(rows.shape, generator=gen, device=device, dtype=torch.float32)
                rows.copy_(x.mul_(0.02).to(torch.bfloat16))


def transfer_rates(device: torch.device) -> dict:
    """Pageable host->device and device->host copy rates (GB/s), as a block's .to(device) sees them."""
    if device.type != "cuda":
        return {}
    n = 256 << 20
    host = torch.ones(n, dtype=torch.uint8)
    dev = host.to(device)
    return {"h2d_gbps": n / bench(lambda: host.to(device), device, warmup=1, iters=5) / 1e9,
            "d2h_gbps": n / bench(lambda: dev.to("cpu"), device, warmup=1, iters=5) / 1e9}


# ------------------------------------------------------------------------------------------------ the analysis
def floors(work: dict, peaks: dict) -> dict:
    """Seconds of each phase's work at the measured peaks."""
    rate = {"bf16": peaks.get("mm_bf16_tflops", 0) * 1e12, "fp32": peaks.get("mm_fp32_tflops", 0) * 1e12,
            "copy": peaks.get("copy_gbps", 0) * 1e9}
    out = {}
    for p in PHASES:
        if p == "transfer":
            h2d, d2h = work.get("transfer_h2d", 0.0), work.get("transfer_d2h", 0.0)
            if h2d or d2h:
                out[p] = (h2d / (peaks["h2d_gbps"] * 1e9) if h2d else 0.0) + \
                    (d2h / (peaks["d2h_gbps"] * 1e9) if d2h else 0.0)
            else:
                out[p] = 0.0
        elif p in work and rate.get(RATE_OF[p]):
            out[p] = work[p] / rate[RATE_OF[p]]
    return out


def per_block_means(blocks: dict[int, dict]) -> tuple[dict, dict]:
    """Mean of each phase over the blocks that ran it, leaving out the first of them where a later block ran it too
    (the first block carries first-call costs: cuBLAS/cuSOLVER plans, allocator growth). Returns (means, which
    blocks each mean used)."""
    means, used = {}, {}
    for p in PHASES + ["other"]:
        ran = [i for i in sorted(blocks) if p in blocks[i]]
        use = ran[1:] or ran
        if use:
            means[p] = sum(blocks[i][p] for i in use) / len(use)
            used[p] = use
    return means, used


def extrapolate(capture: float, means: dict, n_blocks: int) -> float:
    """Seconds for ``n_blocks`` blocks: capture once, n_blocks x every per-block phase mean, except the next-input
    forward, n_blocks - 1 times (the last block has no next block)."""
    total = capture
    for p, s in means.items():
        total += (n_blocks - 1 if p == "forward_next" else n_blocks) * s
    return total


def analyse(method: str, ph: Phases, report, peaks: dict, wall: float) -> dict:
    blocks = {}
    for i, total in sorted(ph.totals.items()):
        row = {p: ph.times[i][p] for p in PHASES if p in ph.times[i]}
        row["other"] = max(0.0, total - sum(row.values()))
        row["total"] = total
        blocks[i] = row
    means, used = per_block_means(blocks)
    # the floor of the same blocks the means use
    work = {}
    for p in PHASES:
        keys = ["transfer_h2d", "transfer_d2h"] if p == "transfer" else [p]
        use = used.get(p, [])
        for k in keys:
            vals = [ph.work[i].get(k, 0.0) for i in use]
            if vals:
                work[k] = sum(vals) / len(vals)
    floor = floors(work, peaks)
    capture = ph.times["model"].get("capture", 0.0)
    return {
        "method": method, "capture_s": capture, "blocks": {str(i): r for i, r in blocks.items()},
        "masked_solve_op_s": {str(i): ph.sub[i].get("masked_solve_op", 0.0) for i in blocks},
        "timed_calls": {str(i): ph.calls[i] for i in blocks},
        "work": {str(i): dict(ph.work[i]) for i in blocks},
        "mean_s": means, "mean_blocks": {p: u for p, u in used.items()},
        "per_block_s": sum(means.values()), "floor_s": floor, "floor_per_block_s": sum(floor.values()),
        "extrapolated_s": extrapolate(capture, means, FULL_BLOCKS),
        "extrapolated_floor_s": extrapolate(0.0, {p: floor.get(p, 0.0) for p in means}, FULL_BLOCKS),
        "prune_model_s": report.times.get("total"), "wall_s": wall,
        "between_blocks_s": max(0.0, (report.times.get("total") or wall) - capture - sum(ph.totals.values())),
        "peak_device_gib": None if report.peak_device_memory is None else report.peak_device_memory / 2 ** 30,
        "peak_host_rss_gib": None if report.peak_host_rss is None else report.peak_host_rss / 2 ** 30,
        "total_loss": report.total_loss, "sparsity": report.sparsity, "modules": len(report.layers),
    }


# ----------------------------------------------------------------------------------------------------- output
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    n = torch.get_num_threads()
    return f"CPU ({n} thread{'s' if n > 1 else ''})"


def headline(meta: dict, results: list[dict]) -> str:
    s = meta["shape"]
    what = ("a Llama-2-70B-shaped model" if meta["shape_name"] == "70b" else
            f"a {meta['shape_name']}-shaped Llama model (hidden {s['hidden']}, intermediate {s['intermediate']})")
    parts = [f"{r['extrapolated_s'] / 60:.3g} min {r['method'] if r['method'] != 'sparsegpt' else 'SparseGPT'}"
             for r in results if "extrapolated_s" in r]
    return (f"{what[0].upper() + what[1:]}, {FULL_BLOCKS} blocks, {meta['nsamples']} x {meta['seqlen']} calibration "
            f"tokens: {', '.join(parts)}, on one {meta['device_name']} (extrapolated from {meta['blocks']} measured "
            "blocks)")


def render(meta: dict, results: list[dict]) -> str:
    ok = [r for r in results if "mean_s" in r]
    lines = [f"# {meta['name']}", "", "**" + headline(meta, ok) + "**", "",
             f"Command: `{meta['command']}`", "",
             "Environment: " + ", ".join(f"{k}={v}" for k, v in meta["env"].items()), "",
             "Measured peaks: " + ", ".join(f"{k}={fmt(v)}" for k, v in meta["peaks"].items()), "",
             f"Shape: {meta['shape_name']} {meta['shape']}, {meta['blocks']} blocks measured, {meta['nsamples']} x "
             f"{meta['seqlen']} tokens, sparsity {meta['sparsity']}, B = {meta['block_size']}, backend "
             f"{meta['backend']}, device {meta['device']}, warm-up {meta['warmup_s']}", "",
             "## Seconds per block, by phase (means used for the extrapolation), and the floor", ""]
    cols = ["phase", "what"]
    for r in ok:
        cols += [r["method"], f"{r['method']} floor"]
    rows = [{"phase": "capture", "what": WHAT["capture"], **{r["method"]: r["capture_s"] for r in ok}}]
    for p in PHASES + ["other"]:
        row = {"phase": p, "what": WHAT[p]}
        for r in ok:
            row[r["method"]] = r["mean_s"].get(p)
            row[f"{r['method']} floor"] = r["floor_s"].get(p)
        rows.append(row)
    rows.append({"phase": "total", "what": "block total (sum of the phases above, capture excluded)",
                 **{r["method"]: r["per_block_s"] for r in ok},
                 **{f"{r['method']} floor": r["floor_per_block_s"] for r in ok}})
    rows.append({"phase": f"model ({FULL_BLOCKS} blocks)", "what": "capture + extrapolated blocks, seconds",
                 **{r["method"]: r["extrapolated_s"] for r in ok},
                 **{f"{r['method']} floor": r["extrapolated_floor_s"] for r in ok}})
    lines += markdown_table(rows, cols)
    lines += ["", "## Every measured block (seconds)", ""]
    bcols = ["method", "block"] + PHASES + ["other", "total", "masked_solve_op", "timed_calls"]
    brows = []
    for r in ok:
        for i, b in r["blocks"].items():
            brows.append({"method": r["method"], "block": i, **b, "masked_solve_op": r["masked_solve_op_s"][i],
                          "timed_calls": r["timed_calls"][i]})
    lines += markdown_table(brows, bcols)
    lines += ["", "## Run", ""]
    rcols = ["method", "prune_model_s", "capture_s", "between_blocks_s", "peak_device_gib", "peak_host_rss_gib",
             "modules", "sparsity", "total_loss", "error"]
    lines += markdown_table(results, rcols)
    lines += ["", "## How this is measured", ""]
    lines += [f"- {p}: {WHAT[p]}" for p in ["capture"] + PHASES + ["other"]]
    lines += ["- Each phase wraps the library function named above in this process (benchmarks/bench_prune_model.py, "
              "`instrument`), synchronising the device before and after; times are exclusive (the Hessian "
              "accumulations are not in forward_observe, the mask selection and trailing updates are not in solve). "
              "masked_solve_op: the joint's ops.masked_solve calls alone (part of solve).",
              f"- Extrapolation to {FULL_BLOCKS} blocks: capture (measured once) + {FULL_BLOCKS} x the per-block mean "
              f"of every phase ({FULL_BLOCKS - 1} x for forward_next, which the last block skips); each mean leaves "
              "out the first measured block that ran the phase when a later block ran it too (first-call costs). "
              "Every block of the model has the same shapes, so the per-block work is the same.",
              "- Floors (seconds at the peak rates measured in this process):"]
    lines += [f"  - {p}: {FORMULAS[p]}" for p in PHASES]
    lines += ["- peak_device_gib: torch.cuda.max_memory_allocated over the run (reset at its start); "
              "peak_host_rss_gib: the process's VmHWM over the run (reset at its start), which includes the model's "
              f"CPU-resident weights ({meta['block_gib']:.3g} GiB per block; an in-memory {FULL_BLOCKS}-block model "
              f"needs {FULL_BLOCKS} x that on the host, or pyprune.prune_checkpoint streams it from its shards).",
              "- Weights are random N(0, 0.02) bf16 and the tokens random: the times depend on the shapes, not the "
              "values (the losses are not those of a trained model)."]
    return "\n".join(lines) + "\n"


def write(out: Path, name: str, meta: dict, results: list[dict]) -> Path:
    ok = [r for r in results if "mean_s" in r]
    meta = dict(meta, headline=headline(meta, ok) if ok else None)
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))
    path = out / f"{name}.md"
    path.write_text(render(meta, results))
    return path


# ------------------------------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="70b")
    p.add_argument("--blocks", type=int, default=None, help="decoder blocks to build and prune (default: the shape's)")
    p.add_argument("--nsamples", type=int, default=None)
    p.add_argument("--seqlen", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--methods", default="joint,sparsegpt")
    p.add_argument("--sparsity", default="0.5")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--backend", default="auto")
    p.add_argument("--swaps", type=int, default=16, help="the joint method's exchanges per row of a block, set "
                   "explicitly whatever pyprune's default (default: %(default)s; 0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-warmup", action="store_true", help="skip the warm-up run on a tiny model")
    p.add_argument("--out", default=None, help="output folder (default: $OUT, else benchmarks/results)")
    p.add_argument("--name", default="bench_prune_model", help="output file stem")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    return args


def method_config(method: str, args):
    """The run's PruneConfig for ``method``: the joint method with ``--swaps`` exchanges set explicitly."""
    from pyprune import PruneConfig
    extra = {"swaps": args.swaps} if method == "joint" else {}
    return PruneConfig(method=method, sparsity=args.sparsity, block_size=args.block_size, backend=args.backend,
                       **extra)


def main(argv=None) -> dict:
    import pyprune
    from pyprune import PruneConfig

    args = parse_args(argv)
    device = torch.device(args.device)
    out = out_dir(args.out)
    preset = SHAPES[args.shape]
    shape = {k: preset[k] for k in ("hidden", "intermediate", "heads", "kv_heads", "vocab")}
    blocks = args.blocks or preset["blocks"]
    nsamples = args.nsamples or preset["nsamples"]
    seqlen = args.seqlen or preset["seqlen"]
    if blocks < 1:
        raise SystemExit("--blocks must be at least 1")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]

    t0 = time.perf_counter()
    peaks = measure_peaks(device, quick=args.shape == "tiny")
    peaks.update(transfer_rates(device))
    t_peaks = time.perf_counter() - t0

    # warm-up: each method once on a tiny model on the same device (Triton compiles, cuBLAS/cuSOLVER handles)
    warm = None
    if not args.no_warmup:
        t0 = time.perf_counter()
        tiny = SHAPES["tiny"]
        wm = build_model(tiny, 1, tiny["seqlen"])
        init_weights(wm, args.seed, device)
        ids = torch.randint(0, tiny["vocab"], (2, tiny["seqlen"]), generator=torch.Generator().manual_seed(1))
        for m in methods:
            init_weights(wm, args.seed, device)
            pyprune.prune_model(wm, ids, method_config(m, args), device=device)
        del wm
        warm = time.perf_counter() - t0

    t0 = time.perf_counter()
    model = build_model(shape, blocks, seqlen)
    init_weights(model, args.seed, device)
    t_build = time.perf_counter() - t0
    ids = torch.randint(0, shape["vocab"], (nsamples, seqlen), generator=torch.Generator().manual_seed(args.seed))
    from pyprune.models.discover import find_blocks
    block_gib = _block_bytes(find_blocks(model)[1][0]) / 2 ** 30

    cmd = " ".join(["python benchmarks/bench_prune_model.py"] + list(sys.argv[1:] if argv is None else argv))
    meta = {"name": args.name, "command": cmd, "shape_name": args.shape, "shape": shape, "blocks": blocks,
            "nsamples": nsamples, "seqlen": seqlen, "sparsity": args.sparsity, "block_size": args.block_size,
            "backend": args.backend, "device": str(device), "device_name": device_name(device),
            "env": environment(device), "peaks": peaks,
            "warmup_s": None if warm is None else round(warm, 2), "peaks_s": round(t_peaks, 2),
            "build_s": round(t_build, 2), "block_gib": block_gib, "extrapolated_to": FULL_BLOCKS}
    results = []
    for i, method in enumerate(methods):
        if i:
            init_weights(model, args.seed, device)  # the same dense weights for every method
        if device.type == "cuda":
            torch.cuda.empty_cache()
        config = method_config(method, args)
        ph = Phases(device)
        t0 = time.perf_counter()
        try:
            with instrument(ph):
                report = pyprune.prune_model(model, ids, config, device=device)
            results.append(analyse(method, ph, report, peaks, time.perf_counter() - t0))
        except Exception as exc:  # noqa: BLE001  (report it, go on with the next method)
            results.append({"method": method, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"})
        write(out, args.name, meta, results)
        print(f"{method}: done in {time.perf_counter() - t0:.1f} s", flush=True)
    path = write(out, args.name, meta, results)
    print(path.read_text())
    return {"meta": meta, "results": results, "md": path}


if __name__ == "__main__":
    main()
