"""What a model is, observed rather than looked up: its decoder blocks, the weight matrices a block's forward pass
uses as linear maps, which of them read the same input (one Hessian for them), and what stays dense.

The rules, all of them:

* **Blocks**: the ``nn.ModuleList`` of the model that holds the most parameters (the decoder layers of every causal LM
  transformers builds, whatever the attribute is called, mixed layer kinds of hybrids included).
* **Weight matrices**: while a block runs, every ``F.linear(x, W)``, ``x @ W``, ``W @ x``, ``torch.mm`` and
  ``torch.addmm`` whose ``W`` is a parameter of the block, or a view of one, is seen with its input ``x``
  (``MatrixObserver``). The matrix is that view of the parameter, in the layout the forward used it in:

  - the weight of an ``nn.Linear`` (or subclass) or of GPT-2's ``Conv1D`` module: pruned;
  - a part of a larger parameter (a fused 3-D expert tensor ``experts.gate_up_proj[e]``, in either layout): pruned,
    one matrix per expert, each with its own Hessian from the tokens routed to it;
  - any other parameter used whole as a linear map (MoE routers such as ``TopKRouter.weight``): **dense**;
  - routers and gates, found by what the forward does with their output (``MatrixObserver.routers``), never by their
    width: a matrix whose output, through shape-keeping elementwise steps (softmax, sigmoid, a bias, a cast, a view),
    reaches a choice (``topk``, ``sort``, ``argsort``, ``argmax``/``argmin``, ``max``/``min`` over a dimension,
    ``kthvalue``) chooses experts: a router; one whose output so derived is broadcast over another matrix's output
    in a product (``sigmoid(shared_expert_gate(x)) * shared_expert(x)``) is a gate: both **dense**.

  Everything else stays dense because it is never a linear map's weight: embeddings and the LM head (outside the
  blocks), norms, biases, convolutions (Mamba's ``conv1d``) and state-space parameters (``A_log``, ``D``,
  ``dt_bias``).
* **Shared Hessians**: matrices that read the same input tensor in the same forward pass (q/k/v, gate/up, the ``w1``
  and ``w3`` of one expert) share one Hessian.
* **Shared weights**: a parameter used by several blocks (Zamba's shared attention) is pruned once, in the first block
  that uses it.

Fused expert modules run their per-expert ("eager") implementation while a block is observed (``eager_experts``),
so that every expert's matrix is a visible linear map.
"""
from __future__ import annotations

import contextlib
import inspect
import weakref
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode

F = torch.nn.functional


class UnsupportedModelError(ValueError):
    """The model has no decoder blocks pyprune can find, or a block whose weights it cannot see."""


