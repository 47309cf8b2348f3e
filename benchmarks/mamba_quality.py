"""Pruning quality on Mamba: a small ``MambaForCausalLM`` trained here on WikiText-2, pruned by every method over
several calibration seeds and scored on WikiText-2 test text and on two Gutenberg books.

The question (issue 13): is joint better than Wanda and SparseGPT on a Mamba model, at 50% and 2:4, beyond the noise,
on text unlike the calibration text?

No pretrained Mamba checkpoint can be downloaded on the project's machines, so this benchmark trains one: a few
million parameters, AdamW on random windows of its training text (``--train-text``: ``books``, the default, is
``wikitext2/valid.txt`` plus two Gutenberg books that are neither scored nor calibration text, so the scored books are
prose the model has seen the like of, as a pretrained LLM has; ``valid`` is valid.txt alone, the first reports) for a
fixed number of steps (a few CPU minutes),
cached under ``$PYPRUNE_CACHE/mamba_bench/`` (default ``~/.cache/pyprune/mamba_bench/``), keyed by every training
setting and the training text's hash, written atomically; a second run reuses it.

Tokens: the built-in SmolLM2 tokenizer, with its vocabulary remapped to the ids that occur in the training text
(id 0 = one unknown token for tokens never seen in training), so the embedding stays small. Every scored text is
remapped the same way (the report gives each text's unknown-token fraction), so the perplexities compare with each
other, not with published SmolLM2 or Mamba numbers.

Then copies of the dense model are pruned with Wanda / SparseGPT / joint at 50% and 2:4 by ``pyprune.prune_model``
once per calibration seed (``--seeds``, default 0,1,2: different random windows of valid.txt,
``calibration_samples(..., seed=)``), magnitude once (it reads no calibration data), and joint once more at the first
seed with the same calibration windows in another order: the rounding-only noise floor (the Hessians are equal up to
float summation order). Every model is scored on windows of the WikiText-2 test split (``--eval-windows``) and of
Pride and Prejudice and Moby Dick (``--book-windows`` each, after the Gutenberg licence header), twice from the same
forward passes: over every target (the usual perplexity, the same sums as ``pyprune.evaluate.perplexity``: checked at
start-up) and over the known targets only (targets that are not the unknown id; the books' line breaks, glued
punctuation and curly quotes are unknown in WikiText-2's token space, a quarter of their tokens with ``--train-text
valid``, 2-7% with ``books``, and the model never
saw the unknown id as a target, so it only learned to make it improbable). The report gives, per method, sparsity,
text and scoring, the mean perplexity over seeds (min-max); the paired ratios joint / Wanda and joint / SparseGPT
(same calibration windows; mean and min-max over seeds, and a 95% range over the evaluation windows pooled over
seeds); the noise floor; and a verdict per sparsity, text and scoring (seed ranges apart or overlapping; paired
ratios beyond the noise floor or not). Calibration (``--calib``): ``mix`` (default, as pyprune's default calibration:
half the windows from valid.txt, half from A Tale of Two Cities, remapped the same way) or ``valid`` (valid.txt only).
Writes ``mamba_quality_mix_trainbooks.md``/``.json`` (``--calib valid``: ``mamba_quality_trainbooks.*``; trained on
valid.txt alone: without ``_trainbooks``) (to ``--out``: default
``$OUT`` if set, else ``benchmarks/results``) and prints the table.

    python benchmarks/mamba_quality.py                 # train (or reuse the cached model), prune, evaluate
    python benchmarks/mamba_quality.py --retrain       # ignore the cache
    python benchmarks/mamba_quality.py --seeds 0       # one calibration seed (no ranges)
    python benchmarks/mamba_quality.py --threads 2     # default 1 (the machine is shared)
    python benchmarks/mamba_quality.py --report-only   # rebuild the tables from mamba_quality_mix_trainbooks.json
    python benchmarks/mamba_quality.py --train-text valid --calib valid --report-only   # the first report

Training speed: transformers' pure-torch selective scan (``modeling_mamba.mamba_selective_scan``, used on CPU when
``mamba_ssm`` is absent) indexes one time step at a time out of the (batch, d_inner, seq, state) tensors, so its
backward pass allocates a full-size zero gradient per step: O(seq^2) memory traffic, about 30 s per training step
here. During training only (this script's trainer is a stand-in for a download), this script swaps in the same
recurrence written as a custom autograd function with a hand-written backward (checked against the stock function,
values and gradients, at start-up; the check's error is in the JSON). Evaluation and pruning always run the stock
transformers code.
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
import statistics
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
if HERE not in sys.path:
    sys.path.insert(0, HERE)
from heldout import book_text, reorder  # noqa: E402 - heldout.py's book text and reordering (one implementation)

METHODS = ("magnitude", "wanda", "sparsegpt", "joint")
SPARSITIES = ("0.5", "2:4")
MODULE_KINDS = ("in_proj", "x_proj", "dt_proj", "out_proj")
SEEDED = ("wanda", "sparsegpt", "joint")     # the methods that read calibration data: one run per seed
BASELINES = ("wanda", "sparsegpt")           # joint's paired comparisons
TEXTS = {  # name -> (shared path parts, label): the test split of the training corpus, then two books unlike it
    "wikitext2": (("data", "wikitext2", "test.txt"), "WikiText-2 test"),
    "pride": (("data", "gutenberg", "pg1342.txt"), "Pride and Prejudice"),
    "moby": (("data", "gutenberg", "2701-0.txt"), "Moby Dick"),
}
TRAIN_TEXTS = {  # --train-text -> the shared files the model is trained on, in order
    "valid": (("data", "wikitext2", "valid.txt"),),
    "books": (("data", "wikitext2", "valid.txt"), ("data", "gutenberg", "11-0.txt"),
              ("data", "gutenberg", "pg161.txt")),
}
SCORINGS = {  # how the targets of a text are scored -> label
    "all": "every target",
    "known": "known targets only (targets that are not the unknown id)",
}


def score_key(text: str, scoring: str) -> str:
    """The key of a text's perplexity under a scoring in the rows' ``ppl`` / ``window_nll``: ``pride``,
    ``pride/known``."""
    return text if scoring == "all" else f"{text}/{scoring}"


def score_keys() -> list[tuple[str, str, str]]:
    """(key, text, scoring) of every score, scoring-major."""
    return [(score_key(n, sc), n, sc) for sc in SCORINGS for n in TEXTS]


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
def remap(ids: torch.Tensor, vocab: torch.Tensor) -> torch.Tensor:
    """Tokenizer ids -> the model's ids: ``vocab[k - 1]`` (sorted) becomes k; ids not in ``vocab`` become 0."""
    pos = torch.searchsorted(vocab, ids).clamp_max(vocab.numel() - 1)
    return torch.where(vocab[pos] == ids, pos + 1, torch.zeros_like(ids))


