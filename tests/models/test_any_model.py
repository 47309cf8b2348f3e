"""Any causal LM: every model type of the matrix (dense, per-layer attention, MoE, SSM, hybrids) is pruned by the same
code, with blocks, matrices and shared inputs observed from the model itself.

For every type: with nothing pruned, the block-by-block outputs equal the model's own block outputs and the
block-by-block perplexity equals the model's own; joint 50%, SparseGPT 50% and joint 2:4 give every pruned matrix
(each expert too) exactly the requested pattern, change nothing else, keep the logits finite; the written output loads
with transformers, and streaming from the shards gives bit-identical weights."""
from __future__ import annotations

import copy

import pytest
import torch

from pyprune import PruneConfig
from pyprune.evaluate import perplexity
from pyprune.models import prune_checkpoint, prune_model
from pyprune.models.capture import capture_inputs, run_block
from pyprune.models.discover import eager_experts, find_blocks
from pyprune.models.io import save_model
from pyprune.models.pipeline import inspect_model, matrix_views

from .tiny import MODEL_TYPES, MOE_TYPES, MORE_TYPES, VOCAB, calibration, tiny_model


def own_block_outputs(model, ids):
    """What every block returns inside the model's own forward pass (forward hooks)."""
    _, blocks = find_blocks(model)
    outs = {}
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(
        i, (o[0] if isinstance(o, (tuple, list)) else o).detach().clone())) for i, b in enumerate(blocks)]
    try:
        with torch.no_grad(), eager_experts(model):
            model(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return [outs[i] for i in range(len(blocks))]


def block_by_block(model, ids):
    _, blocks = find_blocks(model)
    with torch.no_grad(), eager_experts(model):
        inputs = capture_inputs(model, blocks, [ids], torch.device("cpu"))
        h, outs = inputs.hidden[0], []
        for i, b in enumerate(blocks):
            h = run_block(b, h, inputs.calls[i][0])
            outs.append(h)
    return outs


def assert_invariant(model, ids):
    own, mine = own_block_outputs(model, ids), block_by_block(model, ids)
    assert len(own) == len(mine)
    for i, (a, b) in enumerate(zip(own, mine)):
        err = float((a - b).abs().max()) / max(float(a.abs().max()), 1e-30)
        assert err <= 1e-5, f"block {i}: block-by-block output differs from the model's own by {err:.2e}"


def check_pattern(name, W, sparsity):
    rows, cols = W.shape
    if sparsity == "2:4":
        per_group = (W == 0).reshape(rows, cols // 4, 4).sum(-1)
        assert bool((per_group >= 2).all()), name
        assert int((W == 0).sum()) >= rows * cols // 2
    else:
        zeros = int((W == 0).sum())
        assert zeros >= rows * cols // 2, (name, zeros, rows * cols)


@pytest.mark.parametrize("model_type", MODEL_TYPES + MORE_TYPES)
def test_every_model_type(model_type, rng, tmp_path):
    model = tiny_model(model_type, rng)
    ids = calibration(rng, 4, 16)
    assert_invariant(model, ids)
    windows = calibration(rng, 2, 16)
    p_full = perplexity(model, windows)["perplexity"]
    p_seq = perplexity(model, windows, sequential=True)["perplexity"]
    assert p_seq == pytest.approx(p_full, rel=1e-5)

    views = matrix_views(model)
    assert views, "no prunable matrix found"
    moe = model_type in MOE_TYPES
    if moe:
        assert any("[" in n for n in views), "MoE model without expert matrices"
    kw = dict(calibrate_all_experts=moe, expert_min_tokens=1, device="cpu", batch_size=2)
    for method, sparsity in (("joint", "0.5"), ("sparsegpt", "0.5"), ("joint", "2:4")):
        pruned = copy.deepcopy(model)
        before = {k: v.clone() for k, v in pruned.state_dict().items()}
        config = PruneConfig(method=method, sparsity=sparsity, block_size=16)
        report = prune_model(pruned, ids, config, **kw)
        got = matrix_views(pruned)
        assert sorted(r.name for r in report.layers) == sorted(views), method
        for r in report.layers:
            W = got[r.name]
            check_pattern(r.name, W, sparsity)
            assert r.sparsity == pytest.approx(float((W == 0).float().mean()))
            assert r.fallback is None, (r.name, r.fallback)
        touched = {n.rsplit("[", 1)[0] if "[" in n else n for n in views}
        after = pruned.state_dict()
        for key, value in before.items():
            base = key[:-len(".weight")] if key.endswith(".weight") else key
            if base not in touched and key not in touched:
                assert torch.equal(after[key], value), f"{key} changed"
        with torch.no_grad():
            logits = pruned(input_ids=ids, use_cache=False).logits
        assert logits.shape == (*ids.shape, VOCAB) and bool(torch.isfinite(logits).all())
        if method == "joint" and sparsity == "0.5":
            joint = pruned
            joint_report = report

    # the written output loads with transformers and holds the pruned weights
    from transformers import AutoModelForCausalLM
    out = tmp_path / "pruned"
    save_model(joint, str(out), report=joint_report)
    again = AutoModelForCausalLM.from_pretrained(str(out))
    mine = joint.state_dict()
    for k, v in again.state_dict().items():
        assert torch.equal(v, mine[k]), k

    # streamed from the shards: bit-identical weights
    src = tmp_path / "dense"
    model.save_pretrained(str(src))
    streamed = tmp_path / "streamed"
    prune_checkpoint(str(src), str(streamed), ids, PruneConfig(method="joint", sparsity="0.5", block_size=16), **kw)
    loaded = AutoModelForCausalLM.from_pretrained(str(streamed))
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, mine[k]), f"streamed {k} differs"


def test_qwen2_sliding_window_layers_get_their_own_masks(rng):
    """Regression: the driver used block 0's arguments for every block; with sliding-window layers after a full one,
    blocks 1 and 2 were calibrated on activations 58-69% off the model's own."""
    model = tiny_model("qwen2", rng, layers=3, use_sliding_window=True, sliding_window=4, max_window_layers=1,
                       layer_types=None)
    assert model.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    ids = calibration(rng, 2, 16)
    assert_invariant(model, ids)
    _, blocks = find_blocks(model)
    with torch.no_grad():
        inputs = capture_inputs(model, blocks, [ids], torch.device("cpu"))
    assert inputs.calls[1][0] is not inputs.calls[0][0]  # the sliding layers really get other arguments
    windows = calibration(rng, 2, 16)
    assert perplexity(model, windows, sequential=True)["perplexity"] == pytest.approx(
        perplexity(model, windows)["perplexity"], rel=1e-5)


def routed_hessians(model, ids):
    """Reference: each expert's gate_up Hessian of block 0's MoE from the tokens its router sends it, in float64,
    read from the experts module's own call (hidden states, top_k_index)."""
    _, blocks = find_blocks(model)
    experts = next(m for m in blocks[0].modules() if any(p.dim() == 3 for p in m.parameters(recurse=False)))
    seen = []
    hook = experts.register_forward_pre_hook(lambda m, a, k: seen.append((a[0].detach(), a[1].detach())),
                                             with_kwargs=True)
    with torch.no_grad(), eager_experts(model):
        model(input_ids=ids, use_cache=False)
    hook.remove()
    E = experts.gate_up_proj.shape[0]
    X = torch.cat([x for x, _ in seen]).double()
    idx = torch.cat([i for _, i in seen])
    return {e: X[(idx == e).any(-1)] for e in range(E)}


def test_moe_experts_get_routed_hessians_and_fallbacks(rng):
    model = tiny_model("mixtral", rng, layers=1)
    ids = calibration(rng, 8, 16)
    xs = routed_hessians(model, ids)
    seen = {}
    from pyprune.models import driver

    real = driver._prune_slot

    def spy(block, index, slot, wanted, config, options, prefix, comm=None):
        for s in slot.sites:
            seen[s.name] = (slot.H.clone() if slot.H is not None else None, slot.n)
        return real(block, index, slot, wanted, config, options, prefix, comm)

    driver._prune_slot = spy
    try:
        report = prune_model(model, ids, PruneConfig(sparsity="2:4", block_size=16), expert_min_tokens=1)
    finally:
        driver._prune_slot = real
    for e, X in xs.items():
        H, n = seen[f"mlp.experts.gate_up_proj[{e}]"]
        assert n == X.shape[0]
        if n:
            ref = (2.0 / n) * X.T @ X
            assert float((H.double() - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    counts = {r.name: r.samples for r in report.layers if "experts" in r.name}
    assert sum(counts[f"model.layers.0.mlp.experts.gate_up_proj[{e}]"] for e in xs) == 2 * ids.numel()  # top-2

    # default threshold (the input width, 64) with 128 tokens over 4 experts at top-2: some experts fall back
    model2 = tiny_model("mixtral", rng, layers=1)
    report = prune_model(model2, calibration(rng, 2, 16), PruneConfig(sparsity="0.5", block_size=16))
    fb = [r for r in report.layers if r.fallback]
    assert fb and all(r.method in ("wanda", "magnitude") for r in fb)
    views = matrix_views(model2)
    for r in fb:
        check_pattern(r.name, views[r.name], "0.5")


@pytest.mark.parametrize("model_type,param", [("qwen3_moe", "gate_up"), ("gpt_oss", "gate_up"), ("dbrx", "w1")])
def test_calibrate_all_experts_keeps_routed_outputs(model_type, param, rng):
    """Every expert sees every token for its statistics, while the block's outputs stay the routed ones: 3-D fused
    experts, and DBRX's 2-D stacks in a child module (their count from the router's output width)."""
    from pyprune.models.discover import MatrixObserver, all_experts_statistics
    model = tiny_model(model_type, rng, layers=1)
    ids = calibration(rng, 2, 16)
    _, blocks = find_blocks(model)
    with torch.no_grad(), eager_experts(model):
        inputs = capture_inputs(model, blocks, [ids], torch.device("cpu"))
        ref = run_block(blocks[0], inputs.hidden[0], inputs.calls[0][0])
        obs = MatrixObserver(dict(blocks[0].named_parameters()))
        with all_experts_statistics(blocks[0], obs), obs:
            got = run_block(blocks[0], inputs.hidden[0], inputs.calls[0][0])
    assert torch.equal(got, ref)
    tokens = {}
    for site, x in obs.events:
        if site.expert is not None and param in site.param:
            tokens[site.expert] = tokens.get(site.expert, 0) + x.shape[0]
    assert tokens == {e: ids.numel() for e in range(4)}


def test_inspect_lists_groups_and_dense(rng):
    text = inspect_model(tiny_model("qwen2_moe", rng)).table()
    assert "[self_attn.q_proj 64x64, self_attn.k_proj 32x64, self_attn.v_proj 32x64]" in text
    assert "for each of 4 experts" in text and "dense: mlp.gate" in text and "dense: mlp.shared_expert_gate" in text
    assert "blocks 0-1" in text and "model.embed_tokens.weight" in text


def test_unsupported_models_fail_before_loading(tmp_path):
    import json

    from pyprune.models.discover import UnsupportedModelError
    from pyprune.models.io import check_supported, resolve_model
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(UnsupportedModelError, match="t5"):
        check_supported(resolve_model(str(tmp_path)))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no_such_model"}))
    with pytest.raises(UnsupportedModelError, match="no_such_model"):
        check_supported(resolve_model(str(tmp_path)))
    # a checkpoint with its own modelling code: said so, naming its class, and no code of it runs
    (tmp_path / "modeling_x.py").write_text("raise SystemExit('the checkpoint code ran')\n")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "x_custom", "auto_map": {
        "AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"}}))
    with pytest.raises(UnsupportedModelError, match=r"own code \(modeling_x\.XForCausalLM\).*trust_remote_code"):
        check_supported(resolve_model(str(tmp_path)))


