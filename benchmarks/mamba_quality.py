"""Pruning quality on Mamba: a small ``MambaForCausalLM`` trained here on WikiText-2, pruned by every method.

No pretrained Mamba checkpoint can be downloaded on the project's machines, so this benchmark trains one: a few
million parameters, AdamW on random windows of ``wikitext2/valid.txt`` for a fixed number of steps (a few CPU minutes),
cached under ``$PYPRUNE_CACHE/mamba_bench/`` (default ``~/.cache/pyprune/mamba_bench/``), keyed by every training
setting and the training text's hash, written atomically; a second run reuses it.

Tokens: the built-in SmolLM2 tokenizer, with its vocabulary remapped to the ids that occur in the training text
(id 0 = one unknown token for test tokens never seen in training), so the embedding stays small. Every method is
scored on the same token space (the remapped test text), so the perplexities compare with each other, not with
published SmolLM2 or Mamba numbers.

Then copies of the dense model are pruned with magnitude / Wanda / SparseGPT / joint at 50% and 2:4 by
``pyprune.prune_model`` (calibration: windows of valid.txt), and scored by ``pyprune.evaluate.perplexity`` on windows
of test.txt. Writes ``mamba_quality.md`` and ``mamba_quality.json`` (to ``--out``: default ``$OUT`` if set, else
``benchmarks/results``) and prints the table.

    python benchmarks/mamba_quality.py                 # train (or reuse the cached model), prune, evaluate
    python benchmarks/mamba_quality.py --retrain       # ignore the cache
    python benchmarks/mamba_quality.py --threads 2     # default 1 (the machine is shared)

Training speed: transformers' pure-torch selective scan (``modeling_mamba.mamba_selective_scan``, used on CPU when
``mamba_ssm`` is absent) indexes one time step at a time out of the (batch, d_inner, seq, state) tensors, so its
backward pass allocates a full-size zero gradient per step: O(seq^2) memory traffic, about 30 s per training step
here. During training only (this script's trainer is a stand-in for a download), this script swaps in the same recurrence written as a custom autograd function with a
hand-written backward (checked against the stock function, values and gradients, at start-up; the check's error is in
the JSON). Evaluation and pruning always run the stock transformers code.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import math
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

METHODS = ("magnitude", "wanda", "sparsegpt", "joint")
SPARSITIES = ("0.5", "2:4")
MODULE_KINDS = ("in_proj", "x_proj", "dt_proj", "out_proj")


# ------------------------------------------------------------------------------------------------- fast training scan
class _Scan(torch.autograd.Function):
    """The selective scan with its discretisation, one time step at a time in both directions.

    dt, x: (L, b, d) (dt after bias and softplus); A: (d, n); Bm, Cm: (L, b, n).
    a_t = exp(dt_t A), h_t = a_t * h_{t-1} + (dt_t x_t) B_t (h_{-1} = 0), y_t = h_t C_t; returns y: (L, b, d).
    Only the states h (L, b, d, n) are stored; a_t is recomputed in the backward pass. Every per-step tensor is
    (b, d, n), small enough to stay in cache, which is what makes this faster than full-size broadcasts."""

    @staticmethod
    def forward(ctx, dt, x, A, Bm, Cm):
        L, b, d = dt.shape
        n = A.shape[1]
        H = torch.empty(L, b, d, n, dtype=dt.dtype, device=dt.device)
        dtx = dt * x
        a = torch.empty(b, d, n, dtype=dt.dtype, device=dt.device)
        for t in range(L):
            torch.mul(dtx[t].unsqueeze(-1), Bm[t].unsqueeze(1), out=H[t])
            if t:
                torch.mul(dt[t].unsqueeze(-1), A, out=a)
                a.exp_()
                H[t].addcmul_(a, H[t - 1])
        y = torch.einsum("lbdn,lbn->lbd", H, Cm)
        ctx.save_for_backward(dt, x, A, Bm, Cm, H)
        return y

    @staticmethod
    def backward(ctx, gy):
        dt, x, A, Bm, Cm, H = ctx.saved_tensors
        L, b, d = dt.shape
        gy = gy.contiguous()
        gC = torch.einsum("lbdn,lbd->lbn", H, gy)
        dtx = dt * x
        gdt, gx, gB = torch.empty_like(dt), torch.empty_like(x), torch.empty_like(Bm)
        gA = torch.zeros_like(A)
        g = torch.zeros_like(H[0])                               # dLoss/dh_t, built from t = L-1 down
        for t in range(L - 1, -1, -1):
            g.addcmul_(gy[t].unsqueeze(-1), Cm[t].unsqueeze(1))   # + the direct path h_t -> y_t
            s = torch.bmm(g, Bm[t].unsqueeze(-1)).squeeze(-1)     # sum_n g B_t: (b, d)
            gB[t] = torch.bmm(dtx[t].unsqueeze(1), g).squeeze(1)  # sum_d g dt_t x_t: (b, n)
            torch.mul(s, x[t], out=gdt[t])
            torch.mul(s, dt[t], out=gx[t])
            if t:
                a = torch.exp(dt[t].unsqueeze(-1) * A)
                q = g * H[t - 1]
                q.mul_(a)                                          # dLoss/d(dt_t A)
                gdt[t] += (q * A).sum(-1)
                gA += (q * dt[t].unsqueeze(-1)).sum(0)
                g.mul_(a)                                          # carried back to h_{t-1}
        return gdt, gx, gA, gB, gC


def fast_selective_scan(hidden_states, dt, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                        return_last_state=False, **kwargs):
    """Drop-in for ``transformers.models.mamba.modeling_mamba.mamba_selective_scan`` (full-sequence path, no state)."""
    if return_last_state:
        raise NotImplementedError("the training scan does not return the last state")
    if delta_bias is not None:
        dt = dt + delta_bias.to(dt.dtype)[..., None]
    if delta_softplus:
        dt = F.softplus(dt)
    perm = lambda v: v.float().permute(2, 0, 1).contiguous()  # noqa: E731  (b, c, L) -> (L, b, c)
    y = _Scan.apply(perm(dt), perm(hidden_states), A.float().contiguous(), perm(B), perm(C)).permute(1, 2, 0)
    if D is not None:
        y = y + hidden_states * D[None, :, None]
    if z is not None:
        y = y * F.silu(z)
    return y.to(hidden_states.dtype)


@contextlib.contextmanager
def training_scan():
    import transformers.models.mamba.modeling_mamba as mm
    stock = mm.mamba_selective_scan
    mm.mamba_selective_scan = fast_selective_scan
    try:
        yield
    finally:
        mm.mamba_selective_scan = stock


def check_training_scan(seed: int = 0) -> dict:
    """Max relative difference of the loss-gradient and logits between the stock scan and the training scan."""
    from transformers import MambaConfig, MambaForCausalLM
    torch.manual_seed(seed)
    cfg = MambaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, state_size=8, expand=2, use_cache=False)
    model = MambaForCausalLM(cfg).train()
    with torch.no_grad():                                # larger time steps than the init, so decay matters
        for layer in model.backbone.layers:
            layer.mixer.dt_proj.bias.add_(2.0)
    ids = torch.randint(0, 97, (2, 40))
    out = []
    for ctx in (contextlib.nullcontext(), training_scan()):
        model.zero_grad()
        with ctx:
            res = model(input_ids=ids, labels=ids)
        res.loss.backward()
        out.append((res.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = out
    rel = lambda x, y: float((x - y).abs().max() / y.abs().max().clamp_min(1e-30))  # noqa: E731
    return {"logits_rel_err": rel(l1, l0), "grad_rel_err": max(rel(g1[n], g0[n]) for n in g0)}


# ----------------------------------------------------------------------------------------------------------- tokens
def load_tokens(tokenizer_spec: str = "builtin"):
    """(train ids, test ids, vocab) in the remapped space: ``vocab[k]`` is the SmolLM2 id of token k (k >= 1); 0 is
    the unknown token."""
    from pyprune.data import load_text, shared_file, tokenize
    from pyprune.models.io import load_tokenizer
    tok = load_tokenizer(tokenizer_spec)
    valid_path = shared_file("data", "wikitext2", "valid.txt")
    with open(valid_path, "rb") as f:
        valid_sha = hashlib.sha256(f.read()).hexdigest()
    train = tokenize(tok, load_text(valid_path))
    test = tokenize(tok, load_text(shared_file("data", "wikitext2", "test.txt")))
    vocab = torch.unique(train)                                       # sorted SmolLM2 ids seen in training
    table = torch.zeros(max(len(tok), int(test.max()) + 1, int(train.max()) + 1), dtype=torch.long)
    table[vocab] = torch.arange(1, vocab.numel() + 1)
    return table[train], table[test], vocab, valid_sha


# -------------------------------------------------------------------------------------------------------- training
def model_config(args, vocab_size: int):
    from transformers import MambaConfig
    return MambaConfig(vocab_size=vocab_size, hidden_size=args.hidden, num_hidden_layers=args.layers,
                       state_size=args.state, expand=args.expand, conv_kernel=4, use_cache=False,
                       tie_word_embeddings=True, pad_token_id=0, bos_token_id=0, eos_token_id=0)


def train_settings(args, vocab_size: int, valid_sha: str) -> dict:
    return {"hidden": args.hidden, "layers": args.layers, "state": args.state, "expand": args.expand,
            "vocab_size": vocab_size, "tokenizer": "smollm2-builtin-remapped", "train_text_sha256": valid_sha,
            "steps": args.steps, "batch": args.batch, "seqlen": args.train_seqlen, "lr": args.lr,
            "weight_decay": args.weight_decay, "warmup": args.warmup, "seed": args.seed}


def cache_dir() -> str:
    base = os.environ.get("PYPRUNE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "pyprune")
    return os.path.join(base, "mamba_bench")


def atomic_torch_save(obj, path: str) -> None:
    import tempfile
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    p = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def train(args, train_ids: torch.Tensor, vocab_size: int) -> tuple[dict, dict]:
    from tqdm.auto import tqdm
    from transformers import MambaForCausalLM
    torch.manual_seed(args.seed)
    model = MambaForCausalLM(model_config(args, vocab_size)).train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(args.seed)
    n_start = train_ids.numel() - args.train_seqlen + 1
    losses = []
    t0 = time.perf_counter()
    bar = tqdm(range(args.steps), desc="train", unit="step", dynamic_ncols=True)
    with training_scan():
        for step in bar:
            starts = torch.randint(0, n_start, (args.batch,), generator=g)
            ids = torch.stack([train_ids[s:s + args.train_seqlen] for s in starts.tolist()])
            for group in opt.param_groups:
                group["lr"] = lr_at(step, args)
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    seconds = time.perf_counter() - t0
    model.eval()
    k = min(10, len(losses))
    meta = {"train_seconds": seconds, "losses": losses, "first_loss_mean10": sum(losses[:k]) / k,
            "final_loss_mean10": sum(losses[-k:]) / k, "tokens_seen": args.steps * args.batch * args.train_seqlen,
            "threads": torch.get_num_threads(), "torch": torch.__version__}
    return model, meta


def load_or_train(args, train_ids, vocab, valid_sha):
    from transformers import MambaForCausalLM
    vocab_size = int(vocab.numel()) + 1
    settings = train_settings(args, vocab_size, valid_sha)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir(), f"mamba_{key}.pt")
    if os.path.isfile(path) and not args.retrain:
        blob = torch.load(path, map_location="cpu", weights_only=False)
        if blob["settings"] == settings and torch.equal(blob["vocab"], vocab):
            model = MambaForCausalLM(model_config(args, vocab_size))
            model.load_state_dict(blob["state_dict"])
            print(f"reusing cached model {path}")
            return model.eval(), {**blob["meta"], "cached": True, "cache_path": path}, settings
    model, meta = train(args, train_ids, vocab_size)
    atomic_torch_save({"settings": settings, "vocab": vocab, "meta": meta,
                       "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()}}, path)
    print(f"cached the trained model at {path}")
    return model, {**meta, "cached": False, "cache_path": path}, settings


# -------------------------------------------------------------------------------------------------------- pruning
def zero_fraction(model) -> float:
    """Fraction of exact zeros over the weights of every pruned module kind (checks the reports' sparsity)."""
    zeros = total = 0
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in MODULE_KINDS:
            zeros += int((module.weight == 0).sum())
            total += module.weight.numel()
    return zeros / total


def run_grid(args, model, calib, windows) -> list[dict]:
    from tqdm.auto import tqdm

    from pyprune import PruneConfig
    from pyprune.evaluate import perplexity
    from pyprune.models.driver import prune_model
    rows = []
    ev = perplexity(model, windows, batch_size=args.eval_batch)
    rows.append({"method": "dense", "sparsity": "0", "ppl": ev["perplexity"], "nll": ev["nll"],
                 "sparsity_achieved": zero_fraction(model), "total_loss": None, "prune_seconds": None,
                 "eval_seconds": ev["seconds"]})
    runs = [(sp, m) for sp in SPARSITIES for m in METHODS]
    for sp, method in tqdm(runs, desc="prune+eval", unit="run", dynamic_ncols=True):
        pruned = copy.deepcopy(model)
        cfg = PruneConfig(method=method, sparsity=sp, block_size=args.block_size)
        report = prune_model(pruned, calib, cfg, device="cpu")
        ev = perplexity(pruned, windows, batch_size=args.eval_batch)
        by_kind = {k: sum(layer.loss for layer in report.layers if layer.name.endswith(k)) for k in MODULE_KINDS}
        rows.append({"method": method, "sparsity": sp, "ppl": ev["perplexity"], "nll": ev["nll"],
                     "sparsity_achieved": report.sparsity, "zero_fraction": zero_fraction(pruned),
                     "total_loss": report.total_loss, "loss_by_module": by_kind,
                     "prune_seconds": report.times["total"], "eval_seconds": ev["seconds"],
                     "layer_loss": {layer.name: layer.loss for layer in report.layers}})
        del pruned
    return rows


# -------------------------------------------------------------------------------------------------------- reporting
def fmt(x, spec):
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def markdown(result: dict) -> str:
    m, t = result["model"], result["training"]
    lines = [
        "# Pruning quality on a small Mamba (trained here)",
        "",
        f"Model: transformers `MambaForCausalLM`, hidden {m['hidden']}, {m['layers']} layers, state {m['state']}, "
        f"expand {m['expand']}, {m['parameters'] / 1e6:.2f}M parameters ({m['pruned_parameters'] / 1e6:.2f}M in the "
        f"pruned in_proj / x_proj / dt_proj / out_proj; embedding tied to the LM head, dense).",
        f"Tokens: SmolLM2 tokenizer remapped to the {m['vocab_size'] - 1} ids seen in wikitext2/valid.txt plus one "
        f"unknown id ({100 * result['data']['test_unknown_fraction']:.1f}% of test tokens). Perplexities are in this "
        "token space and compare only with each other.",
        f"Training: {t['steps']} AdamW steps x {t['batch']} x {t['seqlen']} random windows of valid.txt "
        f"({t['tokens_seen'] / 1e6:.2f}M tokens), lr {t['lr']}, {t['train_seconds']:.0f} s on {t['threads']} CPU "
        f"thread(s){' (cached)' if t['cached'] else ''}; loss {t['first_loss_mean10']:.2f} (first 10 steps) -> "
        f"{t['final_loss_mean10']:.2f} (last 10).",
        f"Pruning: {result['data']['calib_samples']} x {result['data']['calib_seqlen']} calibration tokens from "
        f"valid.txt, block size {result['settings']['block_size']}, default masks. Evaluation: "
        f"{result['data']['eval_windows']} x {result['data']['eval_seqlen']} tokens of test.txt.",
        "",
        "| method | sparsity | test ppl | achieved sparsity | summed layer loss | prune s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['method']} | {r['sparsity']} | {fmt(r['ppl'], '.2f')} | "
                     f"{fmt(r['sparsity_achieved'], '.4f')} | {fmt(r['total_loss'], '.4g')} | "
                     f"{fmt(r['prune_seconds'], '.1f')} |")
    lines += ["", "Summed layer loss by module kind:", "",
              "| method | sparsity | " + " | ".join(MODULE_KINDS) + " |", "|---|---|" + "---:|" * len(MODULE_KINDS)]
    for r in result["rows"]:
        if r.get("loss_by_module"):
            lines.append(f"| {r['method']} | {r['sparsity']} | "
                         + " | ".join(fmt(r["loss_by_module"][k], ".4g") for k in MODULE_KINDS) + " |")
    lines += ["", f"Total run time {result['seconds']:.0f} s ({result['host']}, torch {torch.__version__}, "
              f"{result['threads']} thread(s)). Produced by `benchmarks/mamba_quality.py`.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(HERE, "results"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--retrain", action="store_true", help="train even if a cached model exists")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--state", type=int, default=16)
    p.add_argument("--expand", type=int, default=2)
    p.add_argument("--steps", type=int, default=180)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--train-seqlen", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nsamples", type=int, default=32, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=256, help="calibration and evaluation window length")
    p.add_argument("--eval-windows", type=int, default=256)
    p.add_argument("--eval-batch", type=int, default=8)
    p.add_argument("--block-size", type=int, default=128)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    from pyprune.data import calibration_samples, eval_windows
    from pyprune.report import atomic_write_text

    t_start = time.perf_counter()
    scan_check = check_training_scan()
    if max(scan_check.values()) > 1e-4:
        raise RuntimeError(f"the training scan disagrees with transformers' scan: {scan_check}")
    train_ids, test_ids, vocab, valid_sha = load_tokens()
    model, meta, settings = load_or_train(args, train_ids, vocab, valid_sha)
    calib = calibration_samples(train_ids, args.nsamples, args.seqlen, seed=args.seed)
    windows = eval_windows(test_ids, args.seqlen, args.eval_windows)
    rows = run_grid(args, model, calib, windows)

    n_params = sum(p.numel() for p in model.parameters())
    n_pruned = sum(mod.weight.numel() for name, mod in model.named_modules() if name.rsplit(".", 1)[-1] in MODULE_KINDS)
    result = {
        "model": {"hidden": args.hidden, "layers": args.layers, "state": args.state, "expand": args.expand,
                  "vocab_size": int(vocab.numel()) + 1, "time_step_rank": int(model.config.time_step_rank),
                  "parameters": n_params, "pruned_parameters": n_pruned},
        "training": {**settings, **{k: v for k, v in meta.items() if k != "losses"},
                     "loss_every_10": [round(sum(meta["losses"][i:i + 10]) / len(meta["losses"][i:i + 10]), 4)
                                       for i in range(0, len(meta["losses"]), 10)],
                     "scan_check": scan_check},
        "data": {"train_tokens": int(train_ids.numel()), "test_tokens": int(test_ids.numel()),
                 "test_unknown_fraction": float((test_ids == 0).float().mean()),
                 "calib_samples": args.nsamples, "calib_seqlen": args.seqlen,
                 "eval_windows": int(windows.shape[0]), "eval_seqlen": args.seqlen,
                 "eval_unknown_fraction": float((windows == 0).float().mean())},
        "settings": {"block_size": args.block_size, "device": "cpu"},
        "rows": rows, "seconds": time.perf_counter() - t_start, "threads": args.threads,
        "host": platform.machine(), "torch": torch.__version__,
    }
    text = markdown(result)
    atomic_write_text(os.path.join(args.out, "mamba_quality.md"), text)
    atomic_write_text(os.path.join(args.out, "mamba_quality.json"), json.dumps(result, indent=1) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
