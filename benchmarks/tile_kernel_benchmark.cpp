// Each of the experts' six products, cut into the layer's tiles and computed on one thread by
// moekit's kernels (detail::gemm_add, as GroupedGemm calls it) and, paired with it, by Eigen's
// blocked GEMM kernel over the same tiles (detail::eigen_gemm_add: packing into buffers kept
// between calls, as the layer does where no kernel of its own takes a product; the product
// operator would also allocate them at every tile): where a step's time goes, product by
// product, and which of moekit's kernels loses to Eigen's on a given CPU
// (docs/kernels.md#tile-kernels).
//
//   build/benchmarks/tile_kernel_benchmark [--benchmark_filter=d_down] [--benchmark_format=json]
//
// Two shapes, T = 2048 and K = 2: the standard one (H = 1024, F = 2816, E = 8) and many small
// experts (F = 256, E = 64), every expert given T·K/E rows (512 and 64). The tiles are
// GroupedGemm's (256 rows × 256 columns; the weight gradients 256 × 256 over all of an expert's
// rows). Operands lie as the layer keeps them (weights [E,F,H] and [E,H,F], activations [S,F],
// rows [S,H]) and the tiles run in the layer's order, so they come from memory and cache as in
// a step:
//   fwd/up        x · W_upᵀ        (the gate's product is the same)
//   fwd/down      hidden · W_downᵀ
//   bwd/d_down    d_outᵀ · hidden   a weight gradient
//   bwd/d_hidden  d_out · W_down
//   bwd/d_up      d_upᵀ · x        a weight gradient (d_gate's is the same)
//   bwd/d_rows    d_up · W_up      (d_gate · W_gate is the same)
// Each iteration runs moekit's tiles, then Eigen's. Counters: gflops (moekit's), eigen_gflops,
// and speed_up, the median over iterations of Eigen's time over moekit's (pairs a few hundred
// milliseconds apart see the same machine, docs/performance.md). The time reported is moekit's.
// Before timing, the two results are compared: a benchmark whose products disagree stops with
// an error.
//
// schedule/<product>/<shape>/threads:N: how evenly detail::for_each_tile shares the product's
// tiles over N threads, cut from the uneven expert blocks a random batch is routed into, each
// tile's work a sleep as long as its multiply-adds (BM_Schedule): 16 threads measure on 2 cores.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <tbb/global_control.h>
#include <tbb/task_arena.h>

#include <moekit/core/gemm.hpp>
#include <moekit/core/detail/tiles.hpp>
#include <moekit/core/tensor.hpp>
#include <moekit/moekit.hpp>

