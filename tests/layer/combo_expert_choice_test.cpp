// The layer checks of the typed matrix (combo_test.hpp) for Expert Choice routing, which takes
// Dropless and the balancers that do not assume a top K: the default expert and its twin, the
// per-expert loop, in every scalar with NoBalance; ZLoss and ImportanceLoss beside it; and bf16
// products. (The other experts meet only their rows, whatever routed them: the TopK files hold
// each of them.) y is held to the formulas, each expert taking its C best tokens; the gradients of
// x, the router and the experts by central differences.
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include <moekit/io/hf_block.hpp>
#include <moekit/moekit.hpp>

#include "../support/combos.hpp"
#include "../support/grad_check.hpp"
#include "../support/random.hpp"
#include "../support/reference.hpp"
#include "../support/tolerance.hpp"

namespace moekit::test {

using ExpertChoiceLayers = typename as_gtest_types<typename concat<
    typename every_expert_and_scalar<ExpertChoice, List<NoBalance, Dropless>, List<GroupedGemm, PerExpertLoop>>::type,
    List<MoELayer<ExpertChoice, ZLoss, Dropless, double>, MoELayer<ExpertChoice, ImportanceLoss, Dropless, double>,
         MoELayer<ExpertChoice, NoBalance, Dropless, GroupedGemm, bf16>>>::type>::type;

template <class Layer>
class ExpertChoiceCombo : public ::testing::Test {
 protected:
  using T = typename Layer::scalar_type;
  using X = typename Layer::expert_type;

  static constexpr LayerConfig config{.hidden = 6, .ffn = 5, .experts = 4, .seed = 11};

  /// A layer whose experts each take 1.5 · T / E tokens, with small GEMM tiles.
  template <class L = Layer>
  static L make() {
    L layer(config, ExpertChoice{{.capacity_factor = 1.5}});
    if constexpr (requires { layer.expert().options.row_tile; }) {
      layer.expert().options.row_tile = 3;
      layer.expert().options.column_tile = 2;
    }
    return layer;
  }

  static Matrix<T> random(Index rows, unsigned seed) { return random_matrix<T>(rows, config.hidden, seed); }

  static double error(ConstMatrixRef<T> a, ConstMatrixRef<T> b) {
    return io::relative_error(std::span<const T>(a.data(), a.size()), std::span<const T>(b.data(), b.size()));
  }
};

TYPED_TEST_SUITE(ExpertChoiceCombo, ExpertChoiceLayers, ComboName);

// S = softmax(x·Wᵀ); each expert e takes the C = ⌈cf · T / E⌉ tokens of largest S_te (ties to the
// lower token, by a stable sort); y_t = Σ over the experts that took t of S_te · expert_e(x_t).
// Written out in double from the parameters; the balancing terms from their formulas. At cf 1.5
// some token gets several experts; at 0.5, with fewer slots than tokens, many get none.
TYPED_TEST(ExpertChoiceCombo, ForwardMatchesTheFormulas) {
  using T = typename TestFixture::T;
  using A = typename TestFixture::X::activation;
  const Unit u = A::name == "SwiGLU" ? Unit::swiglu : A::name == "GeLU" ? Unit::gelu : Unit::relu;
  constexpr Index tokens = 30, experts = 4;
  auto layer = TestFixture::make();
  const auto x = TestFixture::random(tokens, 3);
  auto values = [&](std::string_view name) {
    const auto v = std::as_const(layer).parameter(name).values();
    return std::vector<double>(v.begin(), v.end());
  };
  const std::vector<double> gate = A::gated ? values("experts.gate") : std::vector<double>{};
  const Matrix<double> xd = x.template cast<double>();
  const auto router = values("router.weight");
  Matrix<double> logits(tokens, experts), s(tokens, experts);
  for (Index t = 0; t < tokens; ++t) {
    for (Index e = 0; e < experts; ++e) {
      logits(t, e) = 0;
      for (Index h = 0; h < 6; ++h) logits(t, e) += router[static_cast<std::size_t>(e * 6 + h)] * xd(t, h);
    }
    s.row(t) = (logits.row(t).array() - logits.row(t).maxCoeff()).exp();
    s.row(t) /= s.row(t).sum();
  }
  for (const auto& [factor, capacity] : {std::pair{1.5, Index{12}}, std::pair{0.5, Index{4}}}) {
    layer.router().options.capacity_factor = factor;
    const Matrix<T> y = layer.forward(x);
    Matrix<double> expected = Matrix<double>::Zero(tokens, 6);
    std::vector<double> importance(experts, 0.0);
    std::vector<int> experts_of_token(tokens, 0);
    for (Index e = 0; e < experts; ++e) {
      std::vector<Index> order(tokens);
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](Index a, Index b) { return s(a, e) > s(b, e); });
      for (Index i = 0; i < tokens; ++i) {
        const Index t = order[static_cast<std::size_t>(i)];
        const auto slot = static_cast<std::size_t>(t * experts + e);
        if (i >= capacity) {
          ASSERT_TRUE(Routing<T>::is_empty(layer.routing().index[slot])) << "expert " << e << " took token " << t;
          continue;
        }
        ASSERT_EQ(layer.routing().index[slot], e) << "expert " << e << " did not take token " << t;
        expected.row(t) += s(t, e) * reference_expert(xd, t, e, gate, values("experts.up"), values("experts.down"), 5, u);
        importance[static_cast<std::size_t>(e)] += s(t, e);
        ++experts_of_token[static_cast<std::size_t>(t)];
      }
      EXPECT_EQ(layer.tokens_per_expert()[static_cast<std::size_t>(e)], capacity) << "expert " << e;
    }
    if (factor > 1)
      EXPECT_GT(*std::max_element(experts_of_token.begin(), experts_of_token.end()), 1);
    else
      EXPECT_GE(std::count(experts_of_token.begin(), experts_of_token.end(), 0), tokens - experts * capacity);
    EXPECT_LT(TestFixture::error(y, expected.cast<T>()), 10 * layer_tolerance<TypeParam>) << "cf " << factor;
    EXPECT_EQ(layer.stats().choices, experts * capacity);
    EXPECT_EQ(layer.stats().dropped, 0);
    using B = typename TypeParam::balancer_type;
    if constexpr (std::same_as<B, ZLoss>)
      EXPECT_NEAR(layer.balance_loss(), layer.balancer().options.coefficient * reference_z_loss(logits), 1e-12);
    else if constexpr (std::same_as<B, ImportanceLoss>)
      EXPECT_NEAR(layer.balance_loss(), layer.balancer().options.coefficient * reference_cv_squared(importance), 1e-12);
    else
      EXPECT_EQ(layer.balance_loss(), T(0));
  }
}

