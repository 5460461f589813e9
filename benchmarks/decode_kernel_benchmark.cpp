// x · Wᵀ for a few rows x, as the experts compute it at decode: each form of the layer's kernel
// (detail::times_wt: the build's vectors, and on x86 AVX2 and AVX-512, the layer running
// the widest the CPU has) against Eigen's GEMM (the product operator, which packs W first).
// The weights are 24 matrices of 2816 × 1024 floats (264 MiB), taken in turn, so each product
// reads its W from memory as a decode step does. Counters: weight_GB_per_s (W read once) and
// gflops. This is the measurement behind detail::few_rows (docs/performance.md#decode-kernel).
#include <benchmark/benchmark.h>

#include <string>
#include <tuple>
#include <vector>

#include <moekit/core/detail/gemm.hpp>
#include <moekit/core/tensor.hpp>

namespace {

using moekit::Index;
using Matrix = moekit::Matrix<float>;

constexpr Index hidden = 1024, ffn = 2816, matrices = 24;

// Tensors, as the layer keeps its weights: on cache-line boundaries.
const std::vector<moekit::Tensor<float>>& weights() {
  static const std::vector<moekit::Tensor<float>> w = [] {
    std::vector<moekit::Tensor<float>> made;
    for (Index i = 0; i < matrices; ++i) {
      made.emplace_back("w", std::vector<Index>{ffn, hidden});
      made.back().matrix() = Matrix::Random(ffn, hidden);
    }
    return made;
  }();
  return w;
}

template <class Product>
void run(benchmark::State& state, Product product) {
  const Index rows = state.range(0);
  const Matrix x = Matrix::Random(rows, hidden);
  Matrix c = Matrix::Zero(rows, ffn);
  const auto& w = weights();  // made before the timing starts
  std::size_t next = 0;
  for (auto _ : state) {
    product(c, x, w[next]);
    next = (next + 1) % w.size();
    benchmark::DoNotOptimize(c.data());
  }
  const double products = double(state.iterations());
  state.counters["weight_GB_per_s"] = benchmark::Counter(products * double(ffn * hidden) * sizeof(float) * 1e-9,
                                                          benchmark::Counter::kIsRate);
  state.counters["gflops"] = benchmark::Counter(products * 2.0 * double(rows * ffn * hidden) * 1e-9,
                                                benchmark::Counter::kIsRate);
}

template <class Form>
void BM_Kernel(benchmark::State& state) {
  if (!Form::available()) {
    state.SkipWithError("this CPU does not run this form of the kernel");
    return;
  }
  run(state, [](Matrix& c, const Matrix& x, const moekit::Tensor<float>& w) {
    moekit::detail::times_wt(Form{}, c, x.data(), x.outerStride(), x.rows(), w.data(), hidden, ffn, hidden);
  });
}

void BM_EigenGemm(benchmark::State& state) {
  run(state, [](Matrix& c, const Matrix& x, const moekit::Tensor<float>& w) { c.noalias() += x * w.matrix().transpose(); });
}

void rows(benchmark::internal::Benchmark* b) {
  for (Index r : {1, 2, 4, 8, 16, 32, 48, 64}) b->Arg(r);
  b->Unit(benchmark::kMillisecond);
}

/// BM_Kernel for every form of this build (detail::VectorForms), then Eigen's GEMM.
void register_all() {
  [&]<class... Form>(std::tuple<Form...>*) {
    (rows(benchmark::RegisterBenchmark((std::string("BM_Kernel<") + Form::name + ">").c_str(), BM_Kernel<Form>)), ...);
  }(static_cast<moekit::detail::VectorForms*>(nullptr));
  rows(benchmark::RegisterBenchmark("BM_EigenGemm", BM_EigenGemm));
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  register_all();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
}
