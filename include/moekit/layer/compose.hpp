#pragma once
// MoELayer<Ps...>: finds each kind among the arguments in any order, fills in defaults, and
// stops a bad list with one readable message. Hana does the type-level search; the checks are
// plain class templates so that the compiler names the offending type in one short error.
#include <type_traits>

#include <boost/hana/append.hpp>
#include <boost/hana/filter.hpp>
#include <boost/hana/front.hpp>
#include <boost/hana/length.hpp>
#include <boost/hana/tuple.hpp>
#include <boost/hana/type.hpp>

#include <moekit/balance/aux_loss.hpp>
#include <moekit/layer/compatibility.hpp>
#include <moekit/core/concepts.hpp>
#include <moekit/dispatch/dropless.hpp>
#include <moekit/expert/grouped_gemm.hpp>
#include <moekit/expert/shared.hpp>
#include <moekit/parallel/single_process.hpp>
#include <moekit/router/top_k.hpp>

namespace moekit {

template <Scalar T, Router R, Balancer B, Dispatcher D, Expert X, Parallel P, SharedExpert S = NoSharedExpert>
class BasicMoELayer;

/// What MoELayer<Ps...> names when its arguments are wrong; the static_assert above it says why.
/// It takes any constructor arguments, so that the static_assert is the only error.
struct InvalidLayer {
  template <class... Args>
  explicit InvalidLayer(const LayerConfig&, Args&&...) {}
};

namespace detail {

namespace hana = boost::hana;

/// One argument of MoELayer. A failed check here names the type: "In instantiation of
/// 'struct moekit::detail::require_policy<YourType>'".
template <class P>
struct require_policy {
  static constexpr bool known = Policy<P> || Scalar<P>;
  static constexpr bool router_ok = !DeclaresKind<P, router_kind> || Router<P>;
  static constexpr bool balancer_ok = !DeclaresKind<P, balancer_kind> || Balancer<P>;
  static constexpr bool dispatcher_ok = !DeclaresKind<P, dispatcher_kind> || Dispatcher<P>;
  static constexpr bool expert_ok = !DeclaresKind<P, expert_kind> || Expert<P>;
  static constexpr bool parallel_ok = !DeclaresKind<P, parallel_kind> || Parallel<P>;
  static constexpr bool shared_ok = !DeclaresKind<P, shared_expert_kind> || SharedExpert<P>;
  static_assert(known,
                "moekit::MoELayer: this argument is not a moekit policy; expected a type that "
                "declares a policy_kind (such as TopK<2>, AuxLoss, Dropless, GroupedGemm, "
                "SingleProcess, bf16) or the scalar float or double; see docs/writing_a_policy.md");
  static_assert(router_ok,
                "moekit::MoELayer: this type declares router_kind but does not model "
                "moekit::Router; see docs/policies/router.md for the members it needs");
  static_assert(balancer_ok,
                "moekit::MoELayer: this type declares balancer_kind but does not model "
                "moekit::Balancer; see docs/policies/balance.md for the members it needs");
  static_assert(dispatcher_ok,
                "moekit::MoELayer: this type declares dispatcher_kind but does not model "
                "moekit::Dispatcher; see docs/policies/dispatch.md for the members it needs");
  static_assert(expert_ok,
                "moekit::MoELayer: this type declares expert_kind but does not model "
                "moekit::Expert; see docs/policies/expert.md for the members it needs");
  static_assert(parallel_ok,
                "moekit::MoELayer: this type declares parallel_kind but does not model "
                "moekit::Parallel; see docs/policies/parallel.md for the members it needs");
  static_assert(shared_ok,
                "moekit::MoELayer: this type declares shared_expert_kind but does not model "
                "moekit::SharedExpert; see docs/policies/expert.md#shared-experts for the members it needs");
  static constexpr bool value =
      known && router_ok && balancer_ok && dispatcher_ok && expert_ok && parallel_ok && shared_ok;
};

struct scalar_kind {};

/// Expert X with its products in precision P: GroupedGemm's own, and a shared expert's through
/// the expert it holds. An expert with no precision of its own takes only the layer's scalar.
template <class X, Precision P>
struct with_precision {
  static_assert(P == Precision::scalar,
                "moekit::MoELayer: bf16 and int8 products are computed by GroupedGemm (routed, or in "
                "Shared<>); this expert policy computes in the layer's scalar only");
  using type = X;
};
template <Activation A, ExpertBias B, Precision Q, Precision P>
struct with_precision<GroupedGemmType<A, B, Q>, P> {
  using type = GroupedGemmType<A, B, P == Precision::scalar ? Q : P>;
};
template <SharedGate G, Expert X, Precision P>
struct with_precision<Shared<G, X>, P> {
  using type = Shared<G, typename with_precision<X, P>::type>;
};
template <Precision P>
struct with_precision<NoSharedExpert, P> {
  using type = NoSharedExpert;
};

template <class P, class Kind>
constexpr bool is_of_kind = [] {
  if constexpr (std::is_same_v<Kind, scalar_kind>)
    return Scalar<P>;
  else
    return DeclaresKind<P, Kind>;
}();

/// The arguments of one kind: how many there are, and the first of them or the default.
template <class Kind, class Default, class... Ps>
struct find_kind {
  static constexpr auto matches = hana::filter(hana::tuple_t<Ps...>, [](auto t) {
    return hana::bool_c<is_of_kind<typename decltype(t)::type, Kind>>;
  });
  static constexpr std::size_t count = decltype(hana::length(matches))::value;
  using type = typename decltype(+hana::front(hana::append(matches, hana::type_c<Default>)))::type;
};

template <class... Ps>
struct compose {
  using router = find_kind<router_kind, TopK<2>, Ps...>;
  using balancer = find_kind<balancer_kind, AuxLoss, Ps...>;
  using dispatcher = find_kind<dispatcher_kind, Dropless, Ps...>;
  using expert = find_kind<expert_kind, GroupedGemm, Ps...>;
  using parallel = find_kind<parallel_kind, SingleProcess, Ps...>;
  using shared = find_kind<shared_expert_kind, NoSharedExpert, Ps...>;
  using scalar = find_kind<scalar_kind, float, Ps...>;
  using precision = find_kind<precision_kind, ProductPrecision<Precision::scalar>, Ps...>;