def load_tokens(train_text: str = "valid", tokenizer_spec: str = "builtin"):
    """(train ids, {text name: ids}, vocab, the training files' sha256, calibration book ids) in the remapped space:
    ``vocab[k - 1]`` is the SmolLM2 id of token k (k >= 1); 0 is the unknown token. Training text (``TRAIN_TEXTS``):
    ``valid`` (valid.txt) or ``books`` (valid.txt, then Alice in Wonderland and Sense and Sensibility: books that
    are neither scored nor calibration text). Texts: ``TEXTS`` (books without their licence header); the calibration
    book: pyprune's ``gutenberg`` calibration text (A Tale of Two Cities, not scored)."""
    from pyprune.data import load_text, shared_file, tokenize
    from pyprune.models.io import load_tokenizer
    tok = load_tokenizer(tokenizer_spec)

    def ids(parts):  # a shared text's token ids (a Gutenberg book without its licence header)
        path = shared_file(*parts)
        return tokenize(tok, book_text(path) if parts[1] == "gutenberg" else load_text(path))

    sha = hashlib.sha256()
    for parts in TRAIN_TEXTS[train_text]:
        with open(shared_file(*parts), "rb") as f:
            sha.update(f.read())
    train = torch.cat([ids(parts) for parts in TRAIN_TEXTS[train_text]])
    vocab = torch.unique(train)                                       # sorted SmolLM2 ids seen in training
    texts = {name: remap(ids(parts), vocab) for name, (parts, _) in TEXTS.items()}
    book = remap(tokenize(tok, load_text("gutenberg", split="calib")), vocab)
    return remap(train, vocab), texts, vocab, sha.hexdigest(), book


# -------------------------------------------------------------------------------------------------------- training
def model_config(args, vocab_size: int):
    from transformers import MambaConfig
    return MambaConfig(vocab_size=vocab_size, hidden_size=args.hidden, num_hidden_layers=args.layers,
                       state_size=args.state, expand=args.expand, conv_kernel=4, use_cache=False,
                       tie_word_embeddings=True, pad_token_id=0, bos_token_id=0, eos_token_id=0)


def train_settings(args, vocab_size: int, valid_sha: str) -> dict:
    extra = {} if args.train_text == "valid" else {"train_text": args.train_text}   # valid: the first reports' key
    return {**extra, "hidden": args.hidden, "layers": args.layers, "state": args.state, "expand": args.expand,
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


def plan(seeds: list[int]) -> list[tuple[str, str, int | None, int]]:
    """(method, sparsity, seed, order) in run order: magnitude once per sparsity (seed None: it reads no calibration
    data), every seeded method at the first seed, the noise floor (joint at the first seed, samples reordered: order
    1), then every seeded method at each further seed."""
    runs = [("magnitude", sp, None, 0) for sp in SPARSITIES]
    for i, seed in enumerate(seeds):
        runs += [(m, sp, seed, 0) for sp in SPARSITIES for m in SEEDED]
        if i == 0:
            runs += [("joint", sp, seed, 1) for sp in SPARSITIES]
    return runs


def score_windows(model, windows: torch.Tensor, batch_size: int) -> dict:
    """One pass over the (k, seqlen) windows: per window, the summed next-token NLL over every target and over the
    known targets (id != 0), and the number of known targets. The every-target sums are what
    ``pyprune.evaluate.perplexity`` computes (checked on the dense model at start-up: ``eval_check`` in the JSON)."""
    t0 = time.perf_counter()
    total, known, n_known = [], [], []
    model.eval()
    with torch.no_grad():
        for s in range(0, windows.shape[0], batch_size):
            ids = windows[s:s + batch_size]
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1, :].float()
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                  reduction="none").view(ids.shape[0], -1).double()
            mask = ids[:, 1:] != 0
            total.append(nll.sum(1))
            known.append((nll * mask).sum(1))
            n_known.append(mask.sum(1))
            del logits
    return {"sum": torch.cat(total), "known_sum": torch.cat(known), "known_count": torch.cat(n_known),
            "targets": windows.shape[1] - 1, "seconds": time.perf_counter() - t0}


