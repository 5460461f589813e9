#pragma once
// Probes of the machine the layer benchmarks hold their results against: the memory's bandwidth
// (a STREAM triad) and the cores' own multiply-add rate, with the timing helpers they share.
// Used by layer_benchmark (decode is held against the triad, scaling against the multiply-adds).
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <thread>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <Eigen/Core>
#include <tbb/blocked_range.h>
#include <tbb/global_control.h>
#include <tbb/parallel_for.h>
#include <tbb/task_arena.h>

#include <moekit/core/detail/vector_kernels.hpp>
#include <moekit/core/tensor.hpp>

namespace probes {

using moekit::Index;
using Clock = std::chrono::steady_clock;

/// Runs f on `threads` threads: in an arena of that many (so per-thread buffers are sized for
/// them, as in a user's arena), with TBB held to that many in all.
template <class F>
inline void on_threads(int threads, F f) {
  const tbb::global_control only(tbb::global_control::max_allowed_parallelism, std::size_t(threads));
  tbb::task_arena arena(threads);
  arena.execute(f);
}

/// Seconds f takes.
template <class F>
double seconds_of(F f) {
  const auto start = Clock::now();
  f();
  return std::chrono::duration<double>(Clock::now() - start).count();
}

inline double median(std::vector<double> values) {
  const auto middle = values.begin() + std::ptrdiff_t(values.size() / 2);
  std::nth_element(values.begin(), middle, values.end());
  if (values.size() % 2 == 1) return *middle;
  return (*middle + *std::max_element(values.begin(), middle)) / 2.0;
}

/// A STREAM triad a = b + 3·c over arrays of 32 Mi floats (128 MiB each, far beyond any cache),
/// counting the 3 × 128 MiB it moves. The loop is unrolled to four packets a step, so that its
/// speed is the memory's and not that of where one packet's loop falls in the binary.
class Triad {
 public:
  static constexpr double bytes = 3.0 * double(Index{32} << 20) * sizeof(float);

  /// Seconds of one triad on the threads of the calling arena.
  double seconds() {
    const double taken = seconds_of([&] {
      tbb::parallel_for(tbb::blocked_range<Index>(0, a_.size(), 1 << 16), [&](const tbb::blocked_range<Index>& r) {
        float* __restrict out = a_.data();
        const float *__restrict x = b_.data(), *__restrict y = c_.data();
#pragma GCC unroll 4
        for (Index i = r.begin(), end = r.end(); i < end; ++i) out[i] = x[i] + 3.0f * y[i];
      });
    });
    benchmark::DoNotOptimize(a_.data());
    return taken;
  }

 private:
  static constexpr Index n_ = Index{32} << 20;
  Eigen::ArrayXf a_ = Eigen::ArrayXf::Zero(n_), b_ = Eigen::ArrayXf::Ones(n_), c_ = Eigen::ArrayXf::Constant(n_, 2.0f);
};

/// The machine's memory bandwidth on `threads` threads, in bytes per second: the best of 5 triads.
inline void BM_Triad(benchmark::State& state, int threads) {
  double best = 1e300;
  on_threads(threads, [&] {
    Triad triad;
    for (auto _ : state) {
      for (int repeat = 0; repeat < 5; ++repeat) best = std::min(best, triad.seconds());
    }
  });
  state.counters["GB_per_s"] = Triad::bytes / best * 1e-9;
}

/// Multiply-adds on registers alone, no memory: 12 independent chains (enough to hide an FMA's
/// latency on two ports) in the vectors the layer's kernels run. Returns the flops done.
#if defined(__x86_64__)
[[gnu::noinline, gnu::target("avx512f")]] inline double fma_rounds_avx512(long rounds) {
  __m512 acc[12];
  for (int i = 0; i < 12; ++i) acc[i] = _mm512_set1_ps(float(i));
  const __m512 a = _mm512_set1_ps(0.999f), b = _mm512_set1_ps(0.001f);
  for (long r = 0; r < rounds; ++r) {
    for (auto& v : acc) v = _mm512_fmadd_ps(v, a, b);
  }
  alignas(64) float out[16];
  for (auto& v : acc) {
    _mm512_store_ps(out, v);
    benchmark::DoNotOptimize(out);
  }
  return 12.0 * 16 * 2 * double(rounds);
}

[[gnu::noinline, gnu::target("avx2,fma")]] inline double fma_rounds_avx2(long rounds) {
  __m256 acc[12];
  for (int i = 0; i < 12; ++i) acc[i] = _mm256_set1_ps(float(i));
  const __m256 a = _mm256_set1_ps(0.999f), b = _mm256_set1_ps(0.001f);
  for (long r = 0; r < rounds; ++r) {
    for (auto& v : acc) v = _mm256_fmadd_ps(v, a, b);
  }
  alignas(32) float out[8];
  for (auto& v : acc) {
    _mm256_store_ps(out, v);
    benchmark::DoNotOptimize(out);
  }
  return 12.0 * 8 * 2 * double(rounds);
}
#endif

/// Bytes of the vectors the multiply-adds run: the widest the layer's own kernels run on this CPU
/// (moekit's choice, so the ceiling is theirs), where those have FMA; 0 where none do.
inline int fma_vector_bytes() {
#if defined(__x86_64__)
  const int bytes = moekit::detail::widest_vector_bytes();
  if (bytes >= 32 && __builtin_cpu_supports("fma")) return bytes;
#endif
  return 0;
}

inline bool fma_supported() { return fma_vector_bytes() > 0; }

inline double fma_rounds(long rounds) {
#if defined(__x86_64__)
  if (fma_vector_bytes() == 64) return fma_rounds_avx512(rounds);
  if (fma_vector_bytes() == 32) return fma_rounds_avx2(rounds);
#endif
  return 0;
}

/// `total_rounds` of fma_rounds split evenly over `threads` threads of their own (std::thread, not
/// TBB's pool: this is the machine, not the scheduler). Returns the flops done.
inline double fma_on_threads(int threads, long total_rounds) {
  std::vector<std::thread> workers;
  std::vector<double> done(std::size_t(threads), 0.0);
  for (int t = 0; t < threads; ++t) {
    workers.emplace_back([&, t] { done[std::size_t(t)] = fma_rounds(total_rounds / threads); });
  }
  for (auto& worker : workers) worker.join();
  double flops = 0;
  for (const double d : done) flops += d;
  return flops;
}

/// The cores' multiply-add throughput on `threads` threads, the same total work split evenly, so
/// its speed-up over threads is the most a compute-bound product can reach here: a CPU that
/// lowers its clock when every core runs wide vectors, or vCPUs that share cores, show here first.
inline void BM_Fma(benchmark::State& state, int threads) {
  constexpr long total_rounds = long{1} << 26;  // 26 GFLOP in AVX-512
  if (!fma_supported()) {
    state.SkipWithError("fma: the layer's kernels run no vectors with FMA here (AVX2 or AVX-512 expected)");
    return;
  }
  double flops = 0;
  for (auto _ : state) flops += fma_on_threads(threads, total_rounds);
  state.counters["gflops"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsRate);
}

}  // namespace probes