// Central differences of Σ(y ⊙ dy) (+ the balancing loss) for x, the router and every expert
// parameter (double); float: the double layer's gradients to float precision.
TYPED_TEST(ExpertChoiceCombo, GradientsAreRight) {
  using T = typename TestFixture::T;
  auto layer = TestFixture::make();
  const auto x = TestFixture::random(9, 5);
  const auto dy = TestFixture::random(9, 6);
  if constexpr (std::same_as<T, double>) {
    for (const auto& report : check_gradients(layer, x, dy)) EXPECT_LT(report.error, 1e-6) << report.name;
  } else {
    auto exact = TestFixture::template make<rebind<TypeParam, double>>();
    copy_parameters(exact, layer);
    expect_gradients_as_exact(layer, exact, x, dy, 5 * layer_tolerance<TypeParam>);
  }
}

TYPED_TEST(ExpertChoiceCombo, OneThreadAndManyGiveTheSameBits) {
  const auto x = TestFixture::random(300, 8);
  const auto dy = TestFixture::random(300, 9);
  expect_same_bits_on_one_and_eight_threads([] { return TestFixture::make(); }, x, dy);
}

// The grouped GEMM against the per-expert loop with the same parameters.
TYPED_TEST(ExpertChoiceCombo, GroupedGemmAndPerExpertLoopAgree) {
  using Twin = rebind<TypeParam, typename TestFixture::T, typename twin_expert<typename TestFixture::X>::type>;
  auto layer = TestFixture::make();
  auto twin = TestFixture::template make<Twin>();
  copy_parameters(twin, layer);
  const auto x = TestFixture::random(13, 12);
  const auto dy = TestFixture::random(13, 13);
  expect_twins_agree(layer, twin, x, dy, layer_tolerance<TypeParam>);
}

// No tokens: no output, no gradient. Buffers reused across batch sizes leak nothing.
TYPED_TEST(ExpertChoiceCombo, EmptyBatchAndRepeatedSteps) {
  using T = typename TestFixture::T;
  auto layer = TestFixture::make();
  EXPECT_EQ(layer.forward(Matrix<T>(0, 6)).rows(), 0);
  EXPECT_EQ(layer.backward(Matrix<T>(0, 6)).rows(), 0);
  for (const auto& g : layer.gradients())
    for (T v : g.values()) ASSERT_EQ(v, T(0)) << g.name();
  const auto small = TestFixture::random(5, 20), large = TestFixture::random(30, 21);
  const Matrix<T> first = layer.forward(small);
  const Matrix<T> first_dx = layer.backward(small);
  layer.forward(large);
  layer.backward(large);
  layer.zero_grad();
  EXPECT_EQ(first, layer.forward(small));
  EXPECT_EQ(first_dx, layer.backward(small));
}

}  // namespace moekit::test