def evaluate_all(model, windows: dict, batch_size: int) -> dict:
    """Per score key (``score_keys``): perplexity and per-window mean NLL (rounded; None for a window without a
    known target); per text: the mean NLL of the unknown targets; and the evaluation seconds in all."""
    out = {"ppl": {}, "window_nll": {}, "unknown_target_nll": {}, "eval_seconds": 0.0}
    for name, w in windows.items():
        r = score_windows(model, w, batch_size)
        n_all, n_known = r["targets"] * w.shape[0], int(r["known_count"].sum())
        out["ppl"][score_key(name, "all")] = math.exp(float(r["sum"].sum()) / n_all)
        out["window_nll"][score_key(name, "all")] = [round(float(x) / r["targets"], 5) for x in r["sum"]]
        out["ppl"][score_key(name, "known")] = math.exp(float(r["known_sum"].sum()) / max(n_known, 1))
        out["window_nll"][score_key(name, "known")] = [round(float(x) / int(c), 5) if c else None
                                                       for x, c in zip(r["known_sum"], r["known_count"])]
        unk = n_all - n_known
        out["unknown_target_nll"][name] = (float(r["sum"].sum() - r["known_sum"].sum()) / unk) if unk else None
        out["eval_seconds"] += r["seconds"]
    return out


def check_eval(model, windows: dict, batch_size: int, k: int = 8) -> float:
    """Largest relative difference of the every-target perplexity between ``score_windows`` and
    ``pyprune.evaluate.perplexity`` on the first ``k`` windows of each text."""
    from pyprune.evaluate import perplexity
    worst = 0.0
    for w in windows.values():
        a = perplexity(model, w[:k], batch_size=batch_size)["perplexity"]
        r = score_windows(model, w[:k], batch_size)
        b = math.exp(float(r["sum"].sum()) / (r["targets"] * min(k, w.shape[0])))
        worst = max(worst, abs(b / a - 1.0))
    return worst


def calibration(args, train_ids: torch.Tensor, book_ids: torch.Tensor, seed: int) -> torch.Tensor:
    """The calibration windows of one seed: ``--calib valid``: random windows of valid.txt (the training text);
    ``mix``: half of them from valid.txt, half from the calibration book (``mixed_calibration_samples``, as pyprune's
    default ``--calib-text wikitext2,gutenberg``)."""
    from pyprune.data import mixed_calibration_samples
    streams = [train_ids] if args.calib == "valid" else [train_ids, book_ids]
    return mixed_calibration_samples(streams, args.nsamples, args.seqlen, seed=seed)


def output_stem(calib: str, train_text: str = "valid", shrink: float | None = None) -> str:
    """mamba_quality (trained and calibrated on valid.txt, the first report), mamba_quality_<calib> (trained on
    valid.txt), then ``_train<train_text>`` for another training text, then ``_shrink<x>`` when joint runs with a
    Hessian shrink other than pyprune's default (``--shrink``; the default at the sparsities this benchmark runs, 50%
    and 2:4, is DEFAULT_SHRINK: pyprune.config.default_shrink)."""
    from pyprune.config import DEFAULT_SHRINK
    stem = "mamba_quality" if calib == "valid" else f"mamba_quality_{calib}"
    stem = stem if train_text == "valid" else f"{stem}_train{train_text}"
    return stem if shrink is None or shrink == DEFAULT_SHRINK else f"{stem}_shrink{shrink:g}"


def write_outputs(out: str, calib: str, train_text: str, result: dict, shrink: float | None = None) -> str:
    """Write ``<stem>.md`` and ``<stem>.json`` (atomically) to ``out``; the markdown."""
    from pyprune.report import atomic_write_text
    text = markdown(result)
    stem = os.path.join(out, output_stem(calib, train_text, shrink))
    atomic_write_text(stem + ".md", text)
    atomic_write_text(stem + ".json", json.dumps(finite(result), indent=1) + "\n")
    return text


