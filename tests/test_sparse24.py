"""pyprune.sparse24: the 2:4 pattern check (pure torch, any device), the refusals (CPU here must raise a clear error
naming the layer), and on a GPU of compute capability >= 8.0 the conversion itself (skipped elsewhere)."""
import pytest
import torch

import pyprune
from pyprune import sparse24
from pyprune.sparse24 import SemiStructuredError
from tests.models.tiny import calibration, tiny_model

CUDA_24 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= sparse24.MIN_CAPABILITY
needs_gpu = pytest.mark.skipif(not CUDA_24, reason="semi-structured sparse kernels need a CUDA GPU of compute "
                               "capability >= 8.0")


def prune_24(W: torch.Tensor) -> torch.Tensor:
    return pyprune.prune_layer(W, None, pyprune.PruneConfig(method="magnitude", sparsity="2:4")).weight


def groups_below_two_zeros(W: torch.Tensor) -> list[tuple[int, int]]:
    """The reference: a plain loop over rows and groups of 4."""
    out = []
    for r in range(W.shape[0]):
        for g in range(W.shape[1] // 4):
            if sum(float(v) == 0.0 for v in W[r, 4 * g:4 * g + 4]) < 2:
                out.append((r, g))
    return out


def test_violations_match_a_loop(rng):
    W = torch.randn(7, 24, generator=rng, dtype=torch.float64)
    W[torch.rand(7, 24, generator=rng) < 0.45] = 0  # a mix of groups with 0-4 zeros
    bad = sparse24.violations_2to4(W)
    assert bad.shape == (7, 6)
    assert [tuple(i) for i in bad.nonzero().tolist()] == groups_below_two_zeros(W)
    assert sparse24.holds_2to4(W) == (not groups_below_two_zeros(W))


def test_pattern_of_a_pruned_weight(rng):
    W = prune_24(torch.randn(16, 32, generator=rng))
    assert sparse24.holds_2to4(W)
    assert sparse24.holds_2to4(W.to(torch.bfloat16))
    W[3, 8:12] = torch.tensor([0.0, 1.0, 2.0, 3.0])  # one zero only in row 3, columns 8-11
    assert not sparse24.holds_2to4(W)
    check = sparse24._check_weight("x", W)
    assert not check.holds and check.bad_groups == 1 and check.groups == 16 * 8
    assert "row 3, columns 8-11" in check.reason
    assert not sparse24.holds_2to4(torch.zeros(4, 6))  # in_features not a multiple of 4
    with pytest.raises(ValueError, match="multiple of 4"):
        sparse24.violations_2to4(torch.zeros(4, 6))


def pruned_tiny(rng, dtype=torch.float32):
    model = tiny_model("llama", rng, dtype=dtype)
    pyprune.prune_model(model, calibration(rng, 2, 8), pyprune.PruneConfig(method="sparsegpt", sparsity="2:4"))
    return model


def test_check_names_what_does_not_hold(rng):
    model = pruned_tiny(rng)
    report = pyprune.check_2to4(model)
    blocks = [c.name for c in report.checks if c.name.startswith("model.layers.")]
    assert len(blocks) == 2 * 7 and all(c.holds for c in report.checks if c.name in blocks)
    assert report.not_2to4 == ["lm_head"]  # dense, and named
    assert "lm_head" in report.dense and "groups of 4" in report.dense["lm_head"]
    assert "lm_head" in report.table()
    only = pyprune.check_2to4(model, layers="*.mlp.*")
    assert {c.name.rsplit(".", 1)[1] for c in only.checks} == {"gate_proj", "up_proj", "down_proj"}
    with pytest.raises(ValueError, match="matches none"):
        pyprune.check_2to4(model, layers="*.nonexistent")


def test_cpu_is_refused_naming_the_layer_and_nothing_changes(rng):
    model = pruned_tiny(rng, torch.bfloat16)
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(SemiStructuredError, match=r"'model\.layers\.0\.self_attn\.q_proj'.*on cpu.*CUDA"):
        pyprune.to_semi_structured(model)
    for n, p in model.named_parameters():
        assert type(p.data) is torch.Tensor and torch.equal(p, before[n])
    with pytest.raises(ValueError, match="do not hold the 2:4 pattern: lm_head"):
        pyprune.to_semi_structured(model, strict=True)
    # every block layer left dense by the predicate: nothing to convert, the same object back with its report
    out = pyprune.to_semi_structured(model, keep_dense=lambda name, module: True)
    assert out is model and model.pyprune_sparse24.converted == []
    assert model.pyprune_sparse24.dense["model.layers.1.mlp.down_proj"] == "keep_dense"


def test_bad_options():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    with pytest.raises(ValueError, match="dtype"):
        pyprune.to_semi_structured(model, dtype=torch.float32)
    with pytest.raises(ValueError, match="backend"):
        pyprune.to_semi_structured(model, backend="cublas")
    with pytest.raises(ValueError, match="keep_dense"):
        pyprune.to_semi_structured(model, keep_dense="fastest")
    with pytest.raises(ValueError, match="tokens"):
        pyprune.to_semi_structured(model, keep_dense="measure", tokens=())


@pytest.mark.skipif(__import__("importlib").util.find_spec("torchao") is not None, reason="torchao is installed")
def test_fp8_without_torchao_says_what_to_install():
    with pytest.raises(ImportError, match="torchao"):
        pyprune.to_semi_structured(torch.nn.Sequential(torch.nn.Linear(8, 8)), dtype="fp8")


def test_tied_weight_stays_dense():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(32, 32, bias=False)
            self.b = torch.nn.Linear(32, 32, bias=False)
            self.b.weight = self.a.weight

    m = Tied()
    with torch.no_grad():
        m.a.weight.copy_(prune_24(m.a.weight))
    out = pyprune.to_semi_structured(m)  # CPU, but nothing is converted: no refusal
    assert out is m
    assert m.pyprune_sparse24.dense == {"a": "weight shared with b.weight", "b": "weight shared with a.weight"}


def test_refusals_without_a_gpu():
    name = "model.layers.3.mlp.up_proj"
    assert "CUDA GPUs only" in sparse24.refusal(name, (64, 64), torch.bfloat16, "cpu", None)
    old = sparse24.refusal(name, (64, 64), torch.bfloat16, "cuda:0", (7, 5))
    assert name in old and "7.5" in old and "8.0" in old
    fp8_ada = sparse24.refusal(name, (64, 64), "fp8", "cuda", (8, 9))
    assert "9.0" in fp8_ada and "8.9" in fp8_ada
    for backend in ("cusparselt", "cutlass"):
        c = sparse24.sparse_class(backend)._DTYPE_SHAPE_CONSTRAINTS[torch.bfloat16]
        rows, cols = 4 * c.sparse_min_rows, 4 * c.sparse_min_cols
        assert sparse24.refusal(name, (rows, cols), torch.bfloat16, "cuda", (9, 0), backend) is None
        for shape in ((rows + c.sparse_min_rows // 2, cols), (rows, cols + c.sparse_min_cols // 2),
                      (c.sparse_min_rows // 2, cols)):
            why = sparse24.refusal(name, shape, torch.bfloat16, "cuda", (8, 0), backend)
            assert name in why and f"multiple of {c.sparse_min_rows}" in why and f"{shape[0]}x{shape[1]}" in why
    assert "dtype" in sparse24.refusal(name, (64, 64), torch.float64, "cuda", (9, 0), "cusparselt")
    assert sparse24.refusal(name, (64, 64), "fp8", "cuda", (9, 0)) is None


@needs_gpu
@pytest.mark.parametrize("backend", ["auto", "cutlass"])
def test_gpu_conversion_agrees_with_dense(rng, backend):
    model = pruned_tiny(rng, torch.bfloat16).cuda()
    ids = calibration(rng, 2, 16).cuda()
    with torch.no_grad():
        dense = model(ids).logits.float()
    out = pyprune.to_semi_structured(model, backend=backend)
    assert out is model
    report = model.pyprune_sparse24
    assert len(report.converted) == 14 and "lm_head" in report.dense
    assert all(sparse24.is_semi_structured(model.get_submodule(n).weight) for n in report.converted)
    with torch.no_grad():
        sparse = model(ids).logits.float()
    assert (sparse - dense).abs().max() <= 0.05 * dense.abs().max()
    assert (sparse.argmax(-1) == dense.argmax(-1)).float().mean() > 0.9
    gen = model.generate(ids[:1, :4], max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, 8)


@needs_gpu
def test_gpu_measure_policy(rng):
    model = pruned_tiny(rng, torch.bfloat16).cuda()
    pyprune.to_semi_structured(model, keep_dense="measure", tokens=(1, 64))
    report = model.pyprune_sparse24
    assert set(report.timings) == {(64, 64), (32, 64), (128, 64), (64, 128)}
    for name in report.converted:
        per = report.timings[tuple(model.get_submodule(name).weight.shape)]
        assert all(sp <= de for de, sp in per.values())


def test_magnitude_2to4_keeps_the_two_largest_of_each_group(rng):
    W = torch.randn(6, 16, generator=rng, dtype=torch.float64)
    P = sparse24.magnitude_2to4(W)
    assert sparse24.holds_2to4(P) and bool((P.reshape(6, 4, 4) != 0).sum(-1).eq(2).all())
    for r in range(6):
        for g in range(4):
            group = W[r, 4 * g:4 * g + 4]
            keep = set(group.abs().argsort()[2:].tolist())
            assert {i for i in range(4) if P[r, 4 * g + i] != 0} == keep
            assert torch.equal(P[r, 4 * g:4 * g + 4][list(keep)], group[list(keep)])


@needs_gpu
def test_gpu_second_call_converts_what_a_policy_left(rng):
    model = pruned_tiny(rng, torch.bfloat16).cuda()
    pyprune.to_semi_structured(model, keep_dense=lambda name, module: "mlp" in name)
    assert len(model.pyprune_sparse24.converted) == 8
    pyprune.to_semi_structured(model)
    assert len(model.pyprune_sparse24.converted) == 14
    assert pyprune.check_2to4(model).not_2to4 == ["lm_head"]


class StandIn:
    """A stand-in for torch's semi-structured class on the CPU: 'compresses' to a plain copy."""
    BACKEND = "stand-in"

    @staticmethod
    def from_dense(w):
        assert w.is_contiguous()
        return w.clone()


def test_conversion_and_policy_logic_with_a_stand_in_kernel(rng, monkeypatch):
    """Everything to_semi_structured does after its refusals, on the CPU: the GPU checks and torch's class replaced."""
    monkeypatch.setattr(sparse24, "refusal", lambda *a, **k: None)
    monkeypatch.setattr(sparse24, "sparse_class", lambda backend="auto": StandIn)
    timed = []

    def fake_time(out_f, in_f, tokens, dtype, *, device, backend):
        timed.append((out_f, in_f, tokens, dtype))
        return 1.0, (0.5 if out_f == in_f or tokens > 1 else 2.0)  # square shapes win everywhere, others lose at 1

    monkeypatch.setattr(sparse24, "time_linear", fake_time)
    model = pruned_tiny(rng)  # float32
    ids = calibration(rng, 1, 8)
    with torch.no_grad():
        ref = model(ids).logits
    q = model.model.layers[0].self_attn.q_proj
    old = q.weight
    out = pyprune.to_semi_structured(model, dtype=torch.bfloat16, keep_dense="measure", tokens=(1, 64))
    assert out is model and next(model.parameters()).dtype == torch.bfloat16  # cast first, as documented
    report = model.pyprune_sparse24
    assert report.backend == "stand-in"
    assert report.converted == [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in ("q", "o")]
    assert q.weight is not old and not q.weight.requires_grad
    assert {(o, i) for o, i, _, _ in timed} == {(64, 64), (32, 64), (128, 64), (64, 128)}
    assert {t for _, _, t, _ in timed} == {1, 64}
    assert all(d == torch.bfloat16 for *_, d in timed)
    assert report.dense["model.layers.1.mlp.down_proj"].startswith("measured slower: 1 tokens")
    assert report.dense["lm_head"].startswith("not 2:4")
    with torch.no_grad():
        got = model(ids).logits.float()
    assert (got - ref).abs().max() <= 0.05 * ref.abs().max()  # only the bf16 cast changed the outputs
    assert model.generate(ids[:, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)
