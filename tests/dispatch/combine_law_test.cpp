// With identity experts, combine(dispatch(x)) = Σ_k w_k · x over the kept choices, and the
// input gradient is the same sum applied to dy: for every dispatcher and setting, on many random
// routings and shapes (T = 0 and 1, E = 1, all tokens to one expert).
#include <gtest/gtest.h>

#include <random>

#include <moekit/moekit.hpp>

namespace moekit::test {
namespace {

/// An expert that returns its rows unchanged, and owns no parameters.
struct IdentityExperts {
  using policy_kind = expert_kind;
  static constexpr std::string_view name = "IdentityExperts";
  template <Scalar T>
  struct Saved {};
  static std::vector<ParameterSpec> parameters(const LayerShape&, Index) { return {}; }
  void validate(const LayerShape&) const {}
  template <Scalar T>
  void forward(std::span<const Tensor<T>>, ConstMatrixRef<T> rows, std::span<const Index>,
               MatrixRef<T> out, Saved<T>&, Workspace<T>&) const { out = rows; }
  template <Scalar T>
  void backward(std::span<const Tensor<T>>, MatrixRef<T> rows, std::span<const Index>, Saved<T>&,
                ConstMatrixRef<T> d_out, std::span<Tensor<T>>, Workspace<T>&) const { rows = d_out; }
};
static_assert(Expert<IdentityExperts>);

template <class D>
void expect_identity_law(const D& dispatcher, unsigned seed) {
  std::mt19937 rng(seed);
  const Index experts = 1 + static_cast<Index>(rng() % 6);
  const Index tokens = static_cast<Index>(rng() % 25);
  MoELayer<TopK<1>, NoBalance, D, IdentityExperts, double> layer({.hidden = 3, .ffn = 1, .experts = experts, .seed = seed},
                                                                  dispatcher);
  if (seed % 5 == 0) layer.parameter("router.weight").set_zero();  // all tokens tie: expert 0 takes all
  std::normal_distribution<double> draw;
  Matrix<double> x(tokens, 3), dy(tokens, 3);
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = draw(rng), dy.data()[i] = draw(rng);
  const Matrix<double> y = layer.forward(x);
  layer.zero_grad();
  const Matrix<double> dx = layer.backward(dy);
  const Matrix<double> logits = x * layer.parameter("router.weight").matrix().transpose();
  for (Index t = 0; t < tokens; ++t) {
    const Index slot = layer.plan().slot[static_cast<std::size_t>(t)];
    const double w = slot == Plan::no_slot ? 0.0 : layer.routing().weight[static_cast<std::size_t>(t)];
    EXPECT_LT((y.row(t) - w * x.row(t)).cwiseAbs().maxCoeff(), 1e-14);
    // dx = w·dy through the experts, plus the router's part through w.
    const Matrix<double> router_part = dx.row(t) - w * dy.row(t);
    if (slot == Plan::no_slot) {
      EXPECT_TRUE(router_part.isZero(0));  // dropped: no gradient at all
    }
  }
}

TEST(CombineLaw, IdentityExpertsGiveBackTheWeightedInput) {
  for (unsigned seed = 0; seed < 60; ++seed) {
    expect_identity_law(Dropless{}, seed);
    expect_identity_law(Capacity{{.capacity_factor = 0.5}}, seed);
    expect_identity_law(Capacity{{.capacity_factor = 0.75, .drop = DropPolicy::position, .pad = true}}, seed);
    expect_identity_law(Capacity{{.capacity_factor = 0}}, seed);
  }
}

}  // namespace
}  // namespace moekit::test
