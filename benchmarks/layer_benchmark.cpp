// The layer against the limit it is held to (docs/performance.md#limit): the same SwiGLU GEMMs
// over T·K rows with one expert's weights and no routing, computed with oneDNN's matmul (or
// Eigen's GEMM, where oneDNN was not found: the JSON's context names which) on the same threads,
// measured in the same run: each step of a layer is followed by a step of its limit.
//
//   build/benchmarks/layer_benchmark [--threads=1,2,4] [--benchmark_format=json] [--benchmark_filter=...]
//   build/benchmarks/layer_benchmark --shape=T,H,F,E,K [--shape=…] [--threads=…]
//
// --shape times the default layer (TopK<K>, K one of 1, 2, 4, 6, 8) and its limit, forward and
// forward + backward, at the given shape instead of the built-in ones: a model's own.
// The matrix is generated at compile time from the policy lists below. Names carry what was run,
// the precision last among the policies (_f32; _bf16 for bf16 products, held to a bf16 limit;
// _i8 for int8 experts, forward only, held to an int8 limit):
//   layer/fwd/<policies>_f32/T:2048/H:1024/F:2816/E:8/K:2/threads:2
// with `fwd` (forward) or `fwd+bwd` (forward + backward); `limit/...` are the limits and
// `decode/...` the small batches: T = 1, 4, 16, held to the decode target, and T = 64 and 128,
// where the busiest expert gets about 20 and 40 rows, around detail::few_rows. Counters: gflops,
// pct_of_limit (100 · the median over steps of limit time / layer time), limit_ms, tokens_per_s,
// limit_in_bf16 and limit_in_int8 (bf16 and int8 layers: 1 where their limit's products are in
// their precision too, 0 where float),
// allocs_per_step (heap allocations in a step after the timed ones, expected 0); forward +
// backward adds peak_MiB and peak_over_saved (the first step's peak heap over the activations
// backward needs saved); decode adds x_of_bound (the median over steps of the step's time over
// reading the weights, in the layer's precision, at the bandwidth of a triad run right after it), experts_read,
// weight_GB_per_s, triad_GB_per_s (the paired triads') and most_rows (the busiest expert's rows).
// `triad/threads:N` is the memory's bandwidth (GB_per_s) and `fma/threads:N` the cores' own
// multiply-add throughput (gflops): what any product can scale to over threads on this machine.
// `scaling/...` (standard shape and E = 64, past one thread) pairs each step on N threads with one
// on one thread: parallel_efficiency, one_thread_ms, and fma_efficiency, the multiply-adds' own
// efficiency paired the same way.
// Timings are reported here, never asserted in tests.
// scripts/performance_report.py turns the JSON into tables.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <tbb/blocked_range.h>
#include <tbb/global_control.h>
#include <tbb/parallel_for.h>
#include <tbb/task_arena.h>

#include <moekit/moekit.hpp>

#include "limit_gemms.hpp"
#include "machine_probes.hpp"
#include "support/heap.hpp"

