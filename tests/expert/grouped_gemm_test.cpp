// GroupedGemm against the reference loop for each activation, with empty experts, uneven
// blocks and tiles that do and do not divide the blocks; and the activations' derivatives.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <random>

#include <tbb/task_arena.h>

#include <moekit/expert/grouped_gemm.hpp>
#include <moekit/expert/per_expert_loop.hpp>
#include <moekit/io/hf_block.hpp>

namespace moekit::test {
namespace {

template <class Act, ExpertBias Bias = ExpertBias::none>
void expect_grouped_matches_reference(Index row_tile, Index column_tile) {
  using Grouped = GroupedGemmType<Act, Bias>;
  using Loop = PerExpertLoopType<Act, Bias>;
  const LayerShape shape{.hidden = 7, .ffn = 9, .experts = 4, .top_k = 1};
  const std::vector<Index> offsets{0, 5, 5, 17, 18};  // expert 1 gets no rows
  std::mt19937 rng(1);
  std::normal_distribution<double> draw;
  std::vector<Tensor<double>> weights, grads_a, grads_b;
  for (const auto& spec : Grouped::parameters(shape, shape.experts)) {
    weights.emplace_back(spec.name, spec.shape);
    for (double& v : weights.back().values()) v = draw(rng) * 0.5;
    grads_a.emplace_back(spec.name, spec.shape);
    grads_b.emplace_back(spec.name, spec.shape);
  }
  Matrix<double> rows(18, 7), d_out(18, 7);
  for (Index i = 0; i < rows.size(); ++i) rows.data()[i] = draw(rng), d_out.data()[i] = draw(rng);

  const Grouped grouped{{.row_tile = row_tile, .column_tile = column_tile}};
  const Loop loop{};
  typename Grouped::template Saved<double> saved_a;
  typename Loop::template Saved<double> saved_b;
  Workspace<double> workspace;
  Matrix<double> out_a(18, 7), out_b(18, 7);
  grouped.template forward<double>(weights, rows, offsets, out_a, saved_a, workspace);
  loop.template forward<double>(weights, rows, offsets, out_b, saved_b, workspace);
  EXPECT_LT((out_a - out_b).cwiseAbs().maxCoeff(), 1e-12);
  Matrix<double> dx_a = rows, dx_b = rows;  // backward turns the rows into their gradient
  grouped.template backward<double>(weights, dx_a, offsets, saved_a, d_out, grads_a, workspace);
  loop.template backward<double>(weights, dx_b, offsets, saved_b, d_out, grads_b, workspace);
  EXPECT_LT((dx_a - dx_b).cwiseAbs().maxCoeff(), 1e-12);
  for (std::size_t p = 0; p < grads_a.size(); ++p) {
    EXPECT_LT(io::relative_error(grads_a[p].values(), grads_b[p].values()), 1e-13) << grads_a[p].name();
    // The expert with no rows gets no gradient.
    if (grads_a[p].rank() == 3) {
      EXPECT_TRUE(grads_a[p].slice(1).isZero(0)) << grads_a[p].name();
    } else {  // a bias: none for expert 1, some for expert 2, which has rows
      EXPECT_TRUE(grads_a[p].matrix().row(1).isZero(0)) << grads_a[p].name();
      EXPECT_FALSE(grads_a[p].matrix().row(2).isZero(0)) << grads_a[p].name();
    }
  }
}

TEST(GroupedGemm, MatchesTheReferenceLoop) {
  for (auto [rows, cols] : {std::pair<Index, Index>{64, 128}, {1, 1}, {4, 3}, {5, 9}}) {
    expect_grouped_matches_reference<SwiGLU>(rows, cols);
    expect_grouped_matches_reference<GeLU>(rows, cols);
    expect_grouped_matches_reference<ReLU>(rows, cols);
    expect_grouped_matches_reference<ClampedSwiGLU>(rows, cols);
    expect_grouped_matches_reference<ClampedSwiGLU, ExpertBias::projections>(rows, cols);
    expect_grouped_matches_reference<GeLU, ExpertBias::projections>(rows, cols);
  }
}

TEST(GroupedGemm, EachThreadsPackingBuffersStayWithinTheTilesTimesMaxPackedDepth) {
  // Deep products (H = F = 640 > max_packed_depth) on four threads: every thread's blocks hold
  // at most max_packed_depth of the inner dimension for a row tile and a column tile.
  const LayerShape shape{.hidden = 640, .ffn = 640, .experts = 2, .top_k = 1};
  const Index count = 300;
  const std::vector<Index> offsets{0, 100, count};
  std::vector<Tensor<float>> weights, grads;
  for (const auto& spec : GroupedGemm::parameters(shape, shape.experts)) {
    weights.emplace_back(spec.name, spec.shape);
    for (float& v : weights.back().values()) v = float(std::rand()) / float(RAND_MAX) - 0.5f;
    grads.emplace_back(spec.name, spec.shape);
  }
  const GroupedGemm grouped{{.row_tile = 128, .column_tile = 96}};
  GroupedGemm::Saved<float> saved;
  Workspace<float> workspace;
  Matrix<float> rows = Matrix<float>::Random(count, shape.hidden), out(count, shape.hidden);
  const Matrix<float> d_out = Matrix<float>::Random(count, shape.hidden);
  const int threads = 4;
  tbb::task_arena(threads).execute([&] {
    grouped.forward<float>(weights, rows, offsets, out, saved, workspace);
    grouped.backward<float>(weights, rows, offsets, saved, d_out, grads, workspace);
  });
  ASSERT_EQ(workspace.threads(), std::size_t(threads));
  // Weight gradients tile by column_tile on both sides; the others by row_tile × column_tile.
  const Index side = std::max(grouped.options.row_tile, grouped.options.column_tile);
  EXPECT_LE(workspace.bytes(), threads * sizeof(float) * std::size_t(detail::max_packed_depth * 2 * side));
  // The vector kernels pack nothing: their buffers hold the forward's slabs of Wᵀ or, with
  // AVX-512, the turned tiles' xᵀ and the gate's and up's cᵀ beside it (every tile here has 33 to
  // 128 rows, 128 a whole number of vectors).
  const Index columns = grouped.options.column_tile;
  const auto per_thread = [&](Index floats) { return threads * sizeof(float) * std::size_t(floats); };
  if (detail::widest_vector_bytes() == 64)
    EXPECT_EQ(workspace.bytes(),
              per_thread((std::max(detail::broadcast_depth, columns) + 2 * columns) * grouped.options.row_tile));
  else if (detail::runs_wider_than_build())
    EXPECT_EQ(workspace.bytes(), per_thread(detail::broadcast_depth * columns));
  else
    EXPECT_GT(workspace.bytes(), 0u);
}

TEST(GroupedGemm, DeclaresTheFixtureLayout) {
  const LayerShape shape{.hidden = 32, .ffn = 48, .experts = 8, .top_k = 2};
  const auto swiglu = GroupedGemm::parameters(shape, 8);
  ASSERT_EQ(swiglu.size(), 3u);
  EXPECT_EQ(swiglu[0].name, "experts.gate");
  EXPECT_EQ(swiglu[0].shape, (std::vector<Index>{8, 48, 32}));
  EXPECT_EQ(swiglu[2].name, "experts.down");
  EXPECT_EQ(swiglu[2].shape, (std::vector<Index>{8, 32, 48}));
  EXPECT_EQ(GroupedGemmType<GeLU>::parameters(shape, 8).size(), 2u);
  EXPECT_THROW(GroupedGemm{{.row_tile = 0}}.validate(shape), error);
}

template <class Act>
void expect_derivative_matches_differences() {
  for (double g = -4.0; g <= 4.0; g += 0.37) {
    const double h = 1e-6;
    EXPECT_NEAR(Act::derivative(g), (Act::apply(g + h) - Act::apply(g - h)) / (2 * h), 1e-8) << Act::name << " at " << g;
  }
}

TEST(Activation, DerivativesMatchFiniteDifferences) {
  expect_derivative_matches_differences<SwiGLU>();
  expect_derivative_matches_differences<GeLU>();
  expect_derivative_matches_differences<ReLU>();
  EXPECT_NEAR(GeLU::apply(1.0), 0.8413447460685429, 1e-15);  // x·Φ(x)
  EXPECT_NEAR(SwiGLU::apply(1.0), 0.7310585786300049, 1e-15);  // x·σ(x)
}

// GPT-OSS's unit, on both sides of its clamps (away from the kinks at ±7).
TEST(Activation, ClampedSwiGLUsDerivativesMatchFiniteDifferencesPastItsClamps) {
  const double h = 1e-6;
  for (double v = -12.05; v <= 12.0; v += 0.5) {
    EXPECT_NEAR(ClampedSwiGLU::derivative(v), (ClampedSwiGLU::apply(v + h) - ClampedSwiGLU::apply(v - h)) / (2 * h), 1e-8)
        << "act' at " << v;
    EXPECT_NEAR(ClampedSwiGLU::up_derivative(v), (ClampedSwiGLU::up(v + h) - ClampedSwiGLU::up(v - h)) / (2 * h), 1e-8)
        << "v' at " << v;
  }
  EXPECT_DOUBLE_EQ(ClampedSwiGLU::apply(9.0), 7.0 / (1 + std::exp(-1.702 * 7.0)));  // the gate stops at 7
  EXPECT_DOUBLE_EQ(ClampedSwiGLU::up(-9.0), -6.0);                                   // clamp(u) + 1
  EXPECT_DOUBLE_EQ(ClampedSwiGLU::up(9.0), 8.0);
}

/// The tile passes against the scalar apply and derivative: within a few float roundings, over
/// values where the exponential underflows and overflows too.
template <class Act>
void expect_passes_match_scalar() {
  using M = Matrix<float>;
  const Index rows = 3, cols = 37;  // a partial packet at each row's end, whatever the packet size
  M g(rows, cols), u(rows, cols), d(rows, cols), h(rows, cols);
  for (Index i = 0; i < rows; ++i)
    for (Index j = 0; j < cols; ++j) {
      g(i, j) = float(-100.0 + 200.0 * double(i * cols + j) / double(rows * cols - 1));
      u(i, j) = float(0.5 + 0.01 * double(j));
      d(i, j) = float(1.0 - 0.02 * double(i + j));
    }
  const auto close = [](float got, float want) { return std::abs(got - want) <= 4e-7f * std::abs(want) + 1e-30f; };
  M dg = g, du = u;
  detail::activate_gated<Act>(g, u, h);
  detail::activate_gated_backward<Act>(dg, du, d);
  for (Index i = 0; i < rows; ++i)
    for (Index j = 0; j < cols; ++j) {
      const float gv = g(i, j);
      const float uv = u(i, j), v = detail::gated_up<Act>(uv);
      EXPECT_PRED2(close, h(i, j), Act::apply(gv) * v) << Act::name << " at " << gv;
      EXPECT_PRED2(close, dg(i, j), d(i, j) * v * Act::derivative(gv)) << Act::name << " at " << gv;
      EXPECT_PRED2(close, du(i, j), d(i, j) * Act::apply(gv) * detail::gated_up_derivative<Act>(uv))
          << Act::name << " at " << gv;
    }
  M a(rows, cols), da = u;
  detail::activate<Act>(u, a);
  detail::activate_backward<Act>(da, d);
  for (Index i = 0; i < rows; ++i)
    for (Index j = 0; j < cols; ++j) {
      EXPECT_PRED2(close, a(i, j), Act::apply(u(i, j)));
      EXPECT_PRED2(close, da(i, j), d(i, j) * Act::derivative(u(i, j)));
    }
}

TEST(Activation, TilePassesMatchTheScalarFormulas) {
  static_assert(detail::PacketActivation<SwiGLU, float> && detail::PacketActivation<ReLU, double>);
  static_assert(detail::PacketActivation<GeLU, float> && !detail::PacketActivation<GeLU, double>);
  expect_passes_match_scalar<SwiGLU>();
  expect_passes_match_scalar<ReLU>();
  expect_passes_match_scalar<ClampedSwiGLU>();
}

TEST(Activation, GeLUsFloatPassesAreWithinAFewRoundingsOfTheExactGeLU) {
  // Floats go through Eigen's rational fit of erf, not std::erf: held to the exact GeLU (in
  // double) within 4e-7 · max(1, |g|), its derivative within 4e-7 (std::erf in float: 1.3e-7).
  using M = Matrix<float>;
  const Index cols = 200001;
  M g(1, cols), h(1, cols);
  for (Index j = 0; j < cols; ++j) g(0, j) = float(-100.0 + 200.0 * double(j) / double(cols - 1));
  M dg = g;
  const M ones = M::Ones(1, cols);
  detail::activate<GeLU>(g, h);
  detail::activate_backward<GeLU>(dg, ones);
  for (Index j = 0; j < cols; ++j) {
    const double v = g(0, j);
    ASSERT_LE(std::abs(h(0, j) - GeLU::apply(v)), 4e-7 * std::max(1.0, std::abs(v))) << "GeLU at " << v;
    ASSERT_LE(std::abs(dg(0, j) - GeLU::derivative(v)), 4e-7) << "GeLU' at " << v;
  }
  M special(1, 3), out(1, 3);
  special << std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(), -0.0f;
  detail::activate<GeLU>(special, out);
  EXPECT_TRUE(std::isnan(out(0, 0)));  // the fit's clamp to ±4 must not hide a NaN
  EXPECT_EQ(out(0, 1), std::numeric_limits<float>::infinity());
  EXPECT_EQ(out(0, 2), 0.0f);
}

/// The fused forms the backward pass uses (act and act' from one exp or erf) against each alone:
/// bit for bit, so that fusing them changes no result.
template <class Act>
void expect_fused_form_has_the_bits_of_each_alone() {
  namespace ei = Eigen::internal;
  using Packet = ei::packet_traits<float>::type;
  constexpr int lanes = ei::packet_traits<float>::size;
  for (float first = -100.0f; first < 100.0f; first += 0.37f * lanes) {
    float in[lanes], fused_act[lanes], fused_derivative[lanes], act[lanes], derivative[lanes];
    for (int l = 0; l < lanes; ++l) in[l] = first + 0.37f * float(l);
    const Packet g = ei::ploadu<Packet>(in);
    const auto [a, da] = Act::apply_and_derivative_packet(g);
    ei::pstoreu(fused_act, a);
    ei::pstoreu(fused_derivative, da);
    ei::pstoreu(act, Act::apply_packet(g));
    ei::pstoreu(derivative, Act::derivative_packet(g));
    for (int l = 0; l < lanes; ++l) {
      ASSERT_EQ(fused_act[l], act[l]) << Act::name << " at " << in[l];
      ASSERT_EQ(fused_derivative[l], derivative[l]) << Act::name << " at " << in[l];
    }
  }
}

TEST(Activation, FusedFormsHaveTheBitsOfEachAlone) {
  expect_fused_form_has_the_bits_of_each_alone<SwiGLU>();
  expect_fused_form_has_the_bits_of_each_alone<GeLU>();
}

TEST(Activation, AnElementsResultDoesNotDependOnWhereItLies) {
  // Each value at every lane of a packet and in a row's partial last packet, through blocks of 1
  // to 17 columns that end at it: the bits must not change (tiles are cut by the shape, and the
  // layer promises the same bits for any cut of the work).
  using M = Matrix<float>;
  const Index cols = 401;  // many values: a packet form and a per-element one differ in about 1 of 8
  M g(1, cols), u = M::Constant(1, cols, 1.5f), h(1, cols);
  for (Index j = 0; j < cols; ++j) g(0, j) = 0.0613f * float(j) - 12.0f;
  detail::activate_gated<SwiGLU>(g, u, h);
  M plain(1, cols);  // GeLU's pass, which floats run in packets too
  detail::activate<GeLU>(g, plain);
  for (Index width = 1; width <= 17; ++width)
    for (Index j = width - 1; j < cols; ++j) {
      M part(1, width), plain_part(1, width);
      detail::activate_gated<SwiGLU>(g.middleCols(j + 1 - width, width), u.middleCols(j + 1 - width, width), part);
      ASSERT_EQ(part(0, width - 1), h(0, j)) << "value " << g(0, j) << " last of " << width;
      detail::activate<GeLU>(g.middleCols(j + 1 - width, width), plain_part);
      ASSERT_EQ(plain_part(0, width - 1), plain(0, j)) << "GeLU at " << g(0, j) << " last of " << width;
    }
}

}  // namespace
}  // namespace moekit::test
