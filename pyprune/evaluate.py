"""Perplexity of a causal LM on token windows."""
from __future__ import annotations

import math
import time

import torch


def perplexity(model, windows: torch.Tensor, *, device=None, batch_size: int = 1, progress: bool = False,
               sequential: bool = False) -> dict:
    """exp(mean next-token NLL) over every predicted token of the (k, seqlen) ``windows`` (each window is scored on
    its own, as in the GPTQ/SparseGPT evaluation). Runs on ``device`` (default: where the model's weights are).
    ``sequential`` runs the model one decoder block at a time on ``device`` (the rest stays where it is), for models
    larger than the device's memory.

    Returns {"perplexity", "nll" (mean, nats), "tokens" (predicted), "windows", "seqlen", "seconds", "window_nll"
    (the mean NLL of each window, in order: for paired comparisons of two models on the same windows)}.
    """
    if windows.dim() != 2 or windows.numel() == 0:
        raise ValueError(f"windows must be a non-empty (k, seqlen) tensor of token ids, got shape "
                         f"{tuple(windows.shape)}")
    if windows.shape[1] < 2:
        raise ValueError("windows need at least 2 tokens to score a next-token prediction")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    home = next(model.parameters()).device
    device = home if device is None else torch.device(device)
    vocab = getattr(model.config, "vocab_size", None)
    if vocab is not None and int(windows.max()) >= vocab:
        raise ValueError(f"token id {int(windows.max())} is outside the model's vocabulary of {vocab}")
    if sequential:
        return _sequential(model, windows, device, batch_size, progress)
    was_training = model.training
    model.eval()
    if device != home:
        model.to(device)
    t0 = time.perf_counter()
    sums = []
    starts = range(0, windows.shape[0], batch_size)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc="eval", unit="batch", dynamic_ncols=True)
    try:
        with torch.no_grad():
            for s in starts:
                ids = windows[s:s + batch_size].to(device)
                logits = model(input_ids=ids, use_cache=False).logits
                sums.append(_nll(logits, ids))
                del logits
    finally:
        if device != home:
            model.to(home)
        model.train(was_training)
    return _result(sums, windows, t0)


def _nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL of each window of the batch, (batch,) float64 on the CPU."""
    shift = logits[:, :-1, :].float()
    per_token = torch.nn.functional.cross_entropy(shift.reshape(-1, shift.shape[-1]), ids[:, 1:].reshape(-1),
                                                  reduction="none")
    return per_token.view(ids.shape[0], -1).sum(1).double().cpu()


def _sequential(model, windows, device, batch_size, progress) -> dict:
    from .models.capture import capture_inputs, replay_head
    from .models.discover import eager_experts, find_blocks
    from .models.driver import BlockStore, MoveNonBlock, walk_blocks
    _, blocks = find_blocks(model)
    batches = [windows[s:s + batch_size] for s in range(0, windows.shape[0], batch_size)]
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    sums = []
    try:
        with torch.no_grad(), eager_experts(model), MoveNonBlock(model, blocks, device):
            inputs = capture_inputs(model, blocks, batches, device)
            # the block loop of every run (driver.walk_blocks), with a step that changes nothing; every block
            # advances the hidden states, the last one included (last = len(blocks): the head reads its outputs)
            walk_blocks(blocks, inputs, BlockStore(blocks, device), lambda i, block, inp: [], last=len(blocks),
                        progress=progress)
            for ids, logits in zip(batches, replay_head(model, blocks, batches, inputs.hidden, device,
                                                        inputs.output_format)):
                sums.append(_nll(logits, ids.to(device)))
    finally:
        model.train(was_training)
    return _result(sums, windows, t0)


def _result(sums: list[torch.Tensor], windows: torch.Tensor, t0: float) -> dict:
    per_window = torch.cat(sums)
    predicted = windows.shape[1] - 1
    count = int(per_window.numel()) * predicted
    mean = float(per_window.sum()) / count
    return {"perplexity": math.exp(mean) if mean < 700 else float("inf"), "nll": mean, "tokens": count,
            "windows": int(windows.shape[0]), "seqlen": int(windows.shape[1]),
            "seconds": time.perf_counter() - t0, "window_nll": (per_window / predicted).tolist()}
