// The pyprune op schemas, and the Python module pyprune._C (empty: importing it registers the ops).
// CPU kernels: csrc/cpu/*.cpp; CUDA kernels: csrc/cuda/*.cu with their torch glue in csrc/cuda/*.cpp.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(pyprune, m) {
  m.def("nm_select(Tensor W1, Tensor G, int n, int m, bool exact) -> Tensor");
  // status (int32, per row): 0 = solved, else 1 + the block column of the first non-positive Cholesky pivot of
  // G[M, M] (that row's E and loss are NaN). The op never raises for it; pyprune.ops.masked_solve does.
  m.def("masked_solve(Tensor G, Tensor U_B, Tensor W1, Tensor mask) -> (Tensor E, Tensor loss, Tensor status)");
  // masked_solve after up to `rounds` exchanges of a pruned and a kept weight per row (inside groups of m columns
  // when m > 0), each lowering the row's loss by more than tol times it; also returns the final mask and the number
  // of exchanges per row (int32). rounds = 0 is the masked solve of the given mask from the same factor.
  m.def("refine_solve(Tensor G, Tensor U_B, Tensor W1, Tensor mask, int rounds, int m, float tol) "
        "-> (Tensor E, Tensor loss, Tensor status, Tensor mask_out, Tensor swaps)");
  m.def("hessian_update(Tensor(a!) H, Tensor X, float alpha, float beta, bool allow_tf32) -> ()");
  // Test-only: masked_solve's per-row CUDA code run on the CPU by `threads` std::threads in warps of `warp`
  // lanes, with the CUDA launcher's two tiers (checks the partitioning and barriers without a GPU).
  m.def("_masked_solve_emulated(Tensor G, Tensor U_B, Tensor W1, Tensor mask, int threads, int warp) "
        "-> (Tensor E, Tensor loss, Tensor status)");
  m.def("_refine_solve_emulated(Tensor G, Tensor U_B, Tensor W1, Tensor mask, int rounds, int m, float tol, "
        "int threads, int warp) -> (Tensor E, Tensor loss, Tensor status, Tensor mask_out, Tensor swaps)");
  // Test-only: the CPU refine_solve with every row through the one-row code (no eight-row setup).
  m.def("_refine_solve_rowwise(Tensor G, Tensor U_B, Tensor W1, Tensor mask, int rounds, int m, float tol) "
        "-> (Tensor E, Tensor loss, Tensor status, Tensor mask_out, Tensor swaps)");
}

static struct PyModuleDef pyprune_c_module = {
    PyModuleDef_HEAD_INIT, "_C",
    "pyprune's compiled ops; importing this module registers torch.ops.pyprune.*", -1, nullptr,
};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&pyprune_c_module); }
