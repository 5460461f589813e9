// x · Wᵀ for a few rows x, as the experts compute it at decode: each form of the layer's kernel
// (detail::times_wt: the build's vectors, and on x86 AVX2 and AVX-512, the layer running
// the widest the CPU has) against Eigen's GEMM (the product operator, which packs W first).
// The weights are 24 matrices of 2816 × 1024 floats (264 MiB), taken in turn, so each product
// reads its W from memory as a decode step does; the kernel's `/in_cache` runs take one W of
// 64 × 1024 (256 KiB) that stays in L2, for the rate of its arithmetic alone, and
// `/in_cache/k:1408` one of 64 × 1408 (352 KiB): the down product of experts with F = 1408
// (Qwen2-MoE's and DeepSeek-V2-Lite's), where 128 KiB of W is 23 rows. Counters:
// weight_GB_per_s (W read once) and gflops. `BM_Tiles` runs the layer's two kernels for x · Wᵀ
// tile by tile. This is the measurement behind detail::few_rows and detail::turned_past, the
// turned kernel's rows by dot products, and the split of decode's time between memory and
// arithmetic (docs/kernels.md#decode-kernel).
#include <benchmark/benchmark.h>

#include <algorithm>
#include <array>
#include <map>
#include <string>
#include <tuple>
#include <vector>

#include <moekit/core/detail/gemm.hpp>
#include <moekit/core/tensor.hpp>

namespace {

using moekit::Index;
using Matrix = moekit::Matrix<float>;

constexpr Index hidden = 1024, ffn = 2816, matrices = 24;

/// Where the weights come from: (name suffix, matrices, rows n, row length k).
struct Weights {
  const char* suffix;
  Index count, n, k;
};
constexpr Weights from_memory{"", matrices, ffn, hidden}, in_cache{"/in_cache", 1, 64, hidden},
    short_rows_in_cache{"/in_cache/k:1408", 1, 64, 1408};

// `count` matrices of [n, k], as the layer keeps its weights: on cache-line boundaries.
std::vector<moekit::Tensor<float>> make_weights(const Weights& kind) {
  std::vector<moekit::Tensor<float>> made;
  for (Index i = 0; i < kind.count; ++i) {
    made.emplace_back("w", std::vector<Index>{kind.n, kind.k});
    made.back().matrix() = Matrix::Random(kind.n, kind.k);
  }
  return made;
}

/// The weights of a kind, made the first time they are asked for (before that run's timing).
const std::vector<moekit::Tensor<float>>& weights(const Weights& kind) {
  static std::map<std::string, std::vector<moekit::Tensor<float>>> made;
  auto [at, added] = made.try_emplace(kind.suffix);
  if (added) at->second = make_weights(kind);
  return at->second;
}

template <class Product>
void run(benchmark::State& state, Product product, const Weights& kind = from_memory) {
  const Index rows = state.range(0), n = kind.n, k = kind.k;
  const Matrix x = Matrix::Random(rows, k);
  Matrix c = Matrix::Zero(rows, n);
  const auto& w = weights(kind);  // made before the timing starts
  std::size_t next = 0;
  for (auto _ : state) {
    product(c, x, w[next]);
    next = (next + 1) % w.size();
    benchmark::DoNotOptimize(c.data());
  }
  const double products = double(state.iterations());
  state.counters["weight_GB_per_s"] = benchmark::Counter(products * double(n * k) * sizeof(float) * 1e-9,
                                                          benchmark::Counter::kIsRate);
  state.counters["gflops"] = benchmark::Counter(products * 2.0 * double(rows * n * k) * 1e-9,
                                                benchmark::Counter::kIsRate);
}

template <class Form>
void BM_Kernel(benchmark::State& state, Weights kind) {
  if (!Form::available()) {
    state.SkipWithError("this CPU does not run this form of the kernel");
    return;
  }
  run(state, [](Matrix& c, const Matrix& x, const moekit::Tensor<float>& w) {
    const Index k = w.shape()[1];
    moekit::detail::times_wt(Form{}, c, x.data(), x.outerStride(), x.rows(), w.data(), k, w.shape()[0], k);
  }, kind);
}

/// The layer's two kernels for x · Wᵀ as it runs them, in the widest vectors the CPU has, tile by
/// tile of 256 columns: times_wt (dot products) and, where the CPU runs AVX-512,
/// times_wt_turned: where one gives way to the other, detail::turned_past
/// (docs/kernels.md#turned-past).
template <bool Turned>
void BM_Tiles(benchmark::State& state, Weights kind) {
  if (Turned && moekit::detail::widest_vector_bytes() != 64) {
    state.SkipWithError("the turned kernel runs where the CPU has AVX-512");
    return;
  }
  constexpr Index tile = 256;
  moekit::detail::GemmBlocks<float> blocks;
  run(state, [&](Matrix& c, const Matrix& x, const moekit::Tensor<float>& w) {
    const Index n = w.shape()[0], k = w.shape()[1];
    moekit::detail::with_widest_vectors([&](auto vectors) {
      for (Index j = 0; j < n; j += tile) {
        auto c_tile = c.middleCols(j, std::min(tile, n - j));
        const float* w_tile = w.data() + j * k;
        if constexpr (Turned && decltype(vectors)::bytes == 64)
          moekit::detail::times_wt_turned(vectors, blocks, std::array{&c_tile}, x.data(), x.outerStride(), x.rows(),
                                          std::array{w_tile}, k, c_tile.cols(), k);
        else
          moekit::detail::times_wt(vectors, c_tile, x.data(), x.outerStride(), x.rows(), w_tile, k, c_tile.cols(), k);
      }
    });
  }, kind);
}

void BM_EigenGemm(benchmark::State& state) {
  run(state, [](Matrix& c, const Matrix& x, const moekit::Tensor<float>& w) { c.noalias() += x * w.matrix().transpose(); });
}

void rows(benchmark::internal::Benchmark* b) {
  for (Index r : {1, 2, 4, 6, 8, 12, 16, 20, 24, 28, 32, 48, 64}) b->Arg(r);
  b->Unit(benchmark::kMillisecond);
}

/// rows, and two more for the turned kernel: 34, two rows past its last whole vector, which go by
/// dot products, and 40, eight past it, which do not (docs/kernels.md#dot-tail).
void tile_rows(benchmark::internal::Benchmark* b) {
  rows(b);
  b->Arg(34)->Arg(40);
}

/// For weights from memory and in cache: BM_Kernel for every form of this build
/// (detail::VectorForms), and BM_Tiles; then Eigen's GEMM.
void register_all() {
  for (const Weights& kind : {from_memory, in_cache, short_rows_in_cache}) {
    [&]<class... Form>(std::tuple<Form...>*) {
      const auto name = [&](const char* form) { return std::string("BM_Kernel<") + form + ">" + kind.suffix; };
      (rows(benchmark::RegisterBenchmark(name(Form::name).c_str(), BM_Kernel<Form>, kind)), ...);
    }(static_cast<moekit::detail::VectorForms*>(nullptr));
    tile_rows(benchmark::RegisterBenchmark((std::string("BM_Tiles/dot") + kind.suffix).c_str(), BM_Tiles<false>, kind));
    tile_rows(benchmark::RegisterBenchmark((std::string("BM_Tiles/turned") + kind.suffix).c_str(), BM_Tiles<true>, kind));
  }
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