def reused_rows(path: str, expect: dict, dense: dict) -> list[dict]:
    """The rows of every method but joint from an earlier result JSON (``--reuse``): its Wanda, SparseGPT and
    magnitude runs do not depend on joint's settings, so a run that changes only joint's (``--shrink``) need not
    repeat them. ``expect``: what must match this run (the model's training settings, the data and calibration
    settings, the seeds, the block size); ``dense``: this run's own dense row, whose perplexities must equal the
    file's (the same model and the same windows). Raises ValueError naming the file and what differs."""
    with open(path) as f:
        old = json.load(f)
    have = {"training": {k: old.get("training", {}).get(k) for k in expect["training"]},
            "data": {k: old.get("data", {}).get(k) for k in expect["data"]},
            "seeds": old.get("seeds"), "block_size": old.get("settings", {}).get("block_size")}
    for key in expect:
        if have[key] != expect[key]:
            raise ValueError(f"--reuse {path}: its {key} ({have[key]}) differ from this run's ({expect[key]}); reuse "
                             "only a result of the same model, data, seeds and block size")
    old_dense = next((r for r in old["rows"] if r["method"] == "dense"), None)
    if old_dense is None or any(not math.isclose(old_dense["ppl"][k], v, rel_tol=1e-9)
                                for k, v in dense["ppl"].items()):
        raise ValueError(f"--reuse {path}: its dense perplexities differ from this model's: not the same model or "
                         "windows")
    return [r for r in old["rows"] if r["method"] not in ("dense", "joint")]


def run_grid(args, model, train_ids, book_ids, windows: dict, seeds: list[int], reuse=None) -> list[dict]:
    """Every run of ``plan`` (``reuse(dense_row)``: the rows of every method but joint, taken from an earlier run
    instead; joint is pruned with ``--shrink`` when given, else pyprune's default)."""
    from tqdm.auto import tqdm

    from pyprune import PruneConfig
    from pyprune.models.driver import prune_model
    rows = [{"method": "dense", "sparsity": "0", "seed": None, "order": 0, **evaluate_all(model, windows,
             args.eval_batch), "sparsity_achieved": zero_fraction(model), "total_loss": None,
             "prune_seconds": None}]
    if reuse is not None:
        rows += reuse(rows[0])
    calib = {s: calibration(args, train_ids, book_ids, s) for s in seeds}
    runs = [r for r in plan(seeds) if reuse is None or r[0] == "joint"]
    bar = tqdm(runs, desc="prune+eval", unit="run", dynamic_ncols=True)
    for method, sp, seed, order in bar:
        bar.set_postfix_str(f"{method} {sp} seed {seed}" + (f" order {order}" if order else ""))
        pruned = copy.deepcopy(model)
        cfg = PruneConfig(method=method, sparsity=sp, block_size=args.block_size,
                          shrink=args.shrink if method == "joint" else None)  # None: the method's default
        report = prune_model(pruned, reorder(calib[seeds[0] if seed is None else seed], order), cfg, device="cpu")
        ev = evaluate_all(pruned, windows, args.eval_batch)
        by_kind = {k: sum(layer.loss for layer in report.layers if layer.name.endswith(k)) for k in MODULE_KINDS}
        rows.append({"method": method, "sparsity": sp, "seed": seed, "order": order, **ev,
                     "sparsity_achieved": report.sparsity, "zero_fraction": zero_fraction(pruned),
                     "total_loss": report.total_loss, "loss_by_module": by_kind,
                     "prune_seconds": report.times["total"],
                     "layer_loss": {layer.name: layer.loss for layer in report.layers}})
        tqdm.write(f"{method} {sp} seed {seed} order {order}: "
                   + ", ".join(f"{n} {v:.2f}" for n, v in ev["ppl"].items()), file=sys.stdout)
        del pruned
    return rows


# ------------------------------------------------------------------------------------------------------ bookkeeping
def summarise(rows: list[dict]) -> dict:
    """"method/sparsity" -> {"seeds", text: [mean, min, max] of the perplexity, "total_loss", "prune_seconds" (means),
    "loss_by_module" (means per kind)} over the order-0 runs (dense included, as "dense/0")."""
    by = {}
    for r in rows:
        if not r["order"]:
            by.setdefault(f"{r['method']}/{r['sparsity']}", []).append(r)
    out = {}
    mean = lambda v: statistics.fmean(v) if v and None not in v else None  # noqa: E731  (NaN stays NaN)
    for k, rs in by.items():
        rs = sorted(rs, key=lambda r: -1 if r["seed"] is None else r["seed"])
        s = {"seeds": [r["seed"] for r in rs]}
        for name in rs[0]["ppl"]:
            v = [r["ppl"][name] for r in rs]
            s[name] = [statistics.fmean(v), min(v), max(v)]
        s["total_loss"] = mean([r["total_loss"] for r in rs])
        s["prune_seconds"] = mean([r["prune_seconds"] for r in rs])
        s["sparsity_achieved"] = mean([r["sparsity_achieved"] for r in rs])
        if rs[0].get("loss_by_module"):
            s["loss_by_module"] = {kind: mean([r["loss_by_module"][kind] for r in rs])
                                   for kind in rs[0]["loss_by_module"]}
        out[k] = s
    rank = lambda k: (-1, -1) if k == "dense/0" else (SPARSITIES.index(k.split("/")[1]),  # noqa: E731
                                                      METHODS.index(k.split("/")[0]))
    return dict(sorted(out.items(), key=lambda kv: rank(kv[0])))


