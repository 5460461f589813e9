#pragma once
// The typed-test matrix: for one router, every balancer × expert × scalar, as ::testing::Types,
// named by the layer ("TopK2_AuxLoss_Dropless_GroupedGemmSwiGLU_SingleProcess_f32").
#include <gtest/gtest.h>

#include <string>
#include <tuple>
#include <utility>

#include <moekit/moekit.hpp>

namespace moekit::test {

template <class R, class B, class X>
using per_scalar = std::tuple<MoELayer<R, B, X, float>, MoELayer<R, B, X, double>>;

template <class R, class B>
using per_expert = decltype(std::tuple_cat(
    std::declval<per_scalar<R, B, GroupedGemm>>(), std::declval<per_scalar<R, B, GroupedGemmType<GeLU>>>(),
    std::declval<per_scalar<R, B, GroupedGemmType<ReLU>>>(), std::declval<per_scalar<R, B, PerExpertLoop>>()));

template <class R>
using per_router = decltype(std::tuple_cat(std::declval<per_expert<R, AuxLoss>>(),
                                           std::declval<per_expert<R, NoBalance>>()));

template <class Tuple>
struct as_gtest_types;

/// The balancers and dispatchers that shape selection or drop, with the default and the
/// reference expert: Sinkhorn and AuxFree with Dropless; AuxLoss, NoBalance and AuxFree with
/// Capacity (Sinkhorn with Capacity does not compile).
template <class R, class B, class D>
using per_scalar_d = std::tuple<MoELayer<R, B, D, GroupedGemm, float>, MoELayer<R, B, D, GroupedGemm, double>,
                                MoELayer<R, B, D, PerExpertLoop, float>, MoELayer<R, B, D, PerExpertLoop, double>>;
template <class R>
using per_router_selection = decltype(std::tuple_cat(
    std::declval<per_scalar_d<R, Sinkhorn, Dropless>>(), std::declval<per_scalar_d<R, AuxFree, Dropless>>(),
    std::declval<per_scalar_d<R, AuxLoss, Capacity>>(), std::declval<per_scalar_d<R, NoBalance, Capacity>>(),
    std::declval<per_scalar_d<R, AuxFree, Capacity>>()));
template <class... Ts>
struct as_gtest_types<std::tuple<Ts...>> {
  using type = ::testing::Types<Ts...>;
};

/// Every combination of the policies shipped so far with router R, in float and double.
template <class R>
using Combos = typename as_gtest_types<per_router<R>>::type;

/// The selection-shaping and dropping policies with router R.
template <class R>
using SelectionCombos = typename as_gtest_types<per_router_selection<R>>::type;

struct ComboName {
  template <class Layer>
  static std::string GetName(int) {
    return Layer::name();
  }
};

/// The same layer with the other expert implementation of the same activation.
template <class X>
struct twin_expert;
template <class A>
struct twin_expert<GroupedGemmType<A>> {
  using type = PerExpertLoopType<A>;
};
template <class A>
struct twin_expert<PerExpertLoopType<A>> {
  using type = GroupedGemmType<A>;
};

template <class Layer, class T = typename Layer::scalar_type,
          class X = typename Layer::expert_type>
using rebind = BasicMoELayer<T, typename Layer::router_type, typename Layer::balancer_type,
                             typename Layer::dispatcher_type, X, typename Layer::parallel_type>;

/// Copies every parameter across scalar types.
template <class To, class From>
void copy_parameters(To& to, const From& from) {
  for (std::size_t p = 0; p < from.parameters().size(); ++p) {
    const auto src = from.parameters()[p].values();
    auto dst = to.parameters()[p].values();
    for (std::size_t i = 0; i < src.size(); ++i) dst[i] = static_cast<typename To::scalar_type>(src[i]);
  }
}

}  // namespace moekit::test