  static constexpr bool all_known = (require_policy<Ps>::value && ...);
  static_assert(router::count <= 1,
                "moekit::MoELayer: two Router policies given; pass at most one (e.g. TopK<2>)");
  static_assert(balancer::count <= 1,
                "moekit::MoELayer: two Balancer policies given; pass at most one (e.g. AuxLoss)");
  static_assert(dispatcher::count <= 1,
                "moekit::MoELayer: two Dispatcher policies given; pass at most one (e.g. Dropless)");
  static_assert(expert::count <= 1,
                "moekit::MoELayer: two Expert policies given; pass at most one (e.g. GroupedGemm)");
  static_assert(parallel::count <= 1,
                "moekit::MoELayer: two Parallel policies given; pass at most one (e.g. SingleProcess)");
  static_assert(shared::count <= 1,
                "moekit::MoELayer: two SharedExpert policies given; pass at most one (e.g. Shared<>)");
  static_assert(scalar::count <= 1,
                "moekit::MoELayer: two scalar types given; pass at most one of float or double");

  static_assert(precision::count <= 1,
                "moekit::MoELayer: two precisions given; pass at most one (e.g. bf16)");
  static constexpr Precision products = precision::type::value;
  static constexpr bool precision_fits_scalar =
      products == Precision::scalar || std::is_same_v<typename scalar::type, float>;
  static_assert(precision_fits_scalar,
                "moekit::MoELayer: bf16 and int8 products give float results (bf16 with float master "
                "weights); the layer's scalar is double: leave out double or the precision");

  static constexpr bool compatible =
      require_compatible<typename router::type, typename balancer::type, typename dispatcher::type>::value;

  static constexpr bool valid = all_known && compatible && router::count <= 1 && balancer::count <= 1 &&
                                dispatcher::count <= 1 && expert::count <= 1 &&
                                parallel::count <= 1 && shared::count <= 1 && scalar::count <= 1 &&
                                precision::count <= 1 && precision_fits_scalar;

  // Lazy, so that a rejected list never names BasicMoELayer with arguments it cannot take.
  template <class = void>
  struct layer {
    using type = BasicMoELayer<typename scalar::type, typename router::type,
                               typename balancer::type, typename dispatcher::type,
                               typename with_precision<typename expert::type, products>::type,
                               typename parallel::type,
                               typename with_precision<typename shared::type, products>::type>;
  };
  using type = typename std::conditional_t<valid, layer<>, std::type_identity<InvalidLayer>>::type;
};

}  // namespace detail

/// An MoE layer from policies in any order; a kind left out gets its default (TopK<2>,
/// AuxLoss, Dropless, GroupedGemm, SingleProcess, NoSharedExpert, float). A precision (bf16, int8)
/// is not a kind of its own: it puts the experts' products, routed and shared, in that precision.
/// The same policies in another order name the same type.
template <class... Policies>
using MoELayer = typename detail::compose<Policies...>::type;

}  // namespace moekit
