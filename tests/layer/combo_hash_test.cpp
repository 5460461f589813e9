// The layer checks of the typed matrix (combo_test.hpp) for Hash routing, which has no scores and
// so takes only NoBalance: the default expert and its twin, the per-expert loop, in every scalar
// with Dropless, Capacity with the default expert, and bf16 products. (The other experts meet
// only their rows, whatever routed them: the TopK files hold each of them.) y is each token's
// expert's output (weight 1), held to the formulas; the gradients of x and the experts by
// central differences.
#include <gtest/gtest.h>

#include <vector>

#include <moekit/io/hf_block.hpp>
#include <moekit/moekit.hpp>

#include "../support/combos.hpp"
#include "../support/grad_check.hpp"
#include "../support/random.hpp"
#include "../support/reference.hpp"
#include "../support/tolerance.hpp"

namespace moekit::test {

using HashLayers = typename as_gtest_types<typename concat<
    typename every_expert_and_scalar<Hash, List<NoBalance, Dropless>, List<GroupedGemm, PerExpertLoop>>::type,
    typename every_scalar<Hash, List<NoBalance, Capacity>, GroupedGemm, Scalars>::type,
    List<MoELayer<Hash, NoBalance, Dropless, GroupedGemm, bf16>>>::type>::type;

template <class Layer>
class HashCombo : public ::testing::Test {
 protected:
  using T = typename Layer::scalar_type;
  using X = typename Layer::expert_type;

  static constexpr LayerConfig config{.hidden = 6, .ffn = 5, .experts = 4, .seed = 11};

  /// Ids that repeat, so that several tokens share an expert, and some experts get none or few.
  static std::vector<Index> ids(Index tokens) {
    std::vector<Index> ids(static_cast<std::size_t>(tokens));
    for (Index t = 0; t < tokens; ++t) ids[static_cast<std::size_t>(t)] = (t * 5 + 1) % 23;
    return ids;
  }

  /// A layer told the ids of `tokens` tokens, with small GEMM tiles and, with Capacity, drops.
  template <class L = Layer>
  static L make(Index tokens) {
    L layer(config, Hash{{.seed = 4}});
    layer.set_token_ids(ids(tokens));
    if constexpr (std::same_as<typename L::dispatcher_type, Capacity>) layer.dispatcher().options.capacity_factor = 0.75;
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

TYPED_TEST_SUITE(HashCombo, HashLayers, ComboName);

// y_t = expert_{h(id_t)}(x_t) for each kept token (0 for one Capacity dropped), from the formulas
// in double; the choices are the hash's.
TYPED_TEST(HashCombo, ForwardMatchesTheFormulas) {
  using T = typename TestFixture::T;
  using A = typename TestFixture::X::activation;
  const Unit u = A::name == "SwiGLU" ? Unit::swiglu
                 : A::name == "GeLU" ? Unit::gelu
                 : A::name == "ReLU" ? Unit::relu
                                     : Unit::clamped_swiglu;
  auto layer = TestFixture::make(30);
  const auto x = TestFixture::random(30, 3);
  const Matrix<T> y = layer.forward(x);
  auto values = [&](std::string_view name) {
    const auto v = std::as_const(layer).parameter(name).values();
    return std::vector<double>(v.begin(), v.end());
  };
  Biases biases;
  if constexpr (requires { TestFixture::X::bias; })
    if (TestFixture::X::bias == ExpertBias::projections)
      biases = {values("experts.gate_bias"), values("experts.up_bias"), values("experts.down_bias")};
  const std::vector<double> gate = A::gated ? values("experts.gate") : std::vector<double>{};
  const Matrix<double> xd = x.template cast<double>();
  Matrix<double> expected = Matrix<double>::Zero(30, 6);
  const auto ids = TestFixture::ids(30);
  for (Index t = 0; t < 30; ++t) {
    const Index e = layer.router().expert_of(ids[static_cast<std::size_t>(t)], 4);
    ASSERT_EQ(layer.routing().index[static_cast<std::size_t>(t)], e) << "token " << t;
    if (layer.plan().slot[static_cast<std::size_t>(t)] == Plan::no_slot) continue;
    expected.row(t) = reference_expert(xd, t, e, gate, values("experts.up"), values("experts.down"), 5, u, biases);
  }
  EXPECT_LT(TestFixture::error(y, expected.cast<T>()), 10 * layer_tolerance<TypeParam>);
  EXPECT_EQ(layer.balance_loss(), T(0));
}

// Central differences of Σ(y ⊙ dy) for x and every expert parameter (double); float: the double
// layer's gradients to float precision.
TYPED_TEST(HashCombo, GradientsAreRight) {
  using T = typename TestFixture::T;
  auto layer = TestFixture::make(9);
  const auto x = TestFixture::random(9, 5);
  const auto dy = TestFixture::random(9, 6);
  if constexpr (std::same_as<T, double>) {
    for (const auto& report : check_gradients(layer, x, dy)) EXPECT_LT(report.error, 1e-6) << report.name;
  } else {
    auto exact = TestFixture::template make<rebind<TypeParam, double>>(9);
    copy_parameters(exact, layer);
    expect_gradients_as_exact(layer, exact, x, dy, 5 * layer_tolerance<TypeParam>);
  }
}

TYPED_TEST(HashCombo, OneThreadAndManyGiveTheSameBits) {
  const auto x = TestFixture::random(40, 8);
  const auto dy = TestFixture::random(40, 9);
  expect_same_bits_on_one_and_eight_threads([] { return TestFixture::make(40); }, x, dy);
}

// The grouped GEMM against the per-expert loop with the same parameters.
TYPED_TEST(HashCombo, GroupedGemmAndPerExpertLoopAgree) {
  using Twin = rebind<TypeParam, typename TestFixture::T, typename twin_expert<typename TestFixture::X>::type>;
  auto layer = TestFixture::make(13);
  auto twin = TestFixture::template make<Twin>(13);
  copy_parameters(twin, layer);
  const auto x = TestFixture::random(13, 12);
  const auto dy = TestFixture::random(13, 13);
  expect_twins_agree(layer, twin, x, dy, layer_tolerance<TypeParam>);
}

// No tokens: no output, no gradient. Buffers reused across batch sizes leak nothing.
TYPED_TEST(HashCombo, EmptyBatchAndRepeatedSteps) {
  using T = typename TestFixture::T;
  auto layer = TestFixture::make(0);
  EXPECT_EQ(layer.forward(Matrix<T>(0, 6)).rows(), 0);
  EXPECT_EQ(layer.backward(Matrix<T>(0, 6)).rows(), 0);
  for (const auto& g : layer.gradients())
    for (T v : g.values()) ASSERT_EQ(v, T(0)) << g.name();
  const auto small = TestFixture::random(5, 20), large = TestFixture::random(30, 21);
  layer.set_token_ids(TestFixture::ids(5));
  const Matrix<T> first = layer.forward(small);
  const Matrix<T> first_dx = layer.backward(small);
  layer.set_token_ids(TestFixture::ids(30));
  layer.forward(large);
  layer.backward(large);
  layer.zero_grad();
  layer.set_token_ids(TestFixture::ids(5));
  EXPECT_EQ(first, layer.forward(small));
  EXPECT_EQ(first_dx, layer.backward(small));
}

}  // namespace moekit::test
