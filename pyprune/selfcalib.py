"""Self-generated calibration text: token windows sampled from the model itself (issue 22).

A model's own samples follow the distribution it was trained on rather than any one domain a user happens to hold, so
a Hessian built from them is not dominated by the user's calibration text. ``self_generated_samples`` is a pure
function of (model, tokenizer, nsamples, seqlen, seed): top-k / temperature sampling from the tokenizer's BOS token
(or a given start), with ``transformers``' ``generate`` running the model's own cache (KV cache, SSM state), batched.

Reproducibility: sample ``i`` draws its tokens from its own ``torch.Generator`` seeded from (seed, i), so the same
model, seed and batch size give the same ids, and the draw of a sample does not depend on how many are asked for.
(Batched forward passes may round differently at another batch size, which can flip a near-tied draw.) The end of
sequence token is never drawn: every sample is one unbroken stretch of text of ``seqlen`` tokens, start included.
"""
from __future__ import annotations

import hashlib

import torch

DEFAULT_TOP_K = 50
DEFAULT_TEMPERATURE = 1.0


def _sample_generator(seed: int, i: int) -> torch.Generator:
    """The generator of sample ``i`` under ``seed``: seeded from a hash of both (no two pairs share a stream)."""
    digest = hashlib.sha256(f"pyprune-selfcalib/{int(seed)}/{int(i)}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _start_ids(tokenizer, start) -> list[int]:
    if start is None:
        for name in ("bos_token_id", "eos_token_id"):
            tid = getattr(tokenizer, name, None)
            if tid is not None:
                return [int(tid)]
        raise ValueError("self-generated calibration: the tokenizer has neither a BOS nor an EOS token to start the "
                         "samples from; give a start text (start=...)")
    if isinstance(start, str):
        ids = tokenizer(start, add_special_tokens=False)["input_ids"]
    else:
        ids = [int(t) for t in start]
    if not ids:
        raise ValueError(f"self-generated calibration: the start {start!r} has no tokens")
    return list(ids)


class _Sampler:
    """A logits processor that draws each row's next token (top-k, temperature) with that row's own generator and
    leaves only that token possible, so ``generate``'s greedy step takes it."""

    def __init__(self, generators, top_k: int, temperature: float, bar=None):
        self.generators, self.top_k, self.temperature, self.bar = generators, top_k, temperature, bar

    def __call__(self, input_ids, scores):
        s = scores.detach().float().cpu() / self.temperature
        v, idx = torch.topk(s, min(self.top_k, s.shape[-1]), dim=-1)
        p = torch.softmax(v, dim=-1)
        p = torch.where(torch.isfinite(v), p, torch.zeros_like(p))   # a -inf score (EOS here) is never drawn
        picks = torch.stack([idx[r, torch.multinomial(p[r], 1, generator=g)[0]]
                             for r, g in enumerate(self.generators)])
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(out.shape[0], device=out.device), picks.to(out.device)] = 0.0
        if self.bar is not None:
            self.bar.update(1)
        return out


def self_generated_samples(model, tokenizer, nsamples: int, seqlen: int, seed: int = 0, *,
                           top_k: int = DEFAULT_TOP_K, temperature: float = DEFAULT_TEMPERATURE,
                           batch_size: int = 16, start=None, device=None, progress: bool = False) -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` token ids sampled from ``model`` (a ``transformers`` causal LM), as a
    (nsamples, seqlen) LongTensor on the CPU: each starts with ``start`` (a text or token ids; default the
    tokenizer's BOS token, else its EOS token) and continues with top-``top_k`` sampling at ``temperature``, the end
    of sequence token excluded. ``batch_size`` samples are generated together. The model is left as it was (eval
    mode, no gradients taken)."""
    for name, v in (("nsamples", nsamples), ("seqlen", seqlen), ("batch_size", batch_size), ("top_k", top_k)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"self-generated calibration: {name} must be a positive integer, got {v!r}")
    if not (isinstance(temperature, (int, float)) and temperature > 0 and temperature < float("inf")):
        raise ValueError(f"self-generated calibration: temperature must be a finite number > 0, got {temperature!r}")
    ids = _start_ids(tokenizer, start)
    if len(ids) >= seqlen:
        raise ValueError(f"self-generated calibration: the start has {len(ids)} tokens, not fewer than seqlen="
                         f"{seqlen}")
    from transformers import GenerationConfig, LogitsProcessorList
    if device is None:
        device = next(model.parameters()).device
    eos = getattr(tokenizer, "eos_token_id", None)
    new = seqlen - len(ids)
    gen_config = GenerationConfig(max_new_tokens=new, min_new_tokens=new if eos is not None else 0, do_sample=False,
                                  eos_token_id=eos, pad_token_id=eos if eos is not None else 0, num_beams=1)
    out = torch.empty(nsamples, seqlen, dtype=torch.long)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=new * ((nsamples + batch_size - 1) // batch_size), desc="self-generated calibration",
                   unit="step")
    was_training = model.training
    model.eval()
    try:
        for b0 in range(0, nsamples, batch_size):
            b1 = min(nsamples, b0 + batch_size)
            prompt = torch.tensor([ids] * (b1 - b0), dtype=torch.long, device=device)
            sampler = _Sampler([_sample_generator(seed, i) for i in range(b0, b1)], top_k, float(temperature), bar)
            with torch.no_grad():
                seq = model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=gen_config,
                                     logits_processor=LogitsProcessorList([sampler]))
            if seq.shape[1] != seqlen:
                raise RuntimeError(f"self-generated calibration: generate returned {seq.shape[1]} tokens, expected "
                                   f"{seqlen}")
            out[b0:b1] = seq.cpu()
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    return out
