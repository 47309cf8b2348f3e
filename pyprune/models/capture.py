"""Each block's own inputs, seen in the model's own forward pass.

A model hands its blocks more than the hidden states: attention masks (a different one for sliding-window layers),
rotary tables (a different one per layer type in Gemma-3), cache positions, the embeddings themselves (Zamba).
``capture_inputs`` runs the model's forward once per calibration batch with every block replaced by a pass-through
that records its arguments and returns its input unchanged, so no block weight is needed (the blocks may be on the
meta device) and every block's arguments are exactly the model's. The pruning loop then feeds block ``i`` the
previous (pruned) block's outputs with block ``i``'s own arguments (``run_block``).

``replay_head`` is the other half for a block-by-block evaluation: the model's own forward with pass-through blocks
and the last block's outputs put in place, so everything after the blocks (final norm, logit soft-capping, LM head)
is the model's own code.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field

import torch


class _StopForward(Exception):
    """Ends the capture pass after the last block has recorded its arguments."""


class _WrongFormat(Exception):
    """A pass-through returned its input in a form the model's loop did not expect."""


@dataclass
class Call:
    """The arguments the model passes one block for one batch, without the hidden states: ``args`` follow the hidden
    states positionally; ``kwargs``; ``hidden_kw`` names the keyword the hidden states came by (None: positional)."""

    args: tuple
    kwargs: dict
    hidden_kw: str | None = None


@dataclass
class BlockInputs:
    """hidden: per calibration batch, the hidden states entering the current block. calls[i][b]: block i's arguments
    for batch b (equal ones share one object, so a mask is stored once). output_format: how the model's loop takes a
    block's output: 0 a tensor, k > 0 a tuple of k items (hidden states first; Bamba unpacks two)."""

    hidden: list[torch.Tensor]
    calls: list[list[Call]] = field(default_factory=list)
    output_format: int = 0

    @property
    def tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)


def _same(a, b) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and a.device == b.device
                and (a.device.type == "meta" or bool(torch.equal(a, b))))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, Call) and isinstance(b, Call):
        return a.hidden_kw == b.hidden_kw and _same(a.args, b.args) and _same(a.kwargs, b.kwargs)
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - objects without a usable ==
        return False


def _hidden_name(block: torch.nn.Module) -> str:
    params = list(inspect.signature(block.forward).parameters)
    return params[0] if params else "hidden_states"


def _split(block, args: tuple, kwargs: dict, name: str) -> tuple[torch.Tensor, Call]:
    if args:
        return args[0], Call(tuple(args[1:]), dict(kwargs))
    kwargs = dict(kwargs)
    if name not in kwargs:
        raise RuntimeError(f"{type(block).__name__} was called without its hidden states ({name!r})")
    return kwargs.pop(name), Call((), kwargs, name)


@contextlib.contextmanager
def _pass_through(blocks, record, output_format: int, stop_after: int | None, replace: dict | None = None):
    """Every block's forward records its call and returns its input (or ``replace[i]``) unchanged."""
    names = [_hidden_name(b) for b in blocks]

    def make(i):
        def forward(*args, **kwargs):
            hidden, call = _split(blocks[i], args, kwargs, names[i])
            record(i, hidden, call)
            if stop_after is not None and i >= stop_after:
                raise _StopForward
            out = replace.get(i, hidden) if replace else hidden
            return (out,) + (None,) * (output_format - 1) if output_format else out
        return forward

    for i, block in enumerate(blocks):
        block.forward = make(i)
    try:
        yield
    finally:
        for block in blocks:
            del block.forward


def capture_inputs(model, blocks: torch.nn.ModuleList, batches: list[torch.Tensor], device) -> BlockInputs:
    """Run the model on every batch with pass-through blocks; return the hidden states entering block 0 and every
    block's own arguments. The parameters outside the blocks must be on ``device``."""
    first_error = None
    for output_format in OUTPUT_FORMATS:
        try:
            return _capture(model, blocks, batches, device, output_format)
        except (_WrongFormat, ValueError, TypeError) as e:  # e.g. "not enough values to unpack"
            first_error = first_error or e
    if isinstance(first_error, _WrongFormat):
        raise RuntimeError(f"the forward pass of {type(model).__name__} does not hand each block's output to the "
                           f"next block as pyprune expects ({first_error})")
    raise first_error


OUTPUT_FORMATS = (0, 1, 2, 3)  # a tensor, or a tuple of 1-3 items: the forms the model loops of transformers take


def _capture(model, blocks, batches, device, output_format: int) -> BlockInputs:
    inputs = BlockInputs([], [[] for _ in blocks], output_format)
    current: dict[int, torch.Tensor] = {}

    def record(i, hidden, call):
        if not isinstance(hidden, torch.Tensor):
            raise _WrongFormat(f"block {i} received a {type(hidden).__name__} as its hidden states")
        if i == 0:
            current[0] = hidden
        elif hidden.shape != current[0].shape:
            raise _WrongFormat(f"block {i} received hidden states of shape {tuple(hidden.shape)}, block 0 "
                               f"{tuple(current[0].shape)}")
        seen = inputs.calls[i]
        if seen and _same(seen[-1], call):
            call = seen[-1]
        elif i > 0 and len(inputs.calls[i - 1]) > len(seen) and _same(inputs.calls[i - 1][-1], call):
            call = inputs.calls[i - 1][-1]
        seen.append(call)

    with torch.no_grad(), _pass_through(blocks, record, output_format, stop_after=len(blocks) - 1):
        for ids in batches:
            current.clear()
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _StopForward:
                pass
            else:
                raise RuntimeError(f"the forward pass of {type(model).__name__} did not reach its last decoder "
                                   "block")
            inputs.hidden.append(current[0])
    return inputs


def run_block(block: torch.nn.Module, hidden: torch.Tensor, call: Call) -> torch.Tensor:
    """The block's output hidden states for one batch, called with its own recorded arguments."""
    if call.hidden_kw is None:
        out = block(hidden, *call.args, **call.kwargs)
    else:
        out = block(*call.args, **{call.hidden_kw: hidden}, **call.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def run_block_all(block: torch.nn.Module, inputs: BlockInputs, index: int) -> list[torch.Tensor]:
    """``run_block`` over every calibration batch of ``inputs`` for block ``index``."""
    with torch.no_grad():
        return [run_block(block, h, c) for h, c in zip(inputs.hidden, inputs.calls[index])]


def replay_head(model, blocks: torch.nn.ModuleList, batches: list[torch.Tensor], final: list[torch.Tensor], device,
                output_format: int) -> list[torch.Tensor]:
    """The model's logits for every batch, given the last block's outputs ``final`` (computed block by block): its
    own forward runs with pass-through blocks and the last one returning ``final``."""
    out = []
    last = len(blocks) - 1
    with torch.no_grad():
        for ids, h in zip(batches, final):
            with _pass_through(blocks, lambda *a: None, output_format, stop_after=None, replace={last: h}):
                out.append(model(input_ids=ids.to(device), use_cache=False).logits)
    return out
