"""The whole-model benchmark (benchmarks/bench_prune_model.py) at its tiny shape on the CPU: it runs the real driver
for both methods, its table has every phase with a positive time, the phases of every block sum to no more than the
block's wall time, and the library functions it wraps are restored afterwards."""
import json
import math
import pytest
import torch

from .util import load_benchmark

METHODS = ("joint", "sparsegpt")


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_prune_model")


@pytest.fixture(scope="module")
def run(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_prune_model")
    # hidden 128, 2 blocks, 2 x 64 tokens (the "tiny" preset); no warm-up run, torch's thread count untouched
    result = bench.main(["--shape", "tiny", "--blocks", "2", "--nsamples", "2", "--seqlen", "64", "--device", "cpu",
                         "--no-warmup", "--out", str(out), "--name", "bpm"])
    return out, result


def _table(md: str, first_header: str) -> list[dict]:
    """The markdown table whose first column is ``first_header``, as dicts of strings."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (c.strip() for c in line.strip("|").split("|")))))
    return rows


def test_table_has_every_phase_with_positive_times(bench, run):
    out, _ = run
    md = (out / "bpm.md").read_text()
    rows = {r["phase"]: r for r in _table(md, "phase")}
    for phase in ["capture"] + bench.PHASES + ["other", "total"]:
        assert phase in rows, f"phase {phase} missing from the table"
        for method in METHODS:
            if phase == "exchange" and method == "sparsegpt":  # the joint method's exchanges only
                assert rows[phase][method] == "-"
                continue
            value = float(rows[phase][method])
            assert value > 0 or (phase == "other" and value >= 0), (phase, method, value)
    for phase in ("forward_observe", "hessian", "setup", "mask", "solve", "trailing", "forward_next"):
        for method in METHODS:
            assert float(rows[phase][f"{method} floor"]) > 0, (phase, method)
    assert md.count("**") >= 2 and "80 blocks" in md and "min joint" in md and "min SparseGPT" in md


def test_phases_sum_to_no_more_than_the_total(bench, run):
    out, _ = run
    data = json.loads((out / "bpm.json").read_text())
    assert [r["method"] for r in data["results"]] == list(METHODS)
    for r in data["results"]:
        assert "error" not in r, r.get("error")
        assert sorted(r["blocks"]) == ["0", "1"]
        for i, block in r["blocks"].items():
            measured = [block[p] for p in bench.PHASES if p in block]
            assert all(t > 0 for t in measured), (r["method"], i, block)
            assert sum(measured) <= block["total"] * (1 + 1e-9), (r["method"], i, block)
            assert block["other"] >= 0
        assert "forward_next" in r["blocks"]["0"] and "forward_next" not in r["blocks"]["1"]  # the last block
        phases = set(bench.PHASES) - ({"exchange"} if r["method"] == "sparsegpt" else set())
        assert set(r["mean_s"]) == phases | {"other"}
        assert r["per_block_s"] == pytest.approx(sum(r["mean_s"].values()))
        assert r["extrapolated_s"] > 79 * r["per_block_s"]
        assert sum(r["blocks"][i]["total"] for i in r["blocks"]) + r["capture_s"] <= r["prune_model_s"] * (1 + 1e-6)
        assert r["modules"] == 14 and r["sparsity"] == pytest.approx(0.5, abs=0.01)
        assert math.isfinite(r["total_loss"]) and r["total_loss"] > 0
        assert r["peak_host_rss_gib"] > 0
    # the joint's default exchanges (with the solve of their final set) are a phase of their own
    joint = data["results"][0]
    assert all(joint["blocks"][i]["exchange"] > 0 for i in joint["blocks"])
    assert all(0 <= joint["masked_solve_op_s"][i] <= joint["blocks"][i]["solve"] for i in joint["blocks"])


def test_library_is_restored(bench, run):
    from pyprune import algorithms, ops
    from pyprune.algorithms import joint, sparsegpt
    from pyprune.models import driver
    for fn in (driver.capture_inputs, driver.observe_block, driver.accumulate_hessian, driver.run_block_all,
               driver.BlockStore.load, driver.BlockStore.done, algorithms.hessian_setup, joint.select_block_mask,
               sparsegpt.smallest_mask, ops.masked_solve, algorithms.ALGORITHMS["joint"]):
        assert not hasattr(fn, "__wrapped__") and fn.__qualname__ != "instrument.<locals>.timed.<locals>.make", fn
        assert "bench_prune_model" not in getattr(fn, "__module__", "")
    assert "addmm_" not in torch.Tensor.__dict__
