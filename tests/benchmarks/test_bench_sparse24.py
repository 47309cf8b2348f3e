"""benchmarks/bench_sparse24.py on the CPU: it says the kernels are CUDA-only and exits 0 (as a script and through
main), its floors are the stated arithmetic, and its end-to-end bookkeeping runs on a tiny model with the conversion
replaced by a stand-in that keeps the weights dense (the real kernels need a GPU)."""
import os
import subprocess
import sys

import pytest
import torch

from pyprune import sparse24

from ..models.tiny import tiny_model
from .util import ROOT, load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_sparse24")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the benchmark would run")
def test_cpu_says_cuda_only_and_exits_cleanly(bench, tmp_path, capsys):
    assert bench.main(["--out", str(tmp_path)]) == 0
    assert "CUDA-only" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())  # nothing measured, nothing written
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_sparse24.py"), "--quick",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0 and "CUDA-only" in proc.stdout, proc.stderr[-2000:]


def test_bad_parts_are_refused(bench):
    with pytest.raises(SystemExit, match="unknown"):
        bench.main(["--parts", "products,decode"])


def test_floors(bench):
    peaks = {"mm_bf16_tflops": 800.0, "copy_gbps": 3000.0}
    # 8192 x 8192 at 8192 tokens: compute-bound, 2 * 8192^3 flops at 800 TFLOP/s, sparse at twice the rate
    dense, sparse = bench.floors(8192, 8192, 8192, peaks)
    assert dense == pytest.approx(2 * 8192 ** 3 / 800e12) and sparse == pytest.approx(dense / 2)
    # one token: memory-bound, W (2 bytes each) + x + y; sparse: half the values (out in bytes) + 2 bits per kept
    # value of metadata (out in / 8 bytes)
    dense, sparse = bench.floors(8192, 8192, 1, peaks)
    act = 2 * 8192 * 2
    assert dense == pytest.approx((8192 * 8192 * 2 + act) / 3000e9)
    assert sparse == pytest.approx((8192 * 8192 * (1 + 0.125) + act) / 3000e9)


def test_end_to_end_bookkeeping_on_cpu(bench, rng, monkeypatch):
    """run_model with the conversion replaced: every variant measured, agreement exact (the same dense weights)."""
    def stand_in(model, keep_dense=None, tokens=(), **kw):
        report = sparse24.check_2to4(model)
        report.converted = [c.name for c in report.checks if c.holds]
        report.backend = "stand-in"
        setattr(model, sparse24.ATTRIBUTE, report)
        return model

    monkeypatch.setattr(sparse24, "to_semi_structured", stand_in)
    model = tiny_model("llama", rng)
    rows, notes = [], []
    saves = []
    torch.set_num_threads(1)
    bench.run_model("tiny", model, torch.device("cpu"), True, rows, lambda: saves.append(1), notes)
    assert [r["variant"] for r in rows] == ["dense (2:4 zeros)", "policy: measure", "all sparse"]
    assert len(saves) == 3 and not any("error" in r for r in rows)
    assert rows[0]["sparse_layers"] == "0 of 14" and rows[2]["sparse_layers"] == "14 of 14 (stand-in)"
    for r in rows:
        assert all(r[k] > 0 for k in ("prefill_1x2048", "prefill_8x2048", "decode_b1", "decode_b16"))
    for r in rows[1:]:
        assert r["max_logit_diff"] == 0.0 and r["top1_agree"] == 1.0 and r["decode_same"] == 1.0
    assert sparse24.check_2to4(model).not_2to4 == ["lm_head"]  # the blocks were pruned 2:4 first


def test_products_bookkeeping(bench, monkeypatch):
    """run_products with the timing replaced: one row per shape and token count, floors beside, errors kept."""
    def fake(out_f, in_f, tokens, dtype, *, device, reps):
        if tokens == 16:
            raise RuntimeError("no kernel")
        return 2e-3, 1e-3

    monkeypatch.setattr(sparse24, "time_linear", fake)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    peaks = {"mm_bf16_tflops": 800.0, "copy_gbps": 3000.0}
    rows, saves = [], []
    bench.run_products(torch.device("cpu"), False, peaks, rows, lambda: saves.append(1))
    assert [(r["shape"], r["tokens"]) for r in rows] == [(f"{o}x{i}", t) for o, i in bench.SHAPES_70B
                                                         for t in bench.TOKENS]
    assert len(saves) == len(rows) == 15
    for r in rows:
        o, i = (int(x) for x in r["shape"].split("x"))
        fd, fs = bench.floors(o, i, r["tokens"], peaks)
        assert r["dense_floor_us"] == pytest.approx(fd * 1e6) and r["floor_speedup"] == pytest.approx(fd / fs)
        if r["tokens"] == 16:
            assert r["error"] == "RuntimeError: no kernel" and "speedup" not in r
        else:
            assert r["speedup"] == pytest.approx(2.0) and r["dense_us"] == pytest.approx(2000.0)


def test_write_tables(bench, tmp_path):
    import json
    meta = {"env": {"gpu": "test"}, "peaks": {"mm_bf16_tflops": 800.0, "copy_gbps": 3000.0}, "backend": "cusparselt"}
    products = [{"shape": "8192x8192", "tokens": 1, "dense_us": 50.0, "sparse_us": 40.0, "speedup": 1.25}]
    models = [{"model": "builtin", "variant": "all sparse", "error": "RuntimeError: x"}]
    bench.write(tmp_path, meta, products, models, ["a note"])
    data = json.loads((tmp_path / "bench_sparse24.json").read_text())
    assert data["products"] == products and data["models"] == models and data["notes"] == ["a note"]
    md = (tmp_path / "bench_sparse24.md").read_text()
    assert "| 8192x8192 | 1 | 50 |" in md and "RuntimeError: x" in md and "- a note" in md
    assert "sparse backend: cusparselt" in md
