#pragma once
// The limit a layer's experts are held to (docs/performance.md): SwiGLU over the routed rows with
// one expert's weights, as GEMMs on equal panels per thread. Used by layer_benchmark and by
// moekit-hf bench.
#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>

#include <moekit/moekit.hpp>

namespace probes {

/// The limit: SwiGLU over T·K rows with one expert's weights — no router, no gather, no combine.
/// Each thread takes an equal panel (rows for forward and dx, FFN columns for the weight
/// gradients): the fastest way to run Eigen's single-threaded GEMM on several threads.
class LimitGemms {
 public:
  using Index = moekit::Index;
  using Matrix = moekit::Matrix<float>;

  LimitGemms(Index rows, Index hidden, Index ffn)
      : x_(Matrix::Random(rows, hidden)), dy_(Matrix::Random(rows, hidden)),
        gate_(Matrix::Random(ffn, hidden)), up_(Matrix::Random(ffn, hidden)), down_(Matrix::Random(hidden, ffn)),
        d_gate_w_(Matrix::Zero(ffn, hidden)), d_up_w_(Matrix::Zero(ffn, hidden)), d_down_w_(Matrix::Zero(hidden, ffn)),
        g_(rows, ffn), u_(rows, ffn), h_(rows, ffn), y_(rows, hidden), dx_(rows, hidden) {}

  void forward(int threads) {
    panels(threads, x_.rows(), [&](Index first, Index n) {
      const auto x = x_.middleRows(first, n);
      auto g = g_.middleRows(first, n), u = u_.middleRows(first, n), h = h_.middleRows(first, n);
      g.noalias() = x * gate_.transpose();
      u.noalias() = x * up_.transpose();
      moekit::detail::activate_gated<moekit::SwiGLU>(g, u, h);  // the layer's own pass: only the GEMMs differ
      y_.middleRows(first, n).noalias() = h * down_.transpose();
    });
  }

  void backward(int threads) {
    panels(threads, h_.cols(), [&](Index first, Index n) {  // d_down = dyᵀ · h
      d_down_w_.middleCols(first, n).noalias() += dy_.transpose() * h_.middleCols(first, n);
    });
    panels(threads, x_.rows(), [&](Index first, Index n) {
      auto g = g_.middleRows(first, n), u = u_.middleRows(first, n), dh = h_.middleRows(first, n);
      dh.noalias() = dy_.middleRows(first, n) * down_;
      moekit::detail::activate_gated_backward<moekit::SwiGLU>(g, u, dh);
      auto dx = dx_.middleRows(first, n);
      dx.noalias() = g * gate_;
      dx.noalias() += u * up_;
    });
    panels(threads, g_.cols(), [&](Index first, Index n) {
      d_gate_w_.middleRows(first, n).noalias() += g_.middleCols(first, n).transpose() * x_;
      d_up_w_.middleRows(first, n).noalias() += u_.middleCols(first, n).transpose() * x_;
    });
  }

 private:
  template <class Body>
  static void panels(int threads, Index extent, Body body) {
    tbb::parallel_for(tbb::blocked_range<int>(0, threads, 1), [&](const tbb::blocked_range<int>& r) {
      for (int p = r.begin(); p != r.end(); ++p) {
        const Index first = extent * p / threads, last = extent * (p + 1) / threads;
        if (last > first) body(first, last - first);
      }
    }, tbb::simple_partitioner());
  }

  Matrix x_, dy_, gate_, up_, down_, d_gate_w_, d_up_w_, d_down_w_, g_, u_, h_, y_, dx_;
};

}  // namespace probes
