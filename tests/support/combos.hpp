#pragma once
// The typed-test matrix of the layer tests, from one list per kind: for one router, every
// balancer with the default expert and every expert with the default balancer, each in every
// scalar and precision, and the selection-shaping pairs, as ::testing::Types named by the layer
// ("TopK2_AuxLoss_Dropless_GroupedGemmSwiGLU_SingleProcess_f32"). The balancers and the experts
// vary around the default rather than in product: a balancer meets only the router's scores and
// choices, an expert only its rows, so each pairing beyond one would test nothing new and cost
// minutes of compilation.
#include <gtest/gtest.h>
#include <tbb/global_control.h>

#include <cstring>
#include <string>
#include <vector>

#include <moekit/io/hf_block.hpp>
#include <moekit/moekit.hpp>

#include "exact_twin.hpp"

namespace moekit::test {

template <class... Ts>
struct List {};

// ---- the layer tests' matrix: a new policy is one line in one of these lists -------------------

/// Balancers run with Dropless and the default expert (the first of each expert list), in every
/// scalar and precision; the first is the default balancer.
using Balancers = List<AuxLoss, ZLoss, Balanced<AuxLoss, ZLoss>, ImportanceLoss, NoBalance>;
/// Experts run with Dropless and the default balancer, in every scalar.
using Experts = List<GroupedGemm, GroupedGemmType<GeLU>, GroupedGemmType<ReLU>,
                    GroupedGemmType<ClampedSwiGLU, ExpertBias::projections>, PerExpertLoop>;
using Scalars = List<float, double>;
/// Experts run in reduced precision (bf16 products, int8 weights; a float layer) with the
/// default balancer.
using ReducedPrecisionExperts = List<GroupedGemm, GroupedGemmType<ClampedSwiGLU, ExpertBias::projections>>;
/// The balancers and dispatchers that shape selection or drop, as (balancer, dispatcher) pairs,
/// run with SelectionExperts (Sinkhorn with Capacity does not compile).
using SelectionPairs = List<List<Sinkhorn, Dropless>, List<AuxFree, Dropless>, List<Balanced<AuxFree, SeqAuxLoss>, Dropless>,
                            List<AuxLoss, Capacity>,
                            List<NoBalance, Capacity>, List<AuxFree, Capacity>>;
/// The default expert and the reference one.
using SelectionExperts = List<GroupedGemm, PerExpertLoop>;
/// Balancers that read noisy gating's logits (Shazeer's losses), run with TopK<2>'s noisy router
/// settings only, the default expert and every scalar.
using NoisyGatingBalancers = List<Balanced<ImportanceLoss, LoadLoss>>;

// ---- the products of the lists ----------------------------------------------------------------

template <class... Lists>
struct concat;
template <>
struct concat<> {
  using type = List<>;
};
template <class... A>
struct concat<List<A...>> {
  using type = List<A...>;
};
template <class... A, class... B, class... Rest>
struct concat<List<A...>, List<B...>, Rest...> : concat<List<A..., B...>, Rest...> {};

/// MoELayer<R, Ps..., X, S>.
template <class R, class Ps, class X, class S>
struct layer_of;
template <class R, class... Ps, class X, class S>
struct layer_of<R, List<Ps...>, X, S> {
  using type = MoELayer<R, Ps..., X, S>;
};

/// The layer of R, Ps and X with every scalar S.
template <class R, class Ps, class X, class Ss>
struct every_scalar;
template <class R, class Ps, class X, class... S>
struct every_scalar<R, Ps, X, List<S...>> {
  using type = List<typename layer_of<R, Ps, X, S>::type...>;
};

/// The layer of R and Ps with every expert X and scalar S.
template <class R, class Ps, class Xs = Experts, class Ss = Scalars>
struct every_expert_and_scalar;
template <class R, class Ps, class... X, class Ss>
struct every_expert_and_scalar<R, Ps, List<X...>, Ss> : concat<typename every_scalar<R, Ps, X, Ss>::type...> {};

/// The first of a list, and the rest.
template <class L>
struct first_and_rest;
template <class First, class... Rest>
struct first_and_rest<List<First, Rest...>> {
  using first = First;
  using rest = List<Rest...>;
};

/// With router R and precision policies Qs (none, bf16 or int8): every balancer with the default
/// expert, and every other expert with the default balancer, in the scalars Ss.
template <class R, class Bs, class Xs, class Ss, class... Qs>
struct around_the_default;
template <class R, class... B, class Xs, class Ss, class... Qs>
struct around_the_default<R, List<B...>, Xs, Ss, Qs...>
    : concat<typename every_expert_and_scalar<R, List<B, Qs...>, List<typename first_and_rest<Xs>::first>, Ss>::type...,
             typename every_expert_and_scalar<R, List<typename first_and_rest<List<B...>>::first, Qs...>,
                                              typename first_and_rest<Xs>::rest, Ss>::type> {};

template <class R, class Bs>
struct every_balancer
    : concat<typename around_the_default<R, Bs, Experts, Scalars>::type,
             typename around_the_default<R, Bs, ReducedPrecisionExperts, List<float>, bf16>::type> {};

/// The layers that run forward only: int8 experts.
template <class R, class Bs>
struct every_int8_balancer : around_the_default<R, Bs, ReducedPrecisionExperts, List<float>, int8> {};

template <class R, class Pairs>
struct every_pair;
template <class R, class... Pair>
struct every_pair<R, List<Pair...>>
    : concat<typename every_expert_and_scalar<R, Pair, SelectionExperts>::type...> {};

template <class L>
struct as_gtest_types;
template <class... Ts>
struct as_gtest_types<List<Ts...>> {
  using type = ::testing::Types<Ts...>;
};

/// Every balancer × expert × scalar with router R.
template <class R>
using Combos = typename as_gtest_types<typename every_balancer<R, Balancers>::type>::type;

/// Every balancer × int8 expert with router R (forward only: InferenceCombo).
template <class R>
using InferenceCombos = typename as_gtest_types<typename every_int8_balancer<R, Balancers>::type>::type;

/// The selection-shaping and dropping pairs with router R.
template <class R>
using SelectionCombos = typename as_gtest_types<typename every_pair<R, SelectionPairs>::type>::type;

template <class Bs>
struct every_noisy_gating_balancer;
template <class... B>
struct every_noisy_gating_balancer<List<B...>>
    : concat<typename every_expert_and_scalar<TopK<2>, List<B, Dropless>, List<GroupedGemm>>::type...> {};

/// NoisyGatingBalancers with TopK<2>.
using NoisyGatingCombos =
    typename as_gtest_types<typename every_noisy_gating_balancer<NoisyGatingBalancers>::type>::type;

struct ComboName {
  template <class Layer>
  static std::string GetName(int) {
    return Layer::name();
  }
};

/// The same layer with the other expert implementation of the same activation (in the layer's
/// scalar: the twin of bf16 products is the exact loop).
template <class X>
struct twin_expert;
template <class A, ExpertBias B, Precision P>
struct twin_expert<GroupedGemmType<A, B, P>> {
  using type = PerExpertLoopType<A, B>;
};
template <class A, ExpertBias B>
struct twin_expert<PerExpertLoopType<A, B>> {
  using type = GroupedGemmType<A, B>;
};

/// The same layer in scalar T (a double one computes every product in double: no bf16 products)
/// or with expert X.
template <class Layer, class T = typename Layer::scalar_type,
          class X = std::conditional_t<std::same_as<T, double>, typename exact_twin<typename Layer::expert_type>::type,
                                       typename Layer::expert_type>>
using rebind = BasicMoELayer<T, typename Layer::router_type, typename Layer::balancer_type,
                             typename Layer::dispatcher_type, X, typename Layer::parallel_type,
                             typename Layer::shared_expert_type>;

/// Copies every parameter across scalar types.
template <class To, class From>
void copy_parameters(To& to, const From& from) {
  for (std::size_t p = 0; p < from.parameters().size(); ++p) {
    const auto src = from.parameters()[p].values();
    auto dst = to.parameters()[p].values();
    for (std::size_t i = 0; i < src.size(); ++i) dst[i] = static_cast<typename To::scalar_type>(src[i]);
  }
}

/// One training step of a float layer and of `exact`, its double twin with the same parameters, on
/// the same x and dy: dx and every parameter's gradient within `bound` of the exact ones.
template <class Layer, class Exact>
void expect_gradients_as_exact(Layer& layer, Exact& exact, const Matrix<typename Layer::scalar_type>& x,
                               const Matrix<typename Layer::scalar_type>& dy, double bound) {
  using T = typename Layer::scalar_type;
  layer.forward(x);
  const Matrix<T> dx = layer.backward(dy);
  exact.forward(x.template cast<double>());
  const Matrix<T> dx_exact = exact.backward(dy.template cast<double>()).template cast<T>();
  EXPECT_LT(io::relative_error(std::span<const T>(dx.data(), dx.size()), std::span<const T>(dx_exact.data(), dx_exact.size())),
            bound);
  for (std::size_t p = 0; p < layer.gradients().size(); ++p)
    EXPECT_LT(io::relative_error(layer.gradients()[p].values(), exact.gradients()[p].values()), bound)
        << layer.gradients()[p].name();
}

/// y, dx and every parameter's gradient of one training step, end to end: what "the same bits"
/// compares.
template <class Layer>
std::vector<typename Layer::scalar_type> step_results(Layer& layer, const Matrix<typename Layer::scalar_type>& x,
                                                      const Matrix<typename Layer::scalar_type>& dy) {
  using T = typename Layer::scalar_type;
  const Matrix<T> y = layer.forward(x);
  const Matrix<T> dx = layer.backward(dy);
  std::vector<T> all(y.data(), y.data() + y.size());
  all.insert(all.end(), dx.data(), dx.data() + dx.size());
  for (const auto& g : layer.gradients()) all.insert(all.end(), g.values().begin(), g.values().end());
  return all;
}

/// A layer from make() gives the same bits of y, dx and every gradient on 1 thread and on 8.
template <class Make, class T>
void expect_same_bits_on_one_and_eight_threads(Make make, const Matrix<T>& x, const Matrix<T>& dy) {
  auto run = [&](std::size_t threads) {
    tbb::global_control limit(tbb::global_control::max_allowed_parallelism, threads);
    auto layer = make();
    return step_results(layer, x, dy);
  };
  const auto one = run(1), many = run(8);
  ASSERT_EQ(one.size(), many.size());
  EXPECT_EQ(0, std::memcmp(one.data(), many.data(), one.size() * sizeof(T)));
}

/// A layer and its twin with the same parameters (the grouped GEMM and the per-expert loop): y, dx
/// and every gradient of one training step within `bound` of each other.
template <class Layer, class Twin>
void expect_twins_agree(Layer& layer, Twin& twin, const Matrix<typename Layer::scalar_type>& x,
                        const Matrix<typename Layer::scalar_type>& dy, double bound) {
  using T = typename Layer::scalar_type;
  auto error = [](const Matrix<T>& a, const Matrix<T>& b) {
    return io::relative_error(std::span<const T>(a.data(), a.size()), std::span<const T>(b.data(), b.size()));
  };
  EXPECT_LT(error(layer.forward(x), twin.forward(x)), bound);
  EXPECT_LT(error(layer.backward(dy), twin.backward(dy)), bound);
  for (std::size_t p = 0; p < layer.gradients().size(); ++p)
    EXPECT_LT(io::relative_error(layer.gradients()[p].values(), twin.gradients()[p].values()), bound)
        << layer.gradients()[p].name();
}

}  // namespace moekit::test
