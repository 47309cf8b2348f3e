// ThreadTeam: the Team interface of kernels/team.cuh on several std::threads, for a test-only op that runs the
// CUDA kernels' per-row code (partitioning over ranks, warps and lanes, and every barrier) on the CPU. Barriers
// spin (with yield), since the team syncs thousands of times per row.
#pragma once

#include <atomic>
#include <memory>
#include <thread>
#include <vector>

#include "kernels/team.cuh"

namespace pyprune {

class SpinBarrier {
 public:
  explicit SpinBarrier(int n) : n_(n), count_(0), gen_(0) {}
  void wait() {
    const int g = gen_.load(std::memory_order_acquire);
    if (count_.fetch_add(1, std::memory_order_acq_rel) + 1 == n_) {
      count_.store(0, std::memory_order_relaxed);
      gen_.fetch_add(1, std::memory_order_acq_rel);
      return;
    }
    while (gen_.load(std::memory_order_acquire) == g) std::this_thread::yield();
  }

 private:
  const int n_;
  std::atomic<int> count_;
  std::atomic<int> gen_;
};

struct ThreadTeamShared {
  int size, W;
  SpinBarrier bar;
  std::vector<std::unique_ptr<SpinBarrier>> warp_bars;
  std::vector<double> fscr, wscr;
  std::vector<int> iscr;
  std::vector<float> vscr;
  ThreadTeamShared(int size_, int W_)
      : size(size_), W(W_), bar(size_), fscr(size_), wscr(size_), iscr(size_), vscr(size_) {
    for (int w = 0; w < size_ / W_; ++w) warp_bars.emplace_back(new SpinBarrier(W_));
  }
};

struct ThreadTeam {
  static constexpr bool kSerial = false;
  ThreadTeamShared* s;
  int r;
  int rank() const { return r; }
  int size() const { return s->size; }
  int lane() const { return r % s->W; }
  int warp() const { return r / s->W; }
  int nwarps() const { return s->size / s->W; }
  int warp_size() const { return s->W; }
  void sync() { s->bar.wait(); }
  double sum(double v) {
    s->fscr[r] = v;
    sync();
    double tot = 0.0;
    for (int i = 0; i < s->size; ++i) tot += s->fscr[i];
    sync();
    return tot;
  }
  int excl_scan(int v, int* total) {
    s->iscr[r] = v;
    sync();
    int before = 0, tot = 0;
    for (int i = 0; i < s->size; ++i) {
      before += i < r ? s->iscr[i] : 0;
      tot += s->iscr[i];
    }
    sync();
    *total = tot;
    return before;
  }
  double warp_sum(double v) {
    const int w0 = warp() * s->W;
    s->wscr[r] = v;
    s->warp_bars[warp()]->wait();
    double tot = 0.0;
    for (int i = 0; i < s->W; ++i) tot += s->wscr[w0 + i];
    s->warp_bars[warp()]->wait();
    return tot;
  }
  float argmin(float v, int i, int* imin) {
    s->vscr[r] = v;
    s->iscr[r] = i;
    sync();
    float bv = s->vscr[0];
    int bi = s->iscr[0];
    for (int k = 1; k < s->size; ++k)
      if (pp_before(s->vscr[k], s->iscr[k], bv, bi)) {
        bv = s->vscr[k];
        bi = s->iscr[k];
      }
    sync();
    *imin = bi;
    return bv;
  }
};

}  // namespace pyprune