def _find(rows, method, sparsity, seed, order=0):
    return next((r for r in rows if (r["method"], r["sparsity"], r["seed"], r["order"]) == (method, sparsity, seed,
                                                                                            order)), None)


def paired(rows: list[dict], a: str, b: str, sparsity: str) -> dict:
    """Per text, method ``a`` against ``b`` at ``sparsity`` on the same calibration windows: {"seeds", "ratios"
    (perplexity a / b per seed), "mean", "min", "max", "windows" ([lo, hi]: exp of the mean per-window NLL difference
    +- 2 standard errors, pooled over the seeds; None with fewer than two windows)}."""
    out = {}
    pairs = [(r, _find(rows, b, sparsity, r["seed"])) for r in rows
             if r["method"] == a and r["sparsity"] == sparsity and not r["order"]]
    pairs = sorted([(x, y) for x, y in pairs if y is not None], key=lambda p: p[0]["seed"])
    for name in (pairs[0][0]["ppl"] if pairs else ()):
        ratios = [x["ppl"][name] / y["ppl"][name] for x, y in pairs]
        d = [u - v for x, y in pairs for u, v in zip(x["window_nll"][name], y["window_nll"][name])
             if u is not None and v is not None]
        win = None
        if len(d) > 1:
            m, se = statistics.fmean(d), statistics.stdev(d) / math.sqrt(len(d))
            win = [math.exp(m - 2 * se), math.exp(m + 2 * se)]
        out[name] = {"seeds": [x["seed"] for x, _ in pairs], "ratios": ratios, "mean": statistics.fmean(ratios),
                     "min": min(ratios), "max": max(ratios), "windows": win}
    return out


def noise_floor(rows: list[dict]) -> dict:
    """"method/sparsity/seed<s>" -> {text: relative perplexity change of the reordered run against its order-0 run}."""
    out = {}
    for r in rows:
        if r["order"]:
            base = _find(rows, r["method"], r["sparsity"], r["seed"])
            if base is not None:
                out[f"{r['method']}/{r['sparsity']}/seed{r['seed']}"] = {
                    n: r["ppl"][n] / base["ppl"][n] - 1.0 for n in r["ppl"]}
    return out


def verdicts(summary: dict, pairs: dict, floor: dict) -> list[dict]:
    """Per sparsity, text and baseline: joint's seed range against the baseline's ("apart, lower" when joint's
    maximum is below the baseline's minimum, "apart, higher" the other way round, else "overlapping"), and the paired
    ratios against the noise floor f (the largest reordering change of joint at that sparsity and score): "lower"
    when every seed's ratio is below 1 - f and the window range lies below 1, "higher" when every ratio is above
    1 + f and the window range lies above 1, else "within noise". Verdict: "win" (paired lower and seed ranges
    apart), "paired win, seed ranges overlap", "tie" (paired within noise), and the same for losses."""
    out = []
    for sp in SPARSITIES:
        j = summary.get(f"joint/{sp}")
        if j is None:
            continue
        for name, text, scoring in score_keys():
            f = max((abs(v[name]) for k, v in floor.items() if k.startswith(f"joint/{sp}/")), default=0.0)
            for b in BASELINES:
                o, p = summary.get(f"{b}/{sp}"), pairs.get(f"joint/{b}/{sp}", {}).get(name)
                if o is None or p is None:
                    continue
                seeds = ("apart, lower" if j[name][2] < o[name][1] else
                         "apart, higher" if j[name][1] > o[name][2] else "overlapping")
                w = p["windows"]                         # None (no window range): only the seeds decide
                paired_v = ("lower" if p["max"] < 1 - f and (w is None or w[1] < 1) else
                            "higher" if p["min"] > 1 + f and (w is None or w[0] > 1) else "within noise")
                if paired_v == "within noise":
                    overall = "tie"
                elif paired_v == "lower":
                    overall = "win" if seeds == "apart, lower" else "paired win, seed ranges overlap"
                else:
                    overall = "loss" if seeds == "apart, higher" else "paired loss, seed ranges overlap"
                out.append({"sparsity": sp, "score": name, "text": text, "scoring": scoring, "baseline": b,
                            "seed_ranges": seeds, "paired": paired_v, "floor": f, "verdict": overall})
    return out