def test_experts_no_token_reached_are_pruned_by_magnitude(rng):
    """One calibration token at top-2 of 4 experts: two experts never run; they are still pruned (magnitude, no
    update), reported with 0 tokens, and hold the exact pattern."""
    model = tiny_model("mixtral", rng, layers=1)
    report = prune_model(model, calibration(rng, 1, 1), PruneConfig(sparsity="2:4", block_size=16))
    experts = [r for r in report.layers if "experts" in r.name]
    assert len(experts) == 8  # 4 experts x (gate_up, down)
    unseen = [r for r in experts if r.samples == 0]
    assert len(unseen) == 4 and all(r.method == "magnitude" and r.fallback == "no tokens: magnitude" for r in unseen)
    views = matrix_views(model)
    for r in experts:
        check_pattern(r.name, views[r.name], "2:4")


@pytest.mark.parametrize("model_type", ["llama", "qwen2_moe"])
def test_hessian_budget_collects_in_passes(model_type, rng):
    """A budget of one Hessian at a time collects one group per pass over the partly pruned block: exactly what
    true_sequential does, bit for bit; with no budget, one pass (the default on the CPU)."""
    model = tiny_model(model_type, rng)
    ids = calibration(rng, 4, 16)
    config = PruneConfig(sparsity="2:4", block_size=16)
    a, b, c = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    kw = dict(calibrate_all_experts=True, expert_min_tokens=1)
    prune_model(a, ids, config, hessian_budget=1, **kw)
    prune_model(b, ids, config, true_sequential=True, hessian_budget=None, **kw)
    prune_model(c, ids, config, hessian_budget=None, **kw)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)  # passes see the partly pruned block


def test_inspect_counts_experts_of_a_2d_fused_parameter(rng):
    """DBRX keeps each expert kind as one 2-D parameter (experts x ffn, hidden): the count is the matrices it holds
    (4), not its first dimension (4 x 128)."""
    model = tiny_model("dbrx", rng)
    info = inspect_model(model)
    assert {b.experts for b in info.blocks} == {4}
    assert "4 experts" in info.table() and "512" not in info.table()


def test_expert_modules_are_stacks_of_matrices(rng):
    """A fused experts parameter stacks matrices; RWKV's (1, 1, hidden) time-mix vectors are 3-D too but stack none
    (inspect raised calibrate_all_experts' call-convention error on its attention before)."""
    from pyprune.models.discover import expert_modules
    assert expert_modules(tiny_model("rwkv", rng)) == []
    found = expert_modules(tiny_model("mixtral", rng))
    assert [count for _, _, count in found] == [4, 4] and all(n.endswith("mlp.experts") for n, _, _ in found)