namespace {

using namespace probes;
using moekit::Index;
using Matrix = moekit::Matrix<float>;

template <class... Ps>
struct List {};

// Each list is varied on its own around the default layer (TopK<2>, AuxLoss, Dropless,
// GroupedGemm): their costs add, so the full product would time the same parts many times over.
// The reference PerExpertLoop is left out: a correctness oracle, one token at a time.
/// Switch with its input jitter on (ε = 1e-2): the draws and the jittered router product.
struct JitteredTopK1 : moekit::TopK<1> {
  static constexpr std::string_view name = "JitteredTopK";
  JitteredTopK1() { options.jitter = 1e-2; }
};
/// GShard's top-2 gating: the second expert kept at random (θ = 0.2).
struct GShardTopK2 : moekit::TopK<2> {
  static constexpr std::string_view name = "GShardTopK";
  GShardTopK2() { options.random_second = 0.2; }
};
/// Shazeer's noisy top-2 gating: the noise GEMM, the draws and the noise's gradient.
struct NoisyTopK2 : moekit::TopK<2> {
  static constexpr std::string_view name = "NoisyTopK";
  NoisyTopK2() { options.noisy_gating = true; }
};
using Routers = List<moekit::TopK<1>, JitteredTopK1, moekit::TopK<2>, GShardTopK2, NoisyTopK2, moekit::TopK<4>>;
/// Shazeer's two losses, which read noisy gating's logits, beside the other balancers.
using ShazeerLosses = moekit::Balanced<moekit::ImportanceLoss, moekit::LoadLoss>;
using Balancers = List<moekit::AuxLoss, moekit::NoBalance, moekit::Sinkhorn, moekit::AuxFree, moekit::ZLoss>;
using Dispatchers = List<moekit::Dropless, moekit::Capacity>;
using Experts = List<moekit::GroupedGemm, moekit::GroupedGemmType<moekit::GeLU>, moekit::GroupedGemmType<moekit::ReLU>>;

template <class R = moekit::TopK<2>, class B = moekit::AuxLoss, class D = moekit::Dropless, class X = moekit::GroupedGemm>
using Layer = moekit::MoELayer<R, B, D, X, float>;
/// The default layer with its experts' products in mixed precision, and with int8 experts
/// (forward only).
using Bf16Layer = moekit::MoELayer<moekit::TopK<2>, moekit::bf16>;
using Int8Layer = moekit::MoELayer<moekit::TopK<2>, moekit::int8>;

/// What a layer's experts' products compute on; its limit's products compute on the same.
template <class L>
constexpr moekit::Precision precision_of = moekit::precision_of<typename L::expert_type>;

template <class... Ps, class F>
void for_each_policy(List<Ps...>, F f) {
  (f.template operator()<Ps>(), ...);
}

struct Shape {
  Index tokens, hidden, ffn, experts;
  int k;
  Index rows() const { return tokens * k; }
  std::string name() const {
    return "T:" + std::to_string(tokens) + "/H:" + std::to_string(hidden) + "/F:" + std::to_string(ffn) +
           "/E:" + std::to_string(experts) + "/K:" + std::to_string(k);
  }
};

enum class Pass { forward, forward_backward };
const char* pass_name(Pass pass) { return pass == Pass::forward ? "fwd" : "fwd+bwd"; }

/// FLOPs of FFN experts over the routed rows: forward is one GEMM of 2·rows·H·F per weight
/// matrix (three for SwiGLU, two for GeLU and ReLU); backward two more per matrix (the input's
/// and the weight's gradient), so forward + backward is 3×.
double flops(const Shape& s, Pass pass, bool gated = true) {
  const double forward = (gated ? 3.0 : 2.0) * 2.0 * double(s.rows()) * double(s.hidden) * double(s.ffn);
  return forward * (pass == Pass::forward ? 1.0 : 3.0);
}

void run_limit(LimitGemms& limit, int threads, Pass pass) {
  limit.forward(threads);
  if (pass == Pass::forward_backward) limit.backward(threads);
}

/// gflops, tokens_per_s and pct_of_limit, from the seconds of a step and the limit's time over the
/// layer's. pct_of_limit compares GFLOP/s (for SwiGLU, the same as comparing times).
void set_counters(benchmark::State& state, const Shape& s, Pass pass, bool gated, double seconds, double limit_over_layer) {
  state.counters["gflops"] = flops(s, pass, gated) * 1e-9 / seconds;
  state.counters["tokens_per_s"] = double(s.tokens) / seconds;
  state.counters["pct_of_limit"] = 100.0 * limit_over_layer * flops(s, pass, gated) / flops(s, pass);
}

/// The limit on its own, for its speed-up over threads.
void BM_Limit(benchmark::State& state, Shape s, int threads, Pass pass) {
  double seconds = 0;
  on_threads(threads, [&] {
    LimitGemms limit(s.rows(), s.hidden, s.ffn);
    run_limit(limit, threads, pass);
    seconds = seconds_of([&] {
      for (auto _ : state) run_limit(limit, threads, pass);
    }) / double(state.iterations());
  });
  set_counters(state, s, pass, true, seconds, 1.0);
}

/// The activations backward needs saved (x, scores, the dispatched rows and the experts'
/// outputs, and the FFN's [S,F] intermediates: three for SwiGLU, two otherwise), in bytes.
template <class L>
double saved_bytes(const L& layer, const Shape& s) {
  const double rows = double(layer.plan().rows());
  const double ffn_saved = L::expert_type::activation::gated ? 3.0 : 2.0;
  return sizeof(float) * (double(s.tokens) * double(s.hidden + s.experts) + rows * (2.0 * double(s.hidden) + ffn_saved * double(s.ffn)));
}

/// A layer of shape s on random input and output gradient; () runs one step of the pass.
template <class L>
struct LayerStep {
  LayerStep(const Shape& s, Pass pass)
      : layer({.hidden = s.hidden, .ffn = s.ffn, .experts = s.experts}),
        x(Matrix::Random(s.tokens, s.hidden)),
        dy(Matrix::Random(s.tokens, s.hidden)),
        y(s.tokens, s.hidden),
        dx(s.tokens, s.hidden),
        pass(pass) {
    if constexpr (moekit::RouterReadsTokenIds<typename L::router_type>) {  // ids uniform over a 32 000-word vocabulary
      std::vector<Index> ids(static_cast<std::size_t>(s.tokens));
      for (std::size_t t = 0; t < ids.size(); ++t) ids[t] = static_cast<Index>((t * 7919 + 13) % 32000);
      layer.set_token_ids(ids);
    }
  }
  LayerStep(const LayerStep&) = delete;  // a layer and its batch: run in place, never copied
  LayerStep& operator=(const LayerStep&) = delete;
  void operator()() {
    layer.forward(x, y);
    if constexpr (!L::quantises_weights)  // int8 layers run forward only
      if (pass == Pass::forward_backward) layer.backward(dy, dx);
    benchmark::DoNotOptimize(y.data());
  }
  L layer;
  Matrix x, dy, y, dx;
  Pass pass;
};

/// The layer, each step followed by a step of the limit on the same threads: a shared machine's
/// speed drifts over seconds, so pct_of_limit is the median over the steps of limit time / layer
/// time, each pair a few hundred milliseconds apart. The reported time is the layer's steps
/// alone; limit_ms is the mean of the limit's steps beside them.
template <class L>
void BM_Layer(benchmark::State& state, Shape s, int threads, Pass pass) {
  on_threads(threads, [&] {
    LayerStep<L> step(s, pass);
    LimitGemms limit(s.rows(), s.hidden, s.ffn, precision_of<L>);
    double peak = 0;
    {
      const heap::Watch watch;  // the first step allocates every buffer: its peak is the step's
      step();
      peak = double(watch.report().peak_bytes);
    }
    run_limit(limit, threads, pass);  // warm-up
    std::vector<double> limit_over_layer;
    limit_over_layer.reserve(std::size_t(state.max_iterations));
    double layer_seconds = 0, limit_seconds = 0;
    for (auto _ : state) {
      const double layer_step = seconds_of([&] { step(); });
      const double limit_step = seconds_of([&] { run_limit(limit, threads, pass); });
      state.SetIterationTime(layer_step);
      layer_seconds += layer_step;
      limit_seconds += limit_step;
      limit_over_layer.push_back(limit_step / layer_step);
    }
    const double steps = double(state.iterations());
    set_counters(state, s, pass, L::expert_type::activation::gated, layer_seconds / steps, median(limit_over_layer));
    state.counters["limit_ms"] = 1e3 * limit_seconds / steps;
    if (precision_of<L> == moekit::Precision::bf16) state.counters["limit_in_bf16"] = limit_has_precisions ? 1 : 0;
    if (precision_of<L> == moekit::Precision::int8) state.counters["limit_in_int8"] = limit_has_precisions ? 1 : 0;
    {
      const heap::Watch watch;
      step();
      state.counters["allocs_per_step"] = double(watch.report().allocations);
    }
    if (pass == Pass::forward_backward) {
      state.counters["peak_MiB"] = peak / double(1 << 20);
      state.counters["peak_over_saved"] = peak / saved_bytes(step.layer, s);
    }
  });
}

/// Parallel efficiency with the machine's drift taken out, as the limit's pairing takes it out of
/// % of the limit: each step of the layer on `threads` threads is followed by the same step on one
/// thread, then by the cores' multiply-adds on `threads` threads and on one. parallel_efficiency
/// is the median over the steps of one-thread time / (threads × `threads`' time), and
/// fma_efficiency the same of the multiply-adds: what the machine itself gave at that moment. The
/// reported time is the many-thread steps'; one_thread_ms the mean of the one-thread steps.
template <class L>
void BM_Scaling(benchmark::State& state, Shape s, int threads, Pass pass) {
  constexpr long fma_rounds_a_step = long{1} << 24;  // 6.4 GFLOP in AVX-512: 40–70 ms on one core
  const tbb::global_control most(tbb::global_control::max_allowed_parallelism, std::size_t(threads));
  tbb::task_arena many(threads), one(1);
  LayerStep<L> step(s, pass);
  many.execute(step);  // warm-up, and every buffer either arena's threads need
  one.execute(step);
  std::vector<double> layer_efficiency, fma_efficiency;
  double many_seconds = 0, one_seconds = 0;
  for (auto _ : state) {
    const double on_many = seconds_of([&] { many.execute(step); });
    const double on_one = seconds_of([&] { one.execute(step); });
    const double fma_many = seconds_of([&] { fma_on_threads(threads, fma_rounds_a_step); });
    const double fma_one = seconds_of([&] { fma_on_threads(1, fma_rounds_a_step); });
    state.SetIterationTime(on_many);
    many_seconds += on_many;
    one_seconds += on_one;
    layer_efficiency.push_back(on_one / (threads * on_many));
    fma_efficiency.push_back(fma_one / (threads * fma_many));
  }
  const double steps = double(state.iterations());
  state.counters["gflops"] = flops(s, pass, L::expert_type::activation::gated) * 1e-9 * steps / many_seconds;
  state.counters["one_thread_ms"] = 1e3 * one_seconds / steps;
  state.counters["parallel_efficiency"] = 100.0 * median(layer_efficiency);
  if (fma_supported()) state.counters["fma_efficiency"] = 100.0 * median(fma_efficiency);
}

/// The bytes of one expert's weights as a layer's forward reads them: float, or bf16 as the
/// products read them (a bf16 layer today reads its float masters and rounds them: its x_of_bound
/// says what storing them in bf16 would save), or int8 with their scales and corrections.
template <class L>
double expert_weight_bytes(const L& layer, const Shape& s) {
  if constexpr (L::quantises_weights) return double(layer.expert().int8_bytes()) / double(s.experts);
  const double element = precision_of<L> == moekit::Precision::bf16 ? 2.0 : double(sizeof(float));
  return 3.0 * double(s.hidden) * double(s.ffn) * element;
}

/// Decode: a few tokens, so the time is reading the activated experts' weights. Held against
/// reading those weights once at the memory's bandwidth: each step is followed by a triad on the
/// same threads, and x_of_bound is the median over the steps of step time / (bytes / that triad's
/// bandwidth) (targets: ≤ 1.5 in float, ≤ 1.3 in bf16 and int8). Pairing takes out the shared machine's drift, as for the layers'
/// limit; the triad also leaves no weight in the caches for the next step.
template <class L>
void BM_Decode(benchmark::State& state, Shape s, int threads) {
  on_threads(threads, [&] {
    L layer({.hidden = s.hidden, .ffn = s.ffn, .experts = s.experts});
    Triad triad;
    const Matrix x = Matrix::Random(s.tokens, s.hidden);
    Matrix y(s.tokens, s.hidden);
    layer.forward(x, y);
    triad.seconds();  // warm-up
    const auto& rows = layer.tokens_per_expert();
    const auto active = std::count_if(rows.begin(), rows.end(), [](Index n) { return n > 0; });
    const double bytes = double(active) * expert_weight_bytes(layer, s);
    std::vector<double> over_bound;
    over_bound.reserve(std::size_t(state.max_iterations));
    double step_seconds = 0, triad_seconds = 0;
    for (auto _ : state) {
      const double step = seconds_of([&] {
        layer.forward(x, y);
        benchmark::DoNotOptimize(y.data());
      });
      const double triad_step = triad.seconds();
      state.SetIterationTime(step);
      step_seconds += step;
      triad_seconds += triad_step;
      over_bound.push_back(step / (bytes * triad_step / Triad::bytes));
    }
    const double steps = double(state.iterations());
    state.counters["experts_read"] = double(active);
    state.counters["most_rows"] = double(*std::max_element(rows.begin(), rows.end()));  // of one expert
    state.counters["weight_GB_per_s"] = bytes * 1e-9 * steps / step_seconds;
    state.counters["triad_GB_per_s"] = Triad::bytes * 1e-9 * steps / triad_seconds;  // the paired triads' mean
    state.counters["x_of_bound"] = median(over_bound);
  });
}

template <class L>
void register_decode(const Shape& s, int threads) {
  benchmark::RegisterBenchmark(("decode/" + L::name() + "/" + s.name() + "/threads:" + std::to_string(threads)).c_str(),
                               BM_Decode<L>, s, threads)
      ->Unit(benchmark::kMillisecond)
      ->UseManualTime();
}

/// The benchmarks of one shape and thread count: the limit, then the layer, for both passes (an
/// int8 layer: forward only). (A bf16 or int8 layer's limit is timed beside it only.)
template <class L>
void register_layer(const Shape& s, int threads, std::set<std::string>& seen) {
  for (const Pass pass : {Pass::forward, Pass::forward_backward}) {
    if (L::quantises_weights && pass == Pass::forward_backward) continue;
    const std::string tail = s.name() + "/threads:" + std::to_string(threads);
    const std::string limit = std::string("limit/") + pass_name(pass) + "/" + tail;
    if (precision_of<L> == moekit::Precision::scalar && seen.insert(limit).second) {
      benchmark::RegisterBenchmark(limit.c_str(), BM_Limit, s, threads, pass)->Unit(benchmark::kMillisecond)->UseRealTime();
    }
    const std::string layer = std::string("layer/") + pass_name(pass) + "/" + L::name() + "/" + tail;
    if (seen.insert(layer).second) {
      benchmark::RegisterBenchmark(layer.c_str(), BM_Layer<L>, s, threads, pass)->Unit(benchmark::kMillisecond)->UseManualTime();
    }
  }
}

/// Paired parallel efficiency of one shape at one thread count, for both passes.
template <class L>
void register_scaling(const Shape& s, int threads) {
  for (const Pass pass : {Pass::forward, Pass::forward_backward}) {
    const std::string name = std::string("scaling/") + pass_name(pass) + "/" + L::name() + "/" + s.name() +
                             "/threads:" + std::to_string(threads);
    // Five pairs: left to itself, Google Benchmark would run as many as fill half a second of
    // the many-thread steps, each pair then costing a one-thread step ten times as long.
    benchmark::RegisterBenchmark(name.c_str(), BM_Scaling<L>, s, threads, pass)
        ->Unit(benchmark::kMillisecond)
        ->UseManualTime()
        ->Iterations(5);
  }
}

/// The router sizes --shape takes, each a TopK<K> compiled in.
using ShapeTopKs = std::integer_sequence<int, 1, 2, 4, 6, 8>;

/// Whether --shape takes K, and the sizes it takes, listed for a message.
bool shape_takes_top_k(long k) {
  return []<int... K>(std::integer_sequence<int, K...>, long k) { return ((k == K) || ...); }(ShapeTopKs{}, k);
}
std::string shape_top_ks() {
  std::string listed;
  [&]<int... K>(std::integer_sequence<int, K...>) {
    ((listed += (listed.empty() ? "" : ", ") + std::to_string(K)), ...);
  }(ShapeTopKs{});
  return listed;
}

/// The default layer with TopK<s.k> and its limit at shape s, for both passes.
void register_shape(const Shape& s, int threads, std::set<std::string>& seen) {
  [&]<int... K>(std::integer_sequence<int, K...>) {
    ((s.k == K ? register_layer<Layer<moekit::TopK<K>>>(s, threads, seen) : void()), ...);
  }(ShapeTopKs{});
}

void register_all(const std::vector<int>& thread_counts, const std::vector<Shape>& shapes) {
  std::set<std::string> seen;
  if (!shapes.empty()) {
    for (const int threads : thread_counts)
      for (const Shape& s : shapes) register_shape(s, threads, seen);
    return;
  }
  for (const int threads : thread_counts) {
    benchmark::RegisterBenchmark(("triad/threads:" + std::to_string(threads)).c_str(), BM_Triad, threads)->Iterations(1);
    benchmark::RegisterBenchmark(("fma/threads:" + std::to_string(threads)).c_str(), BM_Fma, threads)
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime();
    for (const Index tokens : {1, 4, 16, 64, 128}) {
      const Shape s{tokens, 1024, 2816, 8, 2};
      register_decode<Layer<>>(s, threads);
      if (tokens <= 16) {
        register_decode<Bf16Layer>(s, threads);
        register_decode<Int8Layer>(s, threads);
      }
    }
    // The standard shape, and many small experts, with the default layer; past one thread, their
    // parallel efficiency from paired steps too.
    for (const Shape s : {Shape{2048, 1024, 2816, 8, 2}, Shape{2048, 1024, 256, 64, 2}}) {
      register_layer<Layer<>>(s, threads, seen);
      register_layer<Bf16Layer>(s, threads, seen);
      register_layer<Int8Layer>(s, threads, seen);
      if (threads > 1) register_scaling<Layer<>>(s, threads);
    }
    // Every policy of every list, on a quarter of the standard batch.
    auto policy_shape = [](int k) { return Shape{512, 1024, 2816, 8, k}; };
    for_each_policy(Routers{}, [&]<class R>() { register_layer<Layer<R>>(policy_shape(R::top_k), threads, seen); });
    for_each_policy(Balancers{}, [&]<class B>() { register_layer<Layer<moekit::TopK<2>, B>>(policy_shape(2), threads, seen); });
    register_layer<Layer<NoisyTopK2, ShazeerLosses>>(policy_shape(2), threads, seen);
    register_layer<Layer<moekit::Hash, moekit::NoBalance>>(policy_shape(1), threads, seen);  // no scores: NoBalance only
    // capacity_factor 2: each expert 2T/E rows, 2T in all, as top-2
    register_layer<Layer<moekit::ExpertChoice, moekit::NoBalance>>(policy_shape(2), threads, seen);
    for_each_policy(Dispatchers{}, [&]<class D>() {
      register_layer<Layer<moekit::TopK<2>, moekit::AuxLoss, D>>(policy_shape(2), threads, seen);
    });
    for_each_policy(Experts{}, [&]<class X>() {
      register_layer<Layer<moekit::TopK<2>, moekit::AuxLoss, moekit::Dropless, X>>(policy_shape(2), threads, seen);
    });
  }
}

/// The values of every `--name=a,b,…` in argv, one list a flag, each removed from argv.
std::vector<std::vector<long>> take_flag(int& argc, char** argv, const std::string& name) {
  const std::string prefix = "--" + name + "=";
  std::vector<std::vector<long>> taken;
  for (int i = 1; i < argc;) {
    const std::string arg = argv[i];
    if (arg.rfind(prefix, 0) != 0) {
      ++i;
      continue;
    }
    auto& values = taken.emplace_back();
    for (std::size_t at = prefix.size(); at <= arg.size();) {
      const auto comma = std::min(arg.find(',', at), arg.size());
      const std::string value = arg.substr(at, comma - at);
      char* end = nullptr;
      const long number = std::strtol(value.c_str(), &end, 10);
      if (value.empty() || *end != '\0' || number < 1) {
        std::fprintf(stderr, "layer_benchmark: %s: \"%s\" is not a whole number >= 1\n", arg.c_str(), value.c_str());
        std::exit(2);
      }
      values.push_back(number);
      at = comma + 1;
    }
    std::copy(argv + i + 1, argv + argc, argv + i);
    --argc;
  }
  return taken;
}

/// --threads=1,2,4; by default 1, 2, 4, … up to all hardware threads, and all.
std::vector<int> thread_counts(int& argc, char** argv) {
  std::vector<int> counts;
  for (const auto& values : take_flag(argc, argv, "threads"))
    for (const long n : values) counts.push_back(int(n));
  if (!counts.empty()) return counts;
  const int all = std::max(1u, std::thread::hardware_concurrency());
  for (int n = 1; n < all; n *= 2) counts.push_back(n);
  counts.push_back(all);
  return counts;
}

/// Every --shape=T,H,F,E,K.
std::vector<Shape> shapes(int& argc, char** argv) {
  std::vector<Shape> taken;
  for (const auto& v : take_flag(argc, argv, "shape")) {
    if (v.size() != 5 || !shape_takes_top_k(v[4]) || v[4] > v[3]) {
      const std::string got = v.size() == 5 ? ", K = " + std::to_string(v[4]) + ", E = " + std::to_string(v[3]) : "";
      std::fprintf(stderr,
                   "layer_benchmark: --shape takes T,H,F,E,K: five whole numbers, K one of %s and at most E; "
                   "got %zu number(s)%s\n",
                   shape_top_ks().c_str(), v.size(), got.c_str());
      std::exit(2);
    }
    taken.push_back({v[0], v[1], v[2], v[3], int(v[4])});
  }
  return taken;
}

}  // namespace

int main(int argc, char** argv) {
  const auto counts = thread_counts(argc, argv);
  const auto own_shapes = shapes(argc, argv);
  benchmark::Initialize(&argc, argv);
  benchmark::AddCustomContext("limit", probes::limit_label());
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  register_all(counts, own_shapes);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
}