# -------------------------------------------------------------------------------------------------------- reporting
def finite(obj):
    """``obj`` with every non-finite float (a method without a layer loss reports NaN) replaced by None, for JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def fmt(x, spec):
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def fmt_range(v) -> str:
    return f"{v[0]:.2f} ({v[1]:.2f}-{v[2]:.2f})" if v[1] != v[2] else f"{v[0]:.2f}"


def markdown(result: dict) -> str:
    m, t, d = result["model"], result["training"], result["data"]
    summary, names = result["summary"], list(TEXTS)
    labels = [TEXTS[n][1] for n in names]
    dense = next(r for r in result["rows"] if r["method"] == "dense")
    unk = ", ".join(f"{TEXTS[n][1]} {100 * d['texts'][n]['unknown_fraction']:.1f}% "
                    f"({100 * d['texts'][n]['eval_unknown_fraction']:.1f}% of the scored windows)" for n in names)
    def unk_share(n):   # the unknown targets' part of the dense model's every-target NLL: all = (1-q) K + q U
        u, a, k = (dense["unknown_target_nll"][n], math.log(dense["ppl"][score_key(n, "all")]),
                   math.log(dense["ppl"][score_key(n, "known")]))
        return None if u is None or u == k else (a - k) / (u - k) * u / a
    unk_nll = "; ".join(f"{TEXTS[n][1]}: {fmt(dense['unknown_target_nll'][n], '.1f')} nats per unknown target, "
                        f"{math.log(dense['ppl'][score_key(n, 'known')]):.2f} per known one, the unknown targets "
                        f"{fmt(100 * unk_share(n) if unk_share(n) is not None else None, '.0f')}% of the "
                        "every-target NLL" for n in names)
    books = d.get("train_text", "valid") == "books"
    train_label = ("valid.txt, Alice in Wonderland and Sense and Sensibility (books neither scored nor calibration "
                   "text)" if books else "valid.txt")
    lines = [
        "# Pruning quality on a small Mamba (trained here), over calibration seeds and on held-out text",
        "",
        f"Model: transformers `MambaForCausalLM`, hidden {m['hidden']}, {m['layers']} layers, state {m['state']}, "
        f"expand {m['expand']}, {m['parameters'] / 1e6:.2f}M parameters ({m['pruned_parameters'] / 1e6:.2f}M in the "
        f"pruned in_proj / x_proj / dt_proj / out_proj; embedding tied to the LM head, dense).",
        f"Tokens: SmolLM2 tokenizer remapped to the {m['vocab_size'] - 1} ids seen in the training text plus one "
        f"unknown id; every scored text is remapped the same way. Unknown-token fraction: {unk}. Perplexities are in "
        "this token space and compare only with each other (and only within one text).",
        f"Training: {t['steps']} AdamW steps x {t['batch']} x {t['seqlen']} random windows of {train_label} "
        f"({t['tokens_seen'] / 1e6:.2f}M tokens), lr {t['lr']}, {t['train_seconds']:.0f} s on {t['threads']} CPU "
        f"thread(s){' (cached)' if t['cached'] else ''}; loss {t['first_loss_mean10']:.2f} (first 10 steps) -> "
        f"{t['final_loss_mean10']:.2f} (last 10).",
        f"Pruning: {d['calib_samples']} x {d['calib_seqlen']} calibration tokens at random positions of "
        + ("valid.txt, " if d.get("calib", "valid") == "valid" else "valid.txt (half) and A Tale of Two Cities "
           f"(half; {d['calib_book_unknown_fraction']:.1%} of its tokens unknown; not scored), ")
        + f"one draw per calibration seed ({', '.join(map(str, result['seeds']))}; magnitude reads no calibration data "
        f"and runs once), block size {result['settings']['block_size']}, default masks, "
        + (f"joint with Hessian shrink {result['settings']['joint_shrink']:g} and the default exchanges"
           if "joint_shrink" in result["settings"] else "joint with the defaults of its time (no Hessian shrink)")
        + (f" (the other methods' runs taken from `{os.path.basename(result['settings']['reused'])}`)"
           if result["settings"].get("reused") else "")
        + ". Evaluation: the first "
        + ", ".join(f"{d['texts'][n]['eval_windows']} x {d['eval_seqlen']} tokens of {TEXTS[n][1]}" for n in names)
        + " (the books after their Gutenberg licence header; text unlike the calibration text).",
        "",
        "Two scorings. *Every target*: the usual perplexity over every predicted token. *Known targets*: the same "
        "forward passes, the NLL averaged over the targets that are not the unknown id (unknown ids stay in the "
        "input). The unknown id never occurs in the training text, so training only pushes its probability down. "
        f"Dense model: {unk_nll}. Where a text has many unknown tokens"
        + ("" if books else " (the books: WikiText-2's tokenized format has no bare line breaks, no punctuation glued "
           "to a word and no curly quotes, so those tokens of the hard-wrapped books are unknown)")
        + ", the every-target perplexity depends heavily on how a pruned model happens "
        "to move that one logit, not only on how well it predicts the text; the known-target perplexity is the "
        "quality measure there.",
    ]
    for sc, sc_label in SCORINGS.items():
        lines += ["", f"## Perplexity, {sc_label}: mean over calibration seeds (min-max)", ""]
        if sc == "all":
            lines += ["Summed layer loss and prune seconds: means over seeds (magnitude prunes without Hessians, so "
                      "no layer loss).", ""]
        extra = " achieved sparsity | summed layer loss | prune s |" if sc == "all" else ""
        lines += ["| method | sparsity | seeds | " + " | ".join(labels) + " |" + extra,
                  "|---|---|---|" + "---:|" * (len(names) + (3 if extra else 0))]
        for k, s in summary.items():
            method, sp = k.split("/")
            seeds = ",".join("-" if x is None else str(x) for x in s["seeds"])
            lines.append(f"| {method} | {sp} | {seeds} | "
                         + " | ".join(fmt_range(s[score_key(n, sc)]) for n in names) + " |"
                         + (f" {fmt(s['sparsity_achieved'], '.4f')} | {fmt(s['total_loss'], '.4g')} | "
                            f"{fmt(s['prune_seconds'], '.1f')} |" if extra else ""))
    lines += ["", "## Paired ratios (same calibration windows): joint / baseline perplexity",
              "", "Mean over seeds (min-max); then the 95% range of the ratio over the evaluation windows, pooled over "
              "the seeds (exp of the mean per-window NLL difference +- 2 standard errors).", "",
              "| scoring | sparsity | pair | " + " | ".join(labels) + " |", "|---|---|---|" + "---|" * len(names)]
    for sc in SCORINGS:
        for key, p in result["paired"].items():
            a, b, sp = key.split("/")
            cells = []
            for n in names:
                x = p[score_key(n, sc)]
                cells.append(f"{x['mean']:.4f} ({x['min']:.4f}-{x['max']:.4f})"
                             + (f"; windows {x['windows'][0]:.4f}-{x['windows'][1]:.4f}" if x["windows"] else ""))
            lines.append(f"| {sc} | {sp} | {a} / {b} | " + " | ".join(cells) + " |")
    lines += ["", "## Rounding-only noise floor", "",
              "Joint at the first seed with the same calibration windows in another order (the Hessians are equal up "
              "to float32 summation order): relative perplexity change against the run in the original order.", "",
              "| run | scoring | " + " | ".join(labels) + " |", "|---|---|" + "---:|" * len(names)]
    for key, v in result["noise_floor"].items():
        for sc in SCORINGS:
            lines.append(f"| {key} | {sc} | " + " | ".join(f"{100 * v[score_key(n, sc)]:+.4f}%" for n in names) + " |")
    lines += ["", "## Verdict: joint against Wanda and SparseGPT", "",
              "Seed ranges: joint's min-max over seeds against the baseline's (apart or overlapping). Paired: every "
              "seed's joint / baseline ratio below 1 - f and the window range below 1 (lower), or every ratio above "
              "1 + f and the window range above 1 (higher), f the noise floor of joint at that sparsity, text and "
              "scoring; else within noise. Verdict: win / loss when both agree, "
              "\"paired\" when only the paired ratios clear the floor, tie when they do not.", "",
              "| scoring | sparsity | text | baseline | ratio mean (min-max) | seed ranges | paired vs floor "
              "| verdict |",
              "|---|---|---|---|---|---|---|---|"]
    for v in sorted(result["verdicts"], key=lambda v: list(SCORINGS).index(v["scoring"])):
        p = result["paired"][f"joint/{v['baseline']}/{v['sparsity']}"][v["score"]]
        lines.append(f"| {v['scoring']} | {v['sparsity']} | {TEXTS[v['text']][1]} | {v['baseline']} | "
                     f"{p['mean']:.4f} ({p['min']:.4f}-{p['max']:.4f}) | {v['seed_ranges']} | {v['paired']} "
                     f"(f = {100 * v['floor']:.4f}%) | **{v['verdict']}** |")
    lines += ["", "Summed layer loss by module kind (mean over seeds):", "",
              "| method | sparsity | " + " | ".join(MODULE_KINDS) + " |", "|---|---|" + "---:|" * len(MODULE_KINDS)]
    for k, s in summary.items():
        if s.get("loss_by_module"):
            method, sp = k.split("/")
            lines.append(f"| {method} | {sp} | " + " | ".join(fmt(s["loss_by_module"][kind], ".4g")
                                                                for kind in MODULE_KINDS) + " |")
    lines += ["", f"Total run time {result['seconds']:.0f} s ({result['host']}, torch {result['torch']}, "
              f"{result['threads']} thread(s)). Produced by `benchmarks/mamba_quality.py`.", ""]
    return "\n".join(lines)


def report(rows: list[dict]) -> dict:
    """The bookkeeping of a finished grid: {"summary", "paired", "noise_floor", "verdicts"}."""
    summary = summarise(rows)
    pairs = {f"joint/{b}/{sp}": paired(rows, "joint", b, sp) for sp in SPARSITIES for b in BASELINES
             if f"joint/{sp}" in summary and f"{b}/{sp}" in summary}
    floor = noise_floor(rows)
    return {"summary": summary, "paired": pairs, "noise_floor": floor, "verdicts": verdicts(summary, pairs, floor)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(HERE, "results"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--retrain", action="store_true", help="train even if a cached model exists")
    p.add_argument("--report-only", action="store_true",
                   help="rebuild the summary, paired ratios, verdicts and markdown from the run's JSON in <out> "
                   "(the name --calib and --train-text give: mamba_quality_mix_trainbooks.json by default)")
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
    p.add_argument("--seeds", default="0,1,2", help="comma-separated calibration seeds (default: %(default)s)")
    p.add_argument("--nsamples", type=int, default=32, help="calibration windows")
    p.add_argument("--calib", default="mix", choices=("mix", "valid"),
                   help="calibration text: mix (default; half valid.txt, half A Tale of Two Cities, as pyprune's "
                   "default) or valid (valid.txt only). Part of the output names: mamba_quality_mix_trainbooks.* "
                   "by default, mamba_quality_trainbooks.* with valid")
    p.add_argument("--train-text", default="books", choices=tuple(TRAIN_TEXTS),
                   help="what the model is trained on: books (default: valid.txt plus Alice in Wonderland and Sense "
                   "and Sensibility, neither scored nor calibration text; writes mamba_quality_<calib>_trainbooks.*) "
                   "or valid (valid.txt only, the first reports: a quarter of the scored books' tokens are unknown "
                   "and the model never saw book prose, so pruning that forgets the training text can score better "
                   "than the dense model there)")
    p.add_argument("--seqlen", type=int, default=256, help="calibration and evaluation window length")
    p.add_argument("--eval-windows", type=int, default=256, help="windows of the WikiText-2 test text")
    p.add_argument("--book-windows", type=int, default=64, help="windows of each Gutenberg book")
    p.add_argument("--eval-batch", type=int, default=8)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--shrink", type=float, default=None,
                   help="joint's Hessian shrink (PruneConfig.shrink; default: pyprune's default for joint). Another "
                   "value adds _shrink<x> to the output names")
    p.add_argument("--reuse", default=None, metavar="JSON",
                   help="take the Wanda, SparseGPT and magnitude runs from this earlier result of the same model, "
                   "data, seeds and block size (checked) and prune only joint: for a run that changes only "
                   "--shrink")
    args = p.parse_args(argv)
    from pyprune import PruneConfig
    try:  # PruneConfig's own check, before the slow work; its shrink is joint's effective one (None: the default)
        joint_shrink = PruneConfig(method="joint", shrink=args.shrink).shrink
    except ValueError as e:
        p.error(f"--shrink: {e}")
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    if not seeds or len(set(seeds)) != len(seeds):
        p.error(f"--seeds: expected distinct integers, got {args.seeds!r}")
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    from pyprune.data import eval_windows
    if args.report_only:
        with open(os.path.join(args.out, output_stem(args.calib, args.train_text, args.shrink) + ".json")) as f:
            result = json.load(f)
        result.update(report(result["rows"]))
        print(write_outputs(args.out, args.calib, args.train_text, result, args.shrink))
        return 0

    t_start = time.perf_counter()
    scan_check = check_training_scan()
    if max(scan_check.values()) > 1e-4:
        raise RuntimeError(f"the training scan disagrees with transformers' scan: {scan_check}")
    train_ids, texts, vocab, valid_sha, book_ids = load_tokens(args.train_text)
    model, meta, settings = load_or_train(args, train_ids, vocab, valid_sha)
    windows = {n: eval_windows(ids, args.seqlen, args.eval_windows if n == "wikitext2" else args.book_windows)
               for n, ids in texts.items()}
    eval_check = check_eval(model, windows, args.eval_batch)
    if eval_check > 1e-5:
        raise RuntimeError(f"the benchmark's scoring disagrees with pyprune.evaluate.perplexity: {eval_check}")
    reuse = None
    if args.reuse:
        expect = {"training": settings,
                  "data": {"train_text": args.train_text, "calib_samples": args.nsamples, "calib_seqlen": args.seqlen,
                           "calib": args.calib, "eval_seqlen": args.seqlen},
                  "seeds": seeds, "block_size": args.block_size}
        reuse = lambda dense: reused_rows(args.reuse, expect, dense)  # noqa: E731
    rows = run_grid(args, model, train_ids, book_ids, windows, seeds, reuse)

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
        "data": {"train_text": args.train_text,
                 "train_files": ["/".join(parts) for parts in TRAIN_TEXTS[args.train_text]],
                 "train_tokens": int(train_ids.numel()), "calib_samples": args.nsamples, "calib_seqlen": args.seqlen,
                 "calib": args.calib, "calib_book_unknown_fraction": float((book_ids == 0).float().mean()),
                 "eval_seqlen": args.seqlen,
                 "texts": {n: {"label": TEXTS[n][1], "path": "/".join(TEXTS[n][0]), "tokens": int(ids.numel()),
                               "unknown_fraction": float((ids == 0).float().mean()),
                               "eval_windows": int(windows[n].shape[0]),
                               "eval_unknown_fraction": float((windows[n] == 0).float().mean())}
                           for n, ids in texts.items()}},
        "settings": {"block_size": args.block_size, "device": "cpu",
                     "joint_shrink": joint_shrink,
                     "reused": args.reuse}, "eval_check": eval_check,
        "seeds": seeds,
        **report(rows),
        "rows": rows, "seconds": time.perf_counter() - t_start, "threads": args.threads,
        "host": platform.machine(), "torch": torch.__version__,
    }
    print(write_outputs(args.out, args.calib, args.train_text, result, args.shrink))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
