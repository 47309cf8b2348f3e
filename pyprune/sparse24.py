"""2:4 models at inference speed: check which linear layers hold the 2:4 pattern and swap their weights for PyTorch's
semi-structured sparse tensors (``torch.sparse.to_sparse_semi_structured``: cuSPARSELt, or CUTLASS where torch has no
cuSPARSELt), or torchao's FP8 + 2:4 weights.

::

    report = pyprune.check_2to4(model)                 # any device, pure torch: which Linear weights hold 2:4
    print(report.table())
    model = pyprune.to_semi_structured(model.cuda())   # same object back, its 2:4 Linear weights now sparse
    print(model.pyprune_sparse24.table())              # what was converted, what stayed dense and why
    model.generate(...)

The 2:4 pattern: in every row of a ``Linear`` weight (out_features, in_features), every group of 4 consecutive input
columns (0-3, 4-7, ...) holds at least 2 zeros; that is what the sparse tensor cores skip. Layers that do not hold it
stay dense and are named in the report (``strict=True`` refuses them instead).

What cannot run is refused before anything is converted, naming the layer: a weight not on a CUDA device, a GPU of
compute capability below the kernels' (8.0 for fp16/bf16, 9.0 for torchao's FP8 path), a dtype the kernels do not
take, a shape that is not a multiple of the kernels' minimum tile (read from torch's own table,
``SparseSemiStructuredTensor*._DTYPE_SHAPE_CONSTRAINTS``, for the backend in use).

Whether the sparse product is faster depends on the shape and on the number of tokens per call: published figures
show gains on prefill-sized products and little or a loss at decode. ``keep_dense`` decides per layer:
a predicate ``(name, module) -> bool``, or ``"measure"``: every distinct (out, in) shape is timed on the GPU the model
is on, dense against sparse, at each token count of ``tokens`` (default ``DEFAULT_MEASURE_TOKENS``), and a shape stays
dense unless the sparse product is no slower at every one of them. The measurements are the only thing that decides;
nothing here is keyed by model or layer name. ``benchmarks/bench_sparse24.py`` measures the same products at
Llama-2-70B shapes (results under ``benchmarks/results/gpu/``).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch

# Compute capability the kernels need: torch's semi-structured fp16/bf16 kernels (cuSPARSELt and CUTLASS) use the
# sparse tensor cores introduced with Ampere (sm_80); torchao's FP8 2:4 kernel (CUTLASS, rowwise scales) is built for
# Hopper (sm_90) only.
MIN_CAPABILITY = (8, 0)
MIN_CAPABILITY_FP8 = (9, 0)
HALF_DTYPES = (torch.float16, torch.bfloat16)
FP8 = "fp8"
BACKENDS = ("auto", "cusparselt", "cutlass")
# Token counts (rows of the activation matrix per call) that keep_dense="measure" times when ``tokens`` is not given:
# one decode step and one 2048-token prefill. A shape is converted only if sparse is no slower at both.
DEFAULT_MEASURE_TOKENS = (1, 2048)
ATTRIBUTE = "pyprune_sparse24"  # where to_semi_structured leaves its report on the model


class SemiStructuredError(RuntimeError):
    """A layer the semi-structured kernels cannot run (device, GPU generation, dtype or shape); names the layer."""


# ----------------------------------------------------------------------------------------------- the pattern
def violations_2to4(weight: torch.Tensor) -> torch.Tensor:
    """Bool (out_features, in_features // 4): True where a group of 4 consecutive input columns of a row holds fewer
    than 2 zeros. ``weight`` 2-D with in_features a multiple of 4 (ValueError otherwise); any device and dtype."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight (out_features, in_features), got "
                         f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    rows, cols = weight.shape
    if cols % 4:
        raise ValueError(f"in_features={cols} is not a multiple of 4: the weight cannot hold the 2:4 pattern")
    zeros = (weight.detach().reshape(rows, cols // 4, 4) == 0).sum(dim=-1)
    return zeros < 2


def holds_2to4(weight: torch.Tensor) -> bool:
    """True if every group of 4 consecutive input columns of every row of ``weight`` holds at least 2 zeros."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return not bool(violations_2to4(weight).any())


@dataclass(frozen=True)
class LayerCheck:
    """One ``nn.Linear`` weight: ``holds`` the 2:4 pattern or not; ``bad_groups`` of ``groups`` groups of 4 hold fewer
    than 2 zeros (``groups`` 0 when in_features is not a multiple of 4); ``reason`` says why it does not hold."""

    name: str
    shape: tuple[int, int]
    dtype: torch.dtype
    holds: bool
    bad_groups: int
    groups: int
    reason: str | None = None


def _check_weight(name: str, weight: torch.Tensor) -> LayerCheck:
    rows, cols = weight.shape
    if is_semi_structured(weight):  # converted earlier: 2:4 by construction
        return LayerCheck(name, (rows, cols), weight.dtype, True, 0, rows * cols // 4)
    if cols % 4:
        return LayerCheck(name, (rows, cols), weight.dtype, False, 0, 0,
                          f"in_features={cols} is not a multiple of 4")
    bad = violations_2to4(weight)
    nbad = int(bad.sum())
    if not nbad:
        return LayerCheck(name, (rows, cols), weight.dtype, True, 0, bad.numel())
    r, g = (int(i) for i in bad.nonzero()[0])
    return LayerCheck(name, (rows, cols), weight.dtype, False, nbad, bad.numel(),
                      f"{nbad} of {bad.numel()} groups of 4 hold fewer than 2 zeros (first: row {r}, columns "
                      f"{4 * g}-{4 * g + 3})")


def _linears(model: torch.nn.Module, layers) -> list[tuple[str, torch.nn.Linear]]:
    """The model's ``nn.Linear`` modules that ``layers`` selects: None (all), fnmatch patterns on the module name,
    or a predicate ``(name, module) -> bool``. ValueError when a pattern matches no Linear module."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if layers is None:
        return found
    if callable(layers):
        return [(n, m) for n, m in found if layers(n, m)]
    patterns = [layers] if isinstance(layers, str) else list(layers)
    if not patterns:
        raise ValueError("layers is empty: no Linear module selected")
    for p in patterns:
        if not any(fnmatch.fnmatchcase(n, p) for n, _ in found):
            raise ValueError(f"layers pattern {p!r} matches none of the model's {len(found)} Linear modules "
                             f"(e.g. {', '.join(n for n, _ in found[:3]) or 'none'})")
    return [(n, m) for n, m in found if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


@dataclass
class Report:
    """``checks``: every selected Linear weight's pattern check; ``converted``: the names of the layers whose weights
    are now semi-structured sparse tensors; ``dense``: name -> why the layer stayed dense; ``backend``: the kernels
    used (cusparselt, cutlass, torchao-fp8; None when nothing was converted); ``timings``: keep_dense="measure"'s
    measurements, (out, in) -> {tokens: (dense_s, sparse_s)}."""

    checks: list[LayerCheck]
    converted: list[str] = field(default_factory=list)
    dense: dict[str, str] = field(default_factory=dict)
    backend: str | None = None
    timings: dict = field(default_factory=dict)

    @property
    def not_2to4(self) -> list[str]:
        """Names of the selected layers whose weights do not hold the 2:4 pattern."""
        return [c.name for c in self.checks if not c.holds]

    def table(self) -> str:
        lines = [f"{'layer':<48} {'shape':>14}  {'2:4':<4} status", "-" * 90]
        for c in self.checks:
            status = ("sparse" if c.name in self.converted else
                      "dense" + (f": {self.dense[c.name]}" if c.name in self.dense else ""))
            lines.append(f"{c.name:<48} {c.shape[0]:>6}x{c.shape[1]:<7}  {'yes' if c.holds else 'no':<4} {status}")
        lines.append(f"{len(self.converted)} of {len(self.checks)} Linear layers semi-structured sparse"
                     + (f" ({self.backend})" if self.backend else ""))
        return "\n".join(lines)


def check_2to4(model: torch.nn.Module, layers=None) -> Report:
    """Which ``nn.Linear`` weights of ``model`` hold the 2:4 pattern (on whatever device they are; nothing is
    changed). ``layers``: None (all), fnmatch patterns on module names, or a predicate ``(name, module) -> bool``.
    The report's ``dense`` lists the layers that do not hold it, with the reason."""
    return _report(_linears(model, layers))


def _report(selected: list[tuple[str, torch.nn.Linear]]) -> Report:
    checks = [_check_weight(n, m.weight) for n, m in selected]
    return Report(checks, dense={c.name: f"not 2:4: {c.reason}" for c in checks if not c.holds})


# ----------------------------------------------------------------------------------------- what can run
def sparse_class(backend: str = "auto"):
    """torch's semi-structured tensor class for ``backend``: "cusparselt", "cutlass", or "auto" (cuSPARSELt where
    this torch has it, else CUTLASS)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS
    if backend == "auto":
        backend = "cusparselt" if torch.backends.cusparselt.is_available() else "cutlass"
    return SparseSemiStructuredTensorCUSPARSELT if backend == "cusparselt" else SparseSemiStructuredTensorCUTLASS


def refusal(name: str, shape: Sequence[int], dtype, device: torch.device | str,
            capability: tuple[int, int] | None, backend: str = "auto") -> str | None:
    """Why layer ``name`` (weight ``shape``, ``dtype``: a torch dtype or ``"fp8"``) cannot run on the semi-structured
    kernels on ``device`` (a GPU of compute ``capability``), or None when it can. Pure: no GPU needed to ask."""
    device = torch.device(device)
    if device.type != "cuda":
        return (f"layer {name!r}: its weight is on {device.type}; the semi-structured sparse kernels (cuSPARSELt, "
                f"CUTLASS) run on CUDA GPUs only: move the model to a GPU first (model.cuda())")
    need = MIN_CAPABILITY_FP8 if dtype == FP8 else MIN_CAPABILITY
    if capability is None or tuple(capability) < need:
        have = "unknown" if capability is None else f"{capability[0]}.{capability[1]}"
        what = "torchao's FP8 2:4 kernels need" if dtype == FP8 else "2:4 sparse tensor cores need"
        return (f"layer {name!r}: {device} has compute capability {have}; {what} {need[0]}.{need[1]} or newer "
                f"({'Hopper' if dtype == FP8 else 'Ampere'} or later)")
    rows, cols = shape
    if dtype == FP8:
        # torchao's own kernel publishes no table; torch's float8_e4m3fn minimum tile stands in for it
        cls_name = "the FP8 2:4 kernels (torch's float8_e4m3fn minimum tile)"
        table = sparse_class("cusparselt")._DTYPE_SHAPE_CONSTRAINTS
        key = torch.float8_e4m3fn
    else:
        cls = sparse_class(backend)
        cls_name, table, key = cls.__name__, cls._DTYPE_SHAPE_CONSTRAINTS, dtype
    if key not in table:
        return (f"layer {name!r}: dtype {dtype} is not taken by {cls_name} (it takes "
                f"{', '.join(str(d) for d in table)}); convert with dtype=torch.bfloat16 or torch.float16")
    c = table[key]
    if rows < c.sparse_min_rows or rows % c.sparse_min_rows or cols < c.sparse_min_cols or cols % c.sparse_min_cols:
        return (f"layer {name!r}: weight {rows}x{cols} is rejected by {cls_name} for {key}: out_features must be a "
                f"multiple of {c.sparse_min_rows} and in_features a multiple of {c.sparse_min_cols}; leave it dense "
                "(layers= or keep_dense=)")
    return None


# --------------------------------------------------------------------------------------------- measuring
def time_linear(out_features: int, in_features: int, tokens: int, dtype=torch.bfloat16, *, device="cuda",
                backend: str = "auto", reps: int = 20, generator: torch.Generator | None = None) -> tuple[float, float]:
    """Seconds per ``F.linear(x, W)`` for x (tokens, in_features) and a 2:4 W (out_features, in_features), dense and
    semi-structured sparse (median of ``reps`` CUDA-event timings after warm-up), on one GPU. Random data, W pruned
    2:4 by magnitude."""
    device = torch.device(device)
    W = magnitude_2to4(torch.randn(out_features, in_features, device=device, generator=generator).to(dtype))
    S = sparse_class(backend).from_dense(W)
    x = torch.randn(tokens, in_features, device=device, generator=generator).to(dtype)
    return _time(lambda: torch.nn.functional.linear(x, W), reps), _time(lambda: torch.nn.functional.linear(x, S), reps)


def magnitude_2to4(W: torch.Tensor) -> torch.Tensor:
    """A copy of ``W`` with the 2 smallest magnitudes of every group of 4 consecutive input columns set to zero (the
    simplest 2:4 weight, for timing; pyprune's methods choose better ones)."""
    rows, cols = W.shape
    drop = W.detach().float().abs().reshape(rows, cols // 4, 4).argsort(dim=-1)[..., :2]
    return W.detach().reshape(rows, cols // 4, 4).scatter(-1, drop, 0).reshape(rows, cols).contiguous()


def _time(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return sorted(times)[len(times) // 2]


def _measure(shapes: Iterable[tuple[int, int]], dtype, device, backend: str, tokens: Sequence[int]) -> dict:
    return {shape: {t: time_linear(shape[0], shape[1], t, dtype, device=device, backend=backend) for t in tokens}
            for shape in sorted(set(shapes))}


# ------------------------------------------------------------------------------------------------ converting
def _shared_names(model: torch.nn.Module) -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    return names


def to_semi_structured(model: torch.nn.Module, *, dtype=None, layers=None,
                       keep_dense: Callable[[str, torch.nn.Module], bool] | str | None = None,
                       tokens: Sequence[int] = DEFAULT_MEASURE_TOKENS, backend: str = "auto",
                       strict: bool = False) -> torch.nn.Module:
    """Swap the weights of ``model``'s 2:4 ``nn.Linear`` layers for semi-structured sparse tensors, in place; returns
    the same model object (usable with ``generate``), with the report (``Report``) at ``model.pyprune_sparse24``.

    dtype:      None: the layers' own dtype (float16 or bfloat16); torch.float16 / torch.bfloat16: the whole model is
                cast to it first (in place, as ``model.to(dtype)``); "fp8": torchao's FP8 dynamic activation + FP8
                2:4 weight (needs torchao, a Hopper GPU and a bfloat16 model).
    layers:     which Linear layers to consider: None (all), fnmatch patterns on module names, or a predicate.
    keep_dense: which 2:4 layers stay dense anyway: a predicate ``(name, module) -> bool``, or "measure" (time each
                distinct shape dense against sparse at every token count of ``tokens`` on this GPU; keep the shapes
                where sparse is slower at any of them dense). None: convert every 2:4 layer.
    backend:    "auto" (cuSPARSELt where torch has it, else CUTLASS), "cusparselt" or "cutlass" (fp16/bf16 only).
    strict:     a selected layer that does not hold 2:4 is an error (ValueError naming them) instead of staying dense.

    Layers whose weight is shared with another module (tied embeddings) stay dense; layers converted by an earlier
    call stay as they are and are listed as converted (so a second call converts what a keep_dense policy left).
    Every check runs before any layer is converted: on a refusal (``SemiStructuredError``: CPU, old GPU, dtype or
    shape, naming the layer) the model is unchanged."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if not (dtype is None or dtype in HALF_DTYPES or dtype in (FP8, torch.float8_e4m3fn)):
        raise ValueError(f"dtype={dtype!r}: choose None (the layers' own), torch.float16, torch.bfloat16 or 'fp8'")
    fp8 = dtype in (FP8, torch.float8_e4m3fn)
    if fp8 and backend == "cutlass":
        raise ValueError("dtype='fp8' runs torchao's own kernels; backend='cutlass' applies to fp16/bf16 only")
    if not (keep_dense is None or callable(keep_dense) or keep_dense == "measure"):
        raise ValueError(f"keep_dense={keep_dense!r}: expected None, 'measure' or a predicate (name, module) -> bool")
    tokens = tuple(int(t) for t in tokens)
    if keep_dense == "measure" and (not tokens or min(tokens) < 1):
        raise ValueError(f"tokens={tokens!r}: keep_dense='measure' needs positive token counts to time")
    if fp8 and keep_dense == "measure":
        raise ValueError("keep_dense='measure' times torch's fp16/bf16 kernels; with dtype='fp8' pass a predicate "
                         "(name, module) -> bool instead")
    if fp8:
        _torchao_fp8_config()  # before any other work: a missing torchao is the first thing to say

    selected = _linears(model, layers)
    report = _report(selected)
    if strict and report.not_2to4:
        raise ValueError(f"{len(report.not_2to4)} selected Linear layers do not hold the 2:4 pattern: "
                         + "; ".join(f"{c.name} ({c.reason})" for c in report.checks if not c.holds))
    shared = _shared_names(model)
    candidates, done = [], []  # done: converted by an earlier call
    for (name, module), check in zip(selected, report.checks):
        if not check.holds:
            continue
        if is_semi_structured(module.weight):
            done.append(name)
            continue
        others = [n for n in shared[id(module.weight)] if n != f"{name}.weight"]
        if others:
            report.dense[name] = f"weight shared with {', '.join(others)}"
            continue
        if callable(keep_dense) and keep_dense(name, module):
            report.dense[name] = "keep_dense"
            continue
        candidates.append((name, module))

    # every refusal before any change
    for name, module in candidates:
        w = module.weight
        want = FP8 if fp8 else (dtype or w.dtype)
        cap = torch.cuda.get_device_capability(w.device) if w.device.type == "cuda" else None
        why = refusal(name, tuple(w.shape), want, w.device, cap, backend)
        if why is None and fp8 and w.dtype != torch.bfloat16:
            why = f"layer {name!r}: dtype='fp8' takes a bfloat16 model (activations), got {w.dtype}: model.bfloat16()"
        if why is not None:
            raise SemiStructuredError(why)
    if dtype in HALF_DTYPES:
        model.to(dtype)
    if not candidates:
        report.converted = done
        setattr(model, ATTRIBUTE, report)
        return model
    if keep_dense == "measure":
        w0 = candidates[0][1].weight
        report.timings = _measure((tuple(m.weight.shape) for _, m in candidates), w0.dtype, w0.device, backend,
                                  tokens)
        slower = {s for s, per in report.timings.items() if any(sp > de for de, sp in per.values())}
        for name, module in list(candidates):
            if tuple(module.weight.shape) in slower:
                per = report.timings[tuple(module.weight.shape)]
                report.dense[name] = "measured slower: " + ", ".join(
                    f"{t} tokens {1e6 * de:.1f} us dense / {1e6 * sp:.1f} us sparse" for t, (de, sp) in per.items())
        candidates = [(n, m) for n, m in candidates if n not in report.dense]

    names = {n for n, _ in candidates}
    if fp8 and candidates:
        from torchao.quantization import quantize_
        quantize_(model, _torchao_fp8_config()(), filter_fn=lambda m, fqn: fqn in names)
        report.backend = "torchao-fp8"
    elif candidates:
        cls = sparse_class(backend)
        for name, module in candidates:
            with torch.no_grad():
                sparse = cls.from_dense(module.weight.detach().contiguous())
            module.weight = torch.nn.Parameter(sparse, requires_grad=False)
        report.backend = cls.BACKEND
    report.converted = [n for n, _ in selected if n in names or n in done]
    setattr(model, ATTRIBUTE, report)
    return model


def _torchao_fp8_config():
    """torchao's FP8 2:4 configuration class, or an ImportError that says what to install."""
    try:
        import torchao.quantization as tq
    except ImportError:
        raise ImportError("dtype='fp8' uses torchao's FP8 + 2:4 kernels, and torchao is not installed: pip install "
                          "torchao (0.18 keeps the FP8 2:4 path); or use dtype=torch.bfloat16") from None
    cfg = getattr(tq, "Float8DynamicActivationFloat8SemiSparseWeightConfig", None)
    if cfg is None:
        version = getattr(__import__("torchao"), "__version__", "?")
        raise ImportError(f"torchao {version} has no Float8DynamicActivationFloat8SemiSparseWeightConfig (the FP8 "
                          "2:4 path); install torchao 0.18")
    return cfg


def is_semi_structured(t: torch.Tensor) -> bool:
    """True for a torch semi-structured sparse tensor (what ``to_semi_structured`` puts in place of a weight)."""
    from torch.sparse import SparseSemiStructuredTensor
    return isinstance(t, SparseSemiStructuredTensor)


__all__ = ["ATTRIBUTE", "DEFAULT_MEASURE_TOKENS", "LayerCheck", "MIN_CAPABILITY", "MIN_CAPABILITY_FP8", "Report",
           "SemiStructuredError", "check_2to4", "holds_2to4", "is_semi_structured", "magnitude_2to4", "refusal",
           "sparse_class",
           "time_linear", "to_semi_structured", "violations_2to4"]