# ------------------------------------------------------------------------------------------------------- blocks
def find_blocks(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The dotted path and the ``nn.ModuleList`` of the model's decoder blocks: the list holding the most parameters
    (counting a parameter shared between blocks once). Raises ``UnsupportedModelError`` naming the model class when
    there is none."""
    best, best_count = None, 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) == 0:
            continue
        count = sum(p.numel() for p in module.parameters())
        if count > best_count:
            best, best_count = (name, module), count
    if best is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no nn.ModuleList of decoder blocks; pyprune prunes "
                                    "causal LMs whose forward runs a list of blocks")
    return best


# ---------------------------------------------------------------------------------------------------- matrices
@dataclass(frozen=True)
class Site:
    """One prunable weight matrix: a view of a block parameter, as a forward pass used it.

    param:      the parameter's name relative to the block (``self_attn.q_proj.weight``);
    offset, shape, stride: the view (``torch.as_strided`` of the parameter);
    transposed: the view is (in_features, out_features) (``x @ W``, GPT-2's Conv1D); the matrix pyprune prunes is
                always (out_features, in_features);
    expert:     the index of the matrix inside a fused expert parameter, else None.
    """

    param: str
    offset: int
    shape: tuple[int, int]
    stride: tuple[int, int]
    transposed: bool
    expert: int | None = None

    def stacked_in(self, p: torch.Tensor) -> int:
        """How many matrices of this view's shape the parameter ``p`` holds (a fused expert parameter, in any
        layout: (E, out, in), (E, in, out) or DBRX's 2-D (E * ffn, hidden), whose first dimension is not the count)."""
        return p.numel() // (self.shape[0] * self.shape[1])

    @property
    def name(self) -> str:
        """``q_proj`` style module names for a module's own weight, ``experts.down_proj[3]`` for expert matrices."""
        if self.expert is not None:
            return f"{self.param}[{self.expert}]"
        return self.param[:-len(".weight")] if self.param.endswith(".weight") else self.param

    @property
    def out_in(self) -> tuple[int, int]:
        return (self.shape[1], self.shape[0]) if self.transposed else self.shape

    def view(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """The matrix as (out_features, in_features), a view into the parameter (writes go to the model)."""
        p = params[self.param]
        v = p.data.as_strided(self.shape, self.stride, p.data.storage_offset() + self.offset)
        return v.t() if self.transposed else v


@dataclass
class BlockMatrices:
    """What one observed block holds: its prunable matrices grouped by shared input, in forward order, and its dense
    weight-like parameters with the reason they stay dense."""

    groups: list[tuple[Site, ...]] = field(default_factory=list)
    dense: dict[str, str] = field(default_factory=dict)   # parameter or matrix name -> why it stays dense
    experts: int = 0                                       # experts in the block (0: not a MoE block)
    kept: dict[str, Site] = field(default_factory=dict)   # the dense matrices by name, as the forward used them

    @property
    def sites(self) -> list[Site]:
        return [s for g in self.groups for s in g]


_LINEAR_FUNCS = {F.linear}
_RIGHT_FUNCS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm}
_ADDMM_FUNCS = {torch.addmm, torch.Tensor.addmm}
_BMM_FUNCS = {torch.bmm, torch.Tensor.bmm}
_COPY_FUNCS = {torch.Tensor.to, torch.Tensor.float, torch.Tensor.half, torch.Tensor.bfloat16, torch.Tensor.type,
               torch.Tensor.contiguous, torch.Tensor.clone}
# what a router's output is used for: choosing (the indices of the largest), and the multiplications a gate scales by
_CHOOSE_FUNCS = {torch.topk, torch.Tensor.topk, torch.sort, torch.Tensor.sort, torch.argsort, torch.Tensor.argsort,
                 torch.argmax, torch.Tensor.argmax, torch.argmin, torch.Tensor.argmin, torch.kthvalue,
                 torch.Tensor.kthvalue}
_MAX_FUNCS = {torch.max, torch.Tensor.max, torch.min, torch.Tensor.min}  # choices only when given a dimension
_MUL_FUNCS = {torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__}
# products that mix a tensor's elements with others (attention scores, a second linear map): a router's output does
# not reach a choice through them, whatever the shapes (q @ k^T has as many elements as q when seqlen = head_dim)
_MIXING_FUNCS = (_LINEAR_FUNCS | _RIGHT_FUNCS | _ADDMM_FUNCS | _BMM_FUNCS
                 | {torch.Tensor.__rmatmul__, torch.einsum, torch.baddbmm, torch.Tensor.baddbmm, torch.tensordot,
                    F.scaled_dot_product_attention, F.conv1d, F.conv2d, torch.conv1d, torch.conv2d})


def _is_linear_module(module) -> bool:
    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"


class MatrixObserver(TorchFunctionMode):
    """A ``TorchFunctionMode`` that sees every linear use of a block parameter during a forward pass.

    ``params``: the block's parameters by name (``block.named_parameters()``). After the forward, ``events`` lists
    ``(site, x2d)`` in call order: the matrix and its input as (tokens, in_features). Views and dtype casts of a
    parameter are followed (``P[e]``, ``P.t()``, ``P.to(bf16)``): their results are tracked as parts of ``P``.
    """

    def __init__(self, params: dict[str, torch.Tensor]):
        super().__init__()
        self.by_id = {id(p): (name, p) for name, p in params.items() if p.dim() >= 2}
        self.derived: dict[int, tuple] = {}  # id(copy) -> (param name, param, the view it copies, copy)
        self.events: list[tuple[Site, torch.Tensor]] = []
        self.enabled = True
        # tensors derived from a matrix's output by shape-keeping steps: id -> (weak reference, the matrices)
        self.tags: dict[int, tuple[weakref.ref, frozenset]] = {}
        self.routers: dict[Site, str] = {}  # matrices whose output chooses experts or gates a tensor: why

    def clear(self) -> None:
        """Forget one forward pass's inputs and derived tensors (the routers found are kept)."""
        self.events.clear()
        self.derived.clear()
        self.tags.clear()

    def _tags_of(self, t) -> frozenset:
        if not isinstance(t, torch.Tensor):
            return frozenset()
        hit = self.tags.get(id(t))
        return hit[1] if hit is not None and hit[0]() is t else frozenset()

    def _tag(self, t, sites: frozenset) -> None:
        if isinstance(t, torch.Tensor) and sites:
            try:
                self.tags[id(t)] = (weakref.ref(t), sites | self._tags_of(t))
            except TypeError:  # a tensor type without weak references: not followed
                pass

    def _follow(self, func, args, kwargs, out, site) -> None:
        """Routers by use: tag a matrix's output; carry the tags through steps that keep the number of elements (an
        activation, a bias, a cast, a view), never through a product that mixes elements (``_MIXING_FUNCS``); a
        tagged tensor that reaches a choice makes its matrices routers, one broadcast over another matrix's output in
        a product makes them gates."""
        if site is not None:
            if site.expert is None:
                self._tag(out, frozenset((site,)))
            return
        if func in _MIXING_FUNCS:
            return
        operands = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        tagged = [(a, self._tags_of(a)) for a in operands]
        tagged = [(a, t) for a, t in tagged if t]
        if not tagged:
            return
        if func in _CHOOSE_FUNCS or (func in _MAX_FUNCS and (len(args) > 1 or "dim" in kwargs)):
            for a, t in tagged[:1]:
                for s in t:
                    self.routers.setdefault(s, f"router: its output chooses experts ({func.__name__})")
            return
        result = out if isinstance(out, torch.Tensor) else None
        if result is None:
            return
        if func in _MUL_FUNCS:  # gate(x) * other_matrix(x), the gate broadcast over the other's output
            full = frozenset().union(*(t for a, t in tagged if a.numel() == result.numel()))
            for a, t in tagged:
                if a.numel() < result.numel() and full - t:
                    for s in t:
                        self.routers.setdefault(s, "gate: its output scales another matrix's output")
        same = frozenset().union(*(t for a, t in tagged if a.numel() == result.numel()))
        self._tag(result, same)

    def _origin(self, t):
        """(param name, param, view of the param with t's layout) when ``t`` is a parameter, a view of one, or a cast
        of such a view; else None."""
        if not isinstance(t, torch.Tensor):
            return None
        hit = self.by_id.get(id(t))
        if hit is not None:
            return hit[0], hit[1], t
        d = self.derived.get(id(t))
        if d is not None and d[3] is t:
            return d[:3]
        base = t._base
        if base is not None:
            hit = self.by_id.get(id(base))
            if hit is not None:
                return hit[0], hit[1], t
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self.enabled:
            return out
        if func in _COPY_FUNCS and args and isinstance(out, torch.Tensor):
            src = self._origin(args[0])
            if src is not None and out._base is not src[1] and out is not src[1] and out.shape == src[2].shape:
                self.derived[id(out)] = (*src, out)  # a cast or copy of the view: remember which view
                return out
        site = None
        if func in _LINEAR_FUNCS:
            x = args[0] if args else kwargs.get("input")
            w = args[1] if len(args) > 1 else kwargs.get("weight")
            site = self._see(w, x, transposed=False)
        elif func in _RIGHT_FUNCS and not self._batched_param(args):
            a, b = (args[0], args[1]) if len(args) > 1 else (args[0], kwargs.get("other", kwargs.get("mat2")))
            if self._origin(b) is not None and b.dim() == 2:
                site = self._see(b, a, transposed=True)
            elif self._origin(a) is not None and a.dim() == 2 and isinstance(b, torch.Tensor):
                site = self._see(a, b.transpose(-1, -2), transposed=False)
        elif func is torch.Tensor.__rmatmul__:
            b, a = args[0], args[1]
            if self._origin(b) is not None and b.dim() == 2:
                site = self._see(b, a, transposed=True)
        elif func in _BMM_FUNCS or func in _RIGHT_FUNCS:
            a, b = args[0], args[1]
            if self._origin(b) is not None and b.dim() == 3 and isinstance(a, torch.Tensor) and a.dim() == 3:
                # every expert's matrix applied to its own slice of a batched input (Llama-4's experts): rows that
                # are all zero are tokens the router did not send to that expert (their score is 0)
                for e in range(b.shape[0]):
                    x = a[e]
                    self._see(b[e], x[x.abs().sum(-1) != 0], transposed=True)
        elif func in _ADDMM_FUNCS:
            a, b = args[1], args[2]
            if self._origin(b) is not None and b.dim() == 2:
                site = self._see(b, a, transposed=True)
        self._follow(func, args, kwargs, out, site)
        return out

    def _batched_param(self, args) -> bool:
        """``x @ P`` with P a 3-D parameter (or view): one matrix per expert."""
        return (len(args) > 1 and isinstance(args[1], torch.Tensor) and args[1].dim() == 3
                and self._origin(args[1]) is not None)

    def _see(self, w, x, transposed: bool) -> Site | None:
        origin = self._origin(w)
        if origin is None or not isinstance(x, torch.Tensor) or w.dim() != 2:
            return None
        name, p, view = origin
        if view.dim() != 2 or view.shape != w.shape:
            return None
        if view.data_ptr() != 0 or p.data_ptr() != 0:
            offset = (view.data_ptr() - p.data_ptr()) // p.element_size()
        else:  # meta tensors: no addresses, but offsets are kept
            offset = view.storage_offset() - p.storage_offset()
        shape, stride = tuple(view.shape), tuple(view.stride())
        if stride[0] < stride[1]:  # a transposed view (W.t()): store the contiguous layout and flip the meaning
            shape, stride, transposed = (shape[1], shape[0]), (stride[1], stride[0]), not transposed
        expert = None
        if view.numel() < p.numel():
            expert = offset // (shape[0] * shape[1]) if offset % (shape[0] * shape[1]) == 0 else None
            if expert is None:
                raise UnsupportedModelError(f"{name}: a linear map reads a part of the parameter that is not a whole "
                                     f"matrix of it (offset {offset}, shape {shape}); pyprune cannot prune it")
        site = Site(name, int(offset), shape, stride, transposed, expert)
        # (on the meta device the input itself, not a detached alias: its identity is what ``input_key`` compares)
        self.events.append((site, (x if x.device.type == "meta" else x.detach()).reshape(-1, x.shape[-1])))
        return site


class PrunedParams:
    """Parameters already pruned in an earlier block, by identity. Weak references: a streamed block's parameters are
    freed after its turn, and a new tensor may then reuse a freed one's ``id``."""

    def __init__(self):
        self._refs: dict[int, tuple[weakref.ref, str]] = {}

    def add(self, p: torch.Tensor, where: str) -> None:
        if self.where(p) is None:
            self._refs[id(p)] = (weakref.ref(p), where)

    def where(self, p: torch.Tensor) -> str | None:
        hit = self._refs.get(id(p))
        return hit[1] if hit is not None and hit[0]() is p else None


def input_key(x: torch.Tensor):
    """Identity of an input tensor within one forward pass: its memory and layout. Empty tensors share their address
    (the inputs of all the experts no token reached in a batch): the object itself; meta tensors have none: the
    tensor they view and their place in it."""
    if x.numel() == 0:
        return ("id", id(x))
    if x.device.type == "meta":  # the tensor it is a view of (kept alive by the view), and where in it
        root = x
        while root._base is not None:
            root = root._base
        return ("meta", id(root), x.storage_offset(), tuple(x.shape), tuple(x.stride()), x.dtype)
    return (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype)


def classify(block: torch.nn.Module, events: list[tuple[Site, torch.Tensor]],
             shared: PrunedParams | None = None, routers: dict[Site, str] | None = None) -> BlockMatrices:
    """Turn the observed linear uses of one forward pass into prunable groups and dense entries (the rules of the
    module docstring). ``shared``: the parameters already pruned in an earlier block; ``routers``: the matrices the
    observer saw choose experts or gate a tensor (``MatrixObserver.routers``), with why."""
    routers = routers or {}
    owner = {}
    for mname, module in block.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            owner[f"{mname}.{pname}" if mname else pname] = module
    params = dict(block.named_parameters())
    experts = max((s.stacked_in(params[s.param]) for s, _ in events if s.expert is not None), default=0)
    result = BlockMatrices(experts=experts)
    by_input: dict = {}
    order: list = []
    seen: set[Site] = set()
    for site, x in events:
        if site in seen:
            continue
        seen.add(site)
        module = owner.get(site.param)
        p = params[site.param]
        where = shared.where(p) if shared is not None else None
        why = None
        if where is not None:
            why = f"shared with {where}, pruned there"
        elif site.expert is None and site in routers:
            why = routers[site]
        elif site.expert is None and (module is None or not _is_linear_module(module)
                                      or not site.param.endswith("weight")):
            why = "not a linear module's weight"
        if why is not None:
            result.dense[site.name] = why
            result.kept[site.name] = site
            continue
        key = input_key(x)
        if key not in by_input:
            by_input[key] = []
            order.append(key)
        by_input[key].append(site)
    result.groups = [tuple(by_input[k]) for k in order]
    return result


@contextlib.contextmanager
def eager_experts(model: torch.nn.Module):
    """Run fused expert modules with their per-expert implementation (each expert a visible linear map) and restore
    the configured one afterwards."""
    configs = {}
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and hasattr(cfg, "_experts_implementation") and id(cfg) not in configs:
            configs[id(cfg)] = (cfg, cfg._experts_implementation)
    try:
        for cfg, impl in configs.values():
            if impl not in (None, "eager"):
                cfg._experts_implementation = "eager"
        yield
    finally:
        for cfg, impl in configs.values():
            if cfg._experts_implementation != impl:
                cfg._experts_implementation = impl


def expert_modules(block: torch.nn.Module) -> list[tuple[str, torch.nn.Module, int]]:
    """Modules of the block that own fused expert parameters (a parameter of 3 or more dimensions that stacks
    matrices: its last two dimensions both above 1; RWKV's (1, 1, hidden) time-mix vectors stack none): (name,
    module, number of experts)."""
    out = []
    for name, module in block.named_modules():
        ps = [p for p in module.parameters(recurse=False) if p.dim() >= 3 and min(p.shape[-2:]) > 1]
        if ps:
            out.append((name, module, int(ps[0].shape[0])))
    return out


def routed_expert_count(observer: "MatrixObserver") -> int | None:
    """The number of experts the block's routers chose from: the output width of the last matrix seen choosing
    experts (None when none was seen)."""
    widths = [site.out_in[0] for site, why in observer.routers.items() if why.startswith("router:")]
    return widths[-1] if widths else None


def _experts_call(hidden, index) -> bool:
    """Whether a call's first two arguments are an experts call's: hidden states and, per token, the indices of its
    chosen experts (an integer (tokens, k) tensor, one row per hidden-state row)."""
    return (isinstance(hidden, torch.Tensor) and hidden.is_floating_point() and hidden.dim() >= 2
            and isinstance(index, torch.Tensor) and index.dim() == 2 and not index.is_floating_point()
            and index.dtype != torch.bool and index.shape[0] == hidden.numel() // max(1, hidden.shape[-1]))


@contextlib.contextmanager
def all_experts_statistics(block: torch.nn.Module, observer: MatrixObserver):
    """Calibrate every expert on every token: a module of the block called as experts are, ``experts(hidden_states,
    chosen_indices, weights, ...)`` with an integer (tokens, k) index tensor, is called once more with every token
    routed to every expert (weights 1) while the observer records, and then with the router's own choice while it
    does not, so the block's outputs stay exactly the routed ones. The number of experts: the stack of its fused
    parameter (``expert_modules``), else the width of the router's output that chose them (``routed_expert_count``;
    DBRX keeps its experts as 2-D stacks in a child module). A module with a stacked parameter called otherwise is an
    error; any other module with three or more arguments passes its calls through. Experts modules called with the
    hidden states alone (Llama-4) already run every expert on every token, scaled by its router score."""
    stacked = {name: count for name, _, count in expert_modules(block)}
    patched = []
    for name, module in block.named_modules():
        if not name:
            continue  # the block itself
        original = module.forward
        sig = inspect.signature(original)
        params = list(sig.parameters)
        if len(params) < 3 or any(sig.parameters[p].kind in (inspect.Parameter.VAR_POSITIONAL,
                                                               inspect.Parameter.VAR_KEYWORD) for p in params[:3]):
            continue  # not the experts call (Llama-4's experts take the hidden states alone)

        def forward(*args, _orig=original, _sig=sig, _params=params, _name=name, _mod=module,
                    _count=stacked.get(name), **kwargs):
            bound = _sig.bind(*args, **kwargs)
            hidden, index, weights = (bound.arguments.get(p) for p in _params[:3])
            if not _experts_call(hidden, index):
                if _count is not None:
                    raise UnsupportedModelError(
                        f"{_name} ({type(_mod).__name__}): calibrate_all_experts needs the experts call "
                        "experts(hidden_states, top_k_index, top_k_weights) of transformers 5")
                return _orig(*args, **kwargs)
            count = _count if _count is not None else routed_expert_count(observer)
            if count is None:
                raise UnsupportedModelError(f"{_name} ({type(_mod).__name__}): calibrate_all_experts cannot tell how "
                                            "many experts it holds (no fused parameter, no router seen)")
            tokens = index.shape[0]
            bound.arguments[_params[1]] = torch.arange(count, device=index.device, dtype=index.dtype).expand(
                tokens, count)
            bound.arguments[_params[2]] = torch.ones(
                tokens, count, device=hidden.device,
                dtype=weights.dtype if isinstance(weights, torch.Tensor) else hidden.dtype)
            was = observer.enabled
            _orig(*bound.args, **bound.kwargs)  # every expert on every token: recorded
            observer.enabled = False             # the router's own choice: the output, not recorded
            try:
                return _orig(*args, **kwargs)
            finally:
                observer.enabled = was

        module.forward = forward
        patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward
