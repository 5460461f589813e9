// The layer's forward and forward + backward against the limit it is held to: the same SwiGLU
// GEMMs over T·K rows with one expert's weights and no routing, computed with Eigen.
//
//   build/benchmarks/layer_benchmark [--benchmark_format=json]
//
// Shapes are named T:/H:/F:/E:/K:. Counters: GFLOP/s and tokens/s. Timings are reported here,
// never asserted in tests.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <vector>

#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>

#include <moekit/moekit.hpp>

namespace {

using moekit::Index;
using Matrix = moekit::Matrix<float>;

constexpr int K = 2;

/// Forward FLOPs of SwiGLU experts over rows: three GEMMs of 2·rows·H·F.
double expert_flops(Index rows, Index hidden, Index ffn) { return 3.0 * 2.0 * double(rows) * double(hidden) * double(ffn); }

Matrix random(Index rows, Index cols) { return Matrix::Random(rows, cols); }

void set_counters(benchmark::State& state, Index tokens, double flops) {
  state.counters["GFLOP/s"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["tokens/s"] = benchmark::Counter(double(tokens), benchmark::Counter::kIsIterationInvariantRate);
}

/// The limit: the same GEMMs with no routing, over T·K rows and one expert's weights.
void BM_LimitForward(benchmark::State& state) {
  const Index tokens = state.range(0), hidden = state.range(1), ffn = state.range(2), rows = tokens * K;
  const Matrix x = random(rows, hidden), gate = random(ffn, hidden), up = random(ffn, hidden), down = random(hidden, ffn);
  Matrix g(rows, ffn), u(rows, ffn), y(rows, hidden);
  for (auto _ : state) {
    g.noalias() = x * gate.transpose();
    u.noalias() = x * up.transpose();
    g = g.unaryExpr([](float v) { return moekit::SwiGLU::apply(v); }).cwiseProduct(u);
    y.noalias() = g * down.transpose();
    benchmark::DoNotOptimize(y.data());
  }
  set_counters(state, tokens, expert_flops(rows, hidden, ffn));
}

template <bool Backward>
void BM_Layer(benchmark::State& state) {
  const Index tokens = state.range(0), hidden = state.range(1), ffn = state.range(2), experts = state.range(3);
  moekit::MoELayer<moekit::TopK<K>, moekit::AuxLoss, moekit::Dropless, moekit::GroupedGemm, float> layer(
      {.hidden = hidden, .ffn = ffn, .experts = experts});
  const Matrix x = random(tokens, hidden), dy = random(tokens, hidden);
  Matrix y(tokens, hidden), dx(tokens, hidden);
  for (auto _ : state) {
    layer.forward(x, y);
    if constexpr (Backward) layer.backward(dy, dx);
    benchmark::DoNotOptimize(y.data());
  }
  // Backward costs two GEMMs for each forward one (input and weight gradients).
  set_counters(state, tokens, expert_flops(tokens * K, hidden, ffn) * (Backward ? 3.0 : 1.0));
}

/// The machine's memory bandwidth, measured once in this run on all cores (TBB, like the layer):
/// the best of 5 STREAM triads
/// a = b + s·c over arrays of 32 Mi floats (128 MiB each, far beyond any cache), counting the
/// 3 × 128 MiB each triad moves. Bytes per second.
double triad_bandwidth() {
  static const double bandwidth = [] {
    const std::size_t n = std::size_t{32} << 20;
    std::vector<float> a(n, 0.0f), b(n, 1.0f), c(n, 2.0f);
    double best = 1e300;
    for (int repeat = 0; repeat < 5; ++repeat) {
      const auto start = std::chrono::steady_clock::now();
      tbb::parallel_for(tbb::blocked_range<std::size_t>(0, n, 1 << 16), [&](const tbb::blocked_range<std::size_t>& r) {
        for (std::size_t i = r.begin(); i != r.end(); ++i) a[i] = b[i] + 3.0f * c[i];
      });
      benchmark::DoNotOptimize(a.data());
      best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    }
    return 3.0 * double(n) * sizeof(float) / best;
  }();
  return bandwidth;
}

void BM_Triad(benchmark::State& state) {
  for (auto _ : state) benchmark::DoNotOptimize(triad_bandwidth());
  state.counters["GB/s"] = triad_bandwidth() * 1e-9;
}

/// Decode: a few tokens, so the time is reading the activated experts' weights. Held against
/// reading those weights once at the triad's bandwidth: `x_of_bound` = time / that (target ≤ 1.5).
void BM_LayerDecode(benchmark::State& state) {
  const Index tokens = state.range(0), hidden = state.range(1), ffn = state.range(2), experts = state.range(3);
  moekit::MoELayer<moekit::TopK<K>, moekit::AuxLoss, moekit::Dropless, moekit::GroupedGemm, float> layer(
      {.hidden = hidden, .ffn = ffn, .experts = experts});
  const Matrix x = random(tokens, hidden);
  Matrix y(tokens, hidden);
  layer.forward(x, y);
  const auto active = std::count_if(layer.tokens_per_expert().begin(), layer.tokens_per_expert().end(),
                                    [](Index n) { return n > 0; });
  const double bytes = double(active) * 3.0 * double(hidden) * double(ffn) * sizeof(float);
  const double bound = bytes / triad_bandwidth();
  const auto start = std::chrono::steady_clock::now();
  for (auto _ : state) {
    layer.forward(x, y);
    benchmark::DoNotOptimize(y.data());
  }
  const double per_step =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / double(state.iterations());
  state.counters["experts_read"] = double(active);
  state.counters["weight_GB/s"] = bytes * 1e-9 / per_step;
  state.counters["x_of_bound"] = per_step / bound;
}

void shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"T", "H", "F", "E"});
  b->Args({512, 1024, 2816, 8});   // a smaller cut of the standard shape, for a 2-core machine
  b->Args({2048, 1024, 2816, 8});  // the standard shape
  b->Args({512, 1024, 256, 64});   // many small experts
  b->Unit(benchmark::kMillisecond)->UseRealTime();
}

}  // namespace

BENCHMARK(BM_Triad)->Iterations(1);
BENCHMARK(BM_LayerDecode)
    ->ArgNames({"T", "H", "F", "E"})
    ->Args({1, 1024, 2816, 8})
    ->Args({4, 1024, 2816, 8})
    ->Args({16, 1024, 2816, 8})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(BM_LimitForward)->Apply(shapes);
BENCHMARK(BM_Layer<false>)->Name("BM_LayerForward")->Apply(shapes);
BENCHMARK(BM_Layer<true>)->Name("BM_LayerForwardBackward")->Apply(shapes);

BENCHMARK_MAIN();