namespace {

using moekit::Index;
using moekit::detail::Tile;
using Matrix = moekit::Matrix<float>;
using Clock = std::chrono::steady_clock;

constexpr Index tokens = 2048, top_k = 2, hidden = 1024;
constexpr Index tile_size = moekit::GroupedGemm::Options{}.row_tile;
static_assert(moekit::GroupedGemm::Options{}.column_tile == tile_size, "the weight gradients' tiles are square");

struct Shape {
  Index ffn, experts;
  Index rows_per_expert() const { return tokens * top_k / experts; }
  std::string name() const {
    return "T:" + std::to_string(tokens) + "/H:" + std::to_string(hidden) + "/F:" + std::to_string(ffn) +
           "/E:" + std::to_string(experts) + "/K:" + std::to_string(top_k);
  }
};

/// Every operand and result of one shape's products (standard shape: about 600 MB), in the
/// layer's own buffers: on cache lines, as the layer's are (Eigen's matrices align to the build's
/// vectors, 16 bytes in a build for any x86-64 CPU).
struct Operands {
  explicit Operands(const Shape& s)
      : w_up("w_up", {s.experts, s.ffn, hidden}),
        w_down("w_down", {s.experts, hidden, s.ffn}),
        g_up("g_up", {s.experts, s.ffn, hidden}),
        g_down("g_down", {s.experts, hidden, s.ffn}),
        x(buffers[0].matrix(tokens * top_k, hidden)),
        d_out(buffers[1].matrix(tokens * top_k, hidden)),
        act(buffers[2].matrix(tokens * top_k, s.ffn)),
        out_h(buffers[3].matrix(tokens * top_k, hidden)),
        out_f(buffers[4].matrix(tokens * top_k, s.ffn)) {
    for (auto* m : {&x, &d_out, &act}) m->setRandom();
    w_up.matrix().setRandom();
    w_down.matrix().setRandom();
  }
  moekit::Tensor<float> w_up, w_down, g_up, g_down;  // weights, and the gradients written
  moekit::detail::Buffer<float> buffers[5];
  moekit::MatrixMap<float> x, d_out, act;  // rows [S,H], d_out [S,H], activations [S,F]
  moekit::MatrixMap<float> out_h, out_f;   // results [S,H] and [S,F]
};

/// One shape's operands, made at its first benchmark and kept for the others.
Operands& operands(const Shape& s) {
  static std::map<std::pair<Index, Index>, std::unique_ptr<Operands>> made;
  auto& slot = made[{s.ffn, s.experts}];
  if (!slot) slot = std::make_unique<Operands>(s);
  return *slot;
}

enum class Product { up, down, d_down, d_hidden, d_up, d_rows };

bool is_weight_gradient(Product p) { return p == Product::d_down || p == Product::d_up; }

/// Experts' blocks of rows: offsets [E+1].
using Offsets = std::vector<Index>;

/// Every expert given T·K/E rows.
Offsets even_offsets(const Shape& s) {
  Offsets offsets;
  for (Index e = 0; e <= s.experts; ++e) offsets.push_back(e * s.rows_per_expert());
  return offsets;
}

/// The experts' blocks as the default layer dispatches a random batch (layer_benchmark's input):
/// the uneven counts a step's tiles are cut from.
const Offsets& routed_offsets(const Shape& s) {
  static std::map<std::pair<Index, Index>, Offsets> made;
  auto& offsets = made[{s.ffn, s.experts}];
  if (offsets.empty()) {
    moekit::MoELayer<moekit::TopK<top_k>, moekit::AuxLoss, moekit::Dropless, moekit::GroupedGemm> layer(
        {.hidden = hidden, .ffn = s.ffn, .experts = s.experts});
    const Matrix x = Matrix::Random(tokens, hidden);
    Matrix y(tokens, hidden);
    layer.forward(x, y);
    offsets.push_back(0);
    for (const Index count : layer.tokens_per_expert()) offsets.push_back(offsets.back() + count);
  }
  return offsets;
}

/// GroupedGemm's tiles for the product: (expert, 256 of its rows, 256 output columns), or for a
/// weight gradient (expert, 256 × 256 of the gradient) over all of the expert's rows.
std::vector<Tile> tiles_of(Product product, const Shape& s, const Offsets& offsets) {
  const Index out_rows = product == Product::d_down ? hidden : s.ffn;  // a weight gradient's rows
  const bool into_ffn = product == Product::up || product == Product::d_hidden || product == Product::d_down;
  const Index columns = into_ffn ? s.ffn : hidden;
  std::vector<Tile> made;
  if (is_weight_gradient(product))
    moekit::detail::weight_gradient_tiles(offsets, out_rows, columns, tile_size, made);
  else
    moekit::detail::row_tiles(offsets, tile_size, columns, tile_size, made);
  return made;
}

/// The tile's multiply-adds: its elements times what each sums over.
double multiply_adds(Product product, const Shape& s, const Offsets& offsets, const Tile& t) {
  Index depth = 0;
  switch (product) {
    case Product::up:
    case Product::d_hidden: depth = hidden; break;
    case Product::down:
    case Product::d_rows: depth = s.ffn; break;
    case Product::d_down:
    case Product::d_up: depth = moekit::detail::block_of(offsets, t.expert).second; break;
  }
  return double(t.rows) * double(t.columns) * double(depth);
}

/// The matrix the product writes.
moekit::MatrixMap<float> result_of(Product product, Operands& o) {
  switch (product) {
    case Product::up:
    case Product::d_hidden: return o.out_f;
    case Product::down:
    case Product::d_rows: return o.out_h;
    case Product::d_down: return o.g_down.matrix();
    case Product::d_up: return o.g_up.matrix();
  }
  return o.g_up.matrix();
}

/// multiply(c, a, b), c += a · b, for every tile of the product, in order.
template <class Multiply>
void run_tiles(Product product, const Shape& s, const std::vector<Tile>& cut, Multiply multiply) {
  auto& o = operands(s);
  const Index n = s.rows_per_expert();
  for (const Tile& t : cut) {
    const Index first = t.expert * n;
    switch (product) {
      case Product::up:
        multiply(o.out_f.block(t.row, t.column, t.rows, t.columns), o.x.middleRows(t.row, t.rows),
                 o.w_up.slice(t.expert).middleRows(t.column, t.columns).transpose());
        break;
      case Product::down:
        multiply(o.out_h.block(t.row, t.column, t.rows, t.columns), o.act.middleRows(t.row, t.rows),
                 o.w_down.slice(t.expert).middleRows(t.column, t.columns).transpose());
        break;
      case Product::d_down:
        multiply(o.g_down.slice(t.expert).block(t.row, t.column, t.rows, t.columns),
                 o.d_out.block(first, t.row, n, t.rows).transpose(), o.act.block(first, t.column, n, t.columns));
        break;
      case Product::d_hidden:
        multiply(o.out_f.block(t.row, t.column, t.rows, t.columns), o.d_out.middleRows(t.row, t.rows),
                 o.w_down.slice(t.expert).middleCols(t.column, t.columns));
        break;
      case Product::d_up:
        multiply(o.g_up.slice(t.expert).block(t.row, t.column, t.rows, t.columns),
                 o.act.block(first, t.row, n, t.rows).transpose(), o.x.block(first, t.column, n, t.columns));
        break;
      case Product::d_rows:
        multiply(o.out_h.block(t.row, t.column, t.rows, t.columns), o.act.middleRows(t.row, t.rows),
                 o.w_up.slice(t.expert).middleCols(t.column, t.columns));
        break;
    }
  }
}

double seconds_of(auto&& f) {
  const auto start = Clock::now();
  f();
  return std::chrono::duration<double>(Clock::now() - start).count();
}

void BM_Tiles(benchmark::State& state, Product product, Shape s) {
  const Offsets offsets = even_offsets(s);
  const std::vector<Tile> cut = tiles_of(product, s, offsets);
  double flops = 0;
  for (const Tile& t : cut) flops += 2.0 * multiply_adds(product, s, offsets, t);
  moekit::detail::GemmWorkspace<float> workspace;
  const auto ours = [&] {
    run_tiles(product, s, cut, [&](auto&& c, const auto& a, const auto& b) { moekit::gemm_add(workspace, c, a, b); });
  };
  const auto eigen = [&] {
    run_tiles(product, s, cut,
              [&](auto&& c, const auto& a, const auto& b) { moekit::detail::eigen_gemm_add(workspace, c, a, b); });
  };

  // The same product both ways from zero (which also readies the workspace's buffers).
  auto result = result_of(product, operands(s));
  result.setZero();
  ours();
  const Matrix by_moekit = result;
  result.setZero();
  eigen();
  if (!((by_moekit - result).norm() <= 1e-5 * result.norm())) {  // sums in another order: rounding
    state.SkipWithError("moekit's kernels and Eigen's GEMM disagree on this product");
    return;
  }

  std::vector<double> speed_up;
  double our_seconds = 0, eigen_seconds = 0;
  for (auto _ : state) {
    const double mine = seconds_of(ours), theirs = seconds_of(eigen);
    state.SetIterationTime(mine);
    our_seconds += mine;
    eigen_seconds += theirs;
    speed_up.push_back(theirs / mine);
  }
  std::sort(speed_up.begin(), speed_up.end());
  const double steps = double(state.iterations());
  state.counters["gflops"] = flops * steps / our_seconds * 1e-9;
  state.counters["eigen_gflops"] = flops * steps / eigen_seconds * 1e-9;
  state.counters["speed_up"] = speed_up[speed_up.size() / 2];
}

/// The product's tiles handed to `threads` threads by detail::for_each_tile, as the layer does,
/// each tile's work a sleep as long as its multiply-adds at an even rate, so that the threads
/// need no cores: how evenly the schedule shares a step's work, even where the machine has fewer
/// cores than threads. Counter balance: the median over steps of the time the tiles took, summed,
/// over threads × the step's (sleeps end late by tens of microseconds: measured, not assumed);
/// an even share is 200 ms.
void BM_Schedule(benchmark::State& state, Product product, Shape s, int threads) {
  const Offsets& offsets = routed_offsets(s);
  const std::vector<Tile> cut = tiles_of(product, s, offsets);
  double total = 0;
  for (const Tile& t : cut) total += multiply_adds(product, s, offsets, t);
  const double seconds_per_multiply_add = 0.2 * threads / total;
  const tbb::global_control only(tbb::global_control::max_allowed_parallelism, std::size_t(threads));
  tbb::task_arena arena(threads);
  std::vector<double> took(cut.size()), balance;
  arena.execute([&] {
    for (auto _ : state) {
      const double step = seconds_of([&] {
        moekit::detail::for_each_tile(cut, [&](const Tile& t) {
          const std::chrono::duration<double> work(seconds_per_multiply_add * multiply_adds(product, s, offsets, t));
          took[std::size_t(&t - cut.data())] = seconds_of([&] { std::this_thread::sleep_for(work); });
        });
      });
      state.SetIterationTime(step);
      double busy = 0;
      for (const double seconds : took) busy += seconds;
      balance.push_back(busy / (threads * step));
    }
  });
  std::sort(balance.begin(), balance.end());
  state.counters["balance"] = balance[balance.size() / 2];
  state.counters["tiles"] = double(cut.size());
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  const std::pair<const char*, Product> products[] = {
      {"fwd/up", Product::up},   {"fwd/down", Product::down}, {"bwd/d_down", Product::d_down},
      {"bwd/d_hidden", Product::d_hidden}, {"bwd/d_up", Product::d_up}, {"bwd/d_rows", Product::d_rows}};
  for (const Shape s : {Shape{2816, 8}, Shape{256, 64}})
    for (const auto& [name, product] : products)
      benchmark::RegisterBenchmark(("tiles/" + std::string(name) + "/" + s.name()).c_str(), BM_Tiles, product, s)
          ->UseManualTime()
          ->Unit(benchmark::kMillisecond);
  for (const Shape s : {Shape{2816, 8}, Shape{256, 64}})
    for (const auto& [name, product] : products)
      for (const int threads : {2, 4, 8, 16})
        benchmark::RegisterBenchmark(
            ("schedule/" + std::string(name) + "/" + s.name() + "/threads:" + std::to_string(threads)).c_str(),
            BM_Schedule, product, s, threads)
            ->UseManualTime()
            ->Iterations(5)
            ->Unit(benchmark::kMillisecond);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
}
