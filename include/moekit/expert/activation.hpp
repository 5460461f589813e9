#pragma once
// The expert networks' activations, and the parameters an FFN expert of each kind owns.
//   gated (SwiGLU):   y = down · (act(gate · x) ⊙ (up · x))      experts.gate, .up [E,F,H]; .down [E,H,F]
//   (ClampedSwiGLU also maps up · x through its own v: act(gate · x) ⊙ v(up · x))
//   plain (GeLU, ReLU): y = down · act(up · x)                   experts.up [E,F,H]; .down [E,H,F]
#include <Eigen/Core>
#include <unsupported/Eigen/SpecialFunctions>  // Eigen::internal::perf: GeLU's packet form

#include <algorithm>
#include <concepts>
#include <cmath>
#include <numbers>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include <moekit/core/routing.hpp>
#include <moekit/core/tensor.hpp>

namespace moekit {

/// silu(g) ⊙ u: the gated unit of Mixtral, Qwen2-MoE and DeepSeek-V3 experts.
struct SwiGLU {
  static constexpr std::string_view name = "SwiGLU";
  static constexpr bool gated = true;
  template <Scalar T>
  static T apply(T g) { return g / (T(1) + std::exp(-g)); }
  template <Scalar T>
  static T derivative(T g) {
    const T s = T(1) / (T(1) + std::exp(-g));
    return s * (T(1) + g * (T(1) - s));
  }
  // The same in Eigen's packets, for GroupedGemm's passes over its tiles. Eigen's pexp is as
  // accurate as std::exp and, with AVX2 or AVX-512, several times faster than a call per element.
  template <class Packet>
  static Packet apply_packet(const Packet& g) {
    return Eigen::internal::pdiv(g, one_plus_exp_minus(g));
  }
  template <class Packet>
  static Packet derivative_packet(const Packet& g) {
    return derivative_from(g, one_plus_exp_minus(g));
  }
  /// Both at once, for the backward pass: one exp, not two; the same bits as each alone.
  template <class Packet>
  static std::pair<Packet, Packet> apply_and_derivative_packet(const Packet& g) {
    const Packet d = one_plus_exp_minus(g);
    return {Eigen::internal::pdiv(g, d), derivative_from(g, d)};
  }

 private:
  template <class Packet>
  static Packet one_plus_exp_minus(const Packet& g) {
    namespace ei = Eigen::internal;
    return ei::padd(ei::pset1<Packet>(1), ei::pexp(ei::pnegate(g)));
  }
  /// σ(g) · (1 + g · (1 − σ(g))), with σ(g) = 1 / d.
  template <class Packet>
  static Packet derivative_from(const Packet& g, const Packet& d) {
    namespace ei = Eigen::internal;
    const Packet one = ei::pset1<Packet>(1);
    const Packet s = ei::pdiv(one, d);
    return ei::pmul(s, ei::padd(one, ei::pmul(g, ei::psub(one, s))));
  }
};

namespace detail {
/// A packet of Eigen's whose lanes hold floats.
template <class Packet>
concept FloatPacket = std::same_as<typename Eigen::internal::unpacket_traits<Packet>::type, float>;
}  // namespace detail

/// The exact (erf) GeLU: g · Φ(g).
struct GeLU {
  static constexpr std::string_view name = "GeLU";
  static constexpr bool gated = false;
  template <Scalar T>
  static T apply(T g) { return g * cdf(g); }
  template <Scalar T>
  static T derivative(T g) { return cdf(g) + g * pdf(g); }
  // The same in packets of float, for GroupedGemm's passes over its tiles, through Eigen's
  // vectorised erf (a rational fit, within 3.4e-7 of erf where std::erf in float is within 5e-8),
  // many times faster than std::erf element by element (docs/kernels.md#gelu-packets). Doubles
  // keep std::erf: Eigen's packet erf is the float fit whatever the lanes hold.
  template <detail::FloatPacket Packet>
  static Packet apply_packet(const Packet& g) {
    return Eigen::internal::pmul(g, cdf(g));
  }
  template <detail::FloatPacket Packet>
  static Packet derivative_packet(const Packet& g) {
    return Eigen::internal::pmadd(g, pdf(g), cdf(g));
  }
  /// Both at once, for the backward pass: one erf, not two; the same bits as each alone.
  template <detail::FloatPacket Packet>
  static std::pair<Packet, Packet> apply_and_derivative_packet(const Packet& g) {
    const Packet c = cdf(g);
    return {Eigen::internal::pmul(g, c), Eigen::internal::pmadd(g, pdf(g), c)};
  }

 private:
  /// Φ(g) = (1 + erf(g / √2)) / 2, and φ(g) = exp(−g² / 2) / √(2π): element or packet.
  template <class V>
  static V cdf(const V& g) {
    namespace ei = Eigen::internal;
    using T = typename ei::unpacket_traits<V>::type;
    const V half = ei::pset1<V>(T(0.5));
    if constexpr (std::is_same_v<V, T>) return half * (T(1) + std::erf(g * T(std::numbers::sqrt2 / 2)));
    else return ei::pmadd(half, ei::perf(ei::pmul(g, ei::pset1<V>(T(std::numbers::sqrt2 / 2)))), half);
  }
  template <class V>
  static V pdf(const V& g) {
    namespace ei = Eigen::internal;
    using T = typename ei::unpacket_traits<V>::type;
    const V scale = ei::pset1<V>(T(std::numbers::inv_sqrtpi / std::numbers::sqrt2));
    if constexpr (std::is_same_v<V, T>) return std::exp(T(-0.5) * g * g) * scale;
    else return ei::pmul(ei::pexp(ei::pmul(ei::pset1<V>(T(-0.5)), ei::pmul(g, g))), scale);
  }
};

struct ReLU {
  static constexpr std::string_view name = "ReLU";
  static constexpr bool gated = false;
  template <Scalar T>
  static T apply(T g) { return g > T(0) ? g : T(0); }
  template <Scalar T>
  static T derivative(T g) { return g > T(0) ? T(1) : T(0); }
  template <class Packet>
  static Packet apply_packet(const Packet& g) {
    return Eigen::internal::pmax(g, Eigen::internal::pzero(g));
  }
  template <class Packet>
  static Packet derivative_packet(const Packet& g) {
    namespace ei = Eigen::internal;
    return ei::pand(ei::pcmp_lt(ei::pzero(g), g), ei::pset1<Packet>(1));
  }
};

/// GPT-OSS's gated unit: the gate clamped from above and the up clamped both ways at ±limit,
/// act(g) = min(g, 7) · σ(1.702 · min(g, 7)) and v(u) = clamp(u, −7, 7) + 1, hidden = act(g) ⊙ v(u).
/// Past a clamp the derivative is 0. Element by element (no packet forms).
struct ClampedSwiGLU {
  static constexpr std::string_view name = "ClampedSwiGLU";
  static constexpr bool gated = true;
  static constexpr double alpha = 1.702, limit = 7.0;
  template <Scalar T>
  static T apply(T g) {
    const T c = std::min(g, T(limit));
    return c / (T(1) + std::exp(-T(alpha) * c));
  }
  template <Scalar T>
  static T derivative(T g) {
    if (g > T(limit)) return T(0);
    const T s = T(1) / (T(1) + std::exp(-T(alpha) * g));
    return s * (T(1) + T(alpha) * g * (T(1) - s));
  }
  /// The up projection's own map, and its derivative.
  template <Scalar T>
  static T up(T u) { return std::clamp(u, T(-limit), T(limit)) + T(1); }
  template <Scalar T>
  static T up_derivative(T u) { return u < T(-limit) || u > T(limit) ? T(0) : T(1); }
};

template <class A>
concept Activation = requires(double g) {
  { A::name } -> std::convertible_to<std::string_view>;
  { A::gated } -> std::convertible_to<bool>;
  { A::apply(g) } -> std::same_as<double>;
  { A::derivative(g) } -> std::same_as<double>;
};

/// Whether an FFN expert's projections carry biases: x·W_gateᵀ + b_gate, x·W_upᵀ + b_up and
/// h·W_downᵀ + b_down (GPT-OSS), held as experts.gate_bias and experts.up_bias [E,F] and
/// experts.down_bias [E,H].
enum class ExpertBias {
  none,         // no biases (Mixtral, Qwen, DeepSeek, OLMoE, Llama 4)
  projections,  // a bias on each of gate, up and down
};

namespace detail {

/// A gated activation that maps the up projection too (ClampedSwiGLU): hidden = act(g) ⊙ v(u).
template <class A>
concept MapsUp = requires(double u) {
  { A::up(u) } -> std::same_as<double>;
  { A::up_derivative(u) } -> std::same_as<double>;
};

/// v(u) and v'(u) of a gated activation: u and 1 for those that do not map it.
template <class A, class T>
T gated_up(T u) {
  if constexpr (MapsUp<A>) return A::up(u);
  else return u;
}
template <class A, class T>
T gated_up_derivative(T u) {
  if constexpr (MapsUp<A>) return A::up_derivative(u);
  else return T(1);
}

/// Positions of an FFN expert's tensors in its parameter list: the weights, then their biases.
template <Activation A, ExpertBias B = ExpertBias::none>
struct FfnSlots {
  static constexpr int gate = 0;  // gated only
  static constexpr int up = A::gated ? 1 : 0;
  static constexpr int down = up + 1;
  static constexpr bool biased = B == ExpertBias::projections;
  static constexpr int gate_bias = down + 1;  // gated, biased only
  static constexpr int up_bias = A::gated ? down + 2 : down + 1;
  static constexpr int down_bias = up_bias + 1;
};

template <Activation A, ExpertBias B = ExpertBias::none>
std::vector<ParameterSpec> ffn_parameters(const LayerShape& s, Index local_experts) {
  std::vector<ParameterSpec> specs;
  if constexpr (A::gated) specs.push_back({"experts.gate", {local_experts, s.ffn, s.hidden}});
  specs.push_back({"experts.up", {local_experts, s.ffn, s.hidden}});
  specs.push_back({"experts.down", {local_experts, s.hidden, s.ffn}});
  if constexpr (B == ExpertBias::projections) {
    if constexpr (A::gated) specs.push_back({"experts.gate_bias", {local_experts, s.ffn}});
    specs.push_back({"experts.up_bias", {local_experts, s.ffn}});
    specs.push_back({"experts.down_bias", {local_experts, s.hidden}});
  }
  return specs;
}

/// An activation with packet forms of apply and derivative (apply_packet, derivative_packet).
/// Those without one (GeLU in double) run element by element.
template <class A, class T>
concept PacketActivation = requires(const typename Eigen::internal::packet_traits<T>::type& p) {
  { A::apply_packet(p) } -> std::same_as<std::remove_cvref_t<decltype(p)>>;
  { A::derivative_packet(p) } -> std::same_as<std::remove_cvref_t<decltype(p)>>;
};

template <bool vectorised, class T>
struct PacketOf {
  using type = T;
};
template <class T>
struct PacketOf<true, T> {  // not std::conditional_t: GCC drops a vector type's attributes there
  using type = typename Eigen::internal::packet_traits<T>::type;
};

/// How a pass over a tile applies Act: a packet at a time where it has packet forms, else an
/// element at a time (a "packet" of one T; Eigen's packet functions take plain scalars too).
template <Activation Act, class T>
struct Lanes {
  static constexpr bool vectorised = PacketActivation<Act, T>;
  using Packet = typename PacketOf<vectorised, T>::type;
  static constexpr Index size = vectorised ? Eigen::internal::packet_traits<T>::size : 1;

  static Packet apply(const Packet& v) {
    if constexpr (vectorised) return Act::apply_packet(v);
    else return Act::apply(v);
  }
  static Packet derivative(const Packet& v) {
    if constexpr (vectorised) return Act::derivative_packet(v);
    else return Act::derivative(v);
  }
  /// {act(v), act'(v)}, from one pass where the activation shares work between them.
  static std::pair<Packet, Packet> apply_and_derivative(const Packet& v) {
    if constexpr (vectorised && requires { Act::apply_and_derivative_packet(v); })
      return Act::apply_and_derivative_packet(v);
    else return {apply(v), derivative(v)};
  }
  /// count ≤ size values; the lanes past them are zero. Every element thus goes through the same
  /// arithmetic wherever it lies in the block: the same bits for any cut into tiles.
  static Packet load(const T* p, Index count) {
    if (count == size) return Eigen::internal::ploadu<Packet>(p);
    T padded[size] = {};
    std::copy_n(p, count, padded);
    return Eigen::internal::ploadu<Packet>(padded);
  }
  static void store(T* p, const Packet& v, Index count) {
    if (count == size) return Eigen::internal::pstoreu(p, v);
    T all[size];
    Eigen::internal::pstoreu(all, v);
    std::copy_n(all, count, p);
  }
  /// body(pointers into each block, count) over the rows of same-shaped row-major blocks, `size`
  /// columns at a time (count = size but at a row's end).
  template <class Body, class First, class... Rest>
  static void runs(Body body, First& first, Rest&... rest) {
    static_assert(First::IsRowMajor && (Rest::IsRowMajor && ...), "the passes go along rows");
    for (Index i = 0; i < first.rows(); ++i)
      for (Index j = 0; j < first.cols(); j += size)
        body(first.data() + i * first.outerStride() + j, rest.data() + i * rest.outerStride() + j...,
             std::min(size, first.cols() - j));
  }
};

/// hidden = act(gate) ⊙ up (⊙ v(up) for an activation that maps it), over same-shaped blocks of
/// one expert's tile.
template <Activation Act, class G, class U, class H>
void activate_gated(const G& gate, const U& up, H&& hidden) {
  using L = Lanes<Act, typename G::Scalar>;
  if constexpr (MapsUp<Act>) {  // element by element
    static_assert(!L::vectorised, "an activation that maps up has no packet forms");
    L::runs([](const auto* g, const auto* u, auto* h, Index n) {
      for (Index i = 0; i < n; ++i) h[i] = Act::apply(g[i]) * Act::up(u[i]);
    }, gate, up, hidden);
  } else {
    L::runs([](const auto* g, const auto* u, auto* h, Index n) {
      L::store(h, Eigen::internal::pmul(L::apply(L::load(g, n)), L::load(u, n)), n);
    }, gate, up, hidden);
  }
}

/// hidden = act(up).
template <Activation Act, class U, class H>
void activate(const U& up, H&& hidden) {
  using L = Lanes<Act, typename U::Scalar>;
  L::runs([](const auto* u, auto* h, Index n) { L::store(h, L::apply(L::load(u, n)), n); }, up, hidden);
}

/// d_hidden back through act(gate) ⊙ up, in place: gate ← d_hidden ⊙ up ⊙ act'(gate) and
/// up ← d_hidden ⊙ act(gate).
template <Activation Act, class G, class U, class D>
void activate_gated_backward(G&& gate, U&& up, const D& d_hidden) {
  using L = Lanes<Act, typename D::Scalar>;
  namespace ei = Eigen::internal;
  if constexpr (MapsUp<Act>) {  // gate ← d ⊙ v(up) ⊙ act'(gate), up ← d ⊙ act(gate) ⊙ v'(up)
    L::runs([](auto* g, auto* u, const auto* d, Index n) {
      for (Index i = 0; i < n; ++i) {
        const auto gv = g[i], uv = u[i];
        g[i] = d[i] * Act::up(uv) * Act::derivative(gv);
        u[i] = d[i] * Act::apply(gv) * Act::up_derivative(uv);
      }
    }, gate, up, d_hidden);
    return;
  }
  L::runs([](auto* g, auto* u, const auto* d, Index n) {
    const auto gv = L::load(g, n), uv = L::load(u, n), dh = L::load(d, n);
    const auto [act, act_derivative] = L::apply_and_derivative(gv);
    L::store(g, ei::pmul(ei::pmul(dh, uv), act_derivative), n);
    L::store(u, ei::pmul(dh, act), n);
  }, gate, up, d_hidden);
}

/// d_hidden back through act(up), in place: up ← d_hidden ⊙ act'(up).
template <Activation Act, class U, class D>
void activate_backward(U&& up, const D& d_hidden) {
  using L = Lanes<Act, typename D::Scalar>;
  L::runs([](auto* u, const auto* d, Index n) {
    L::store(u, Eigen::internal::pmul(L::load(d, n), L::derivative(L::load(u, n))), n);
  }, up, d_hidden);
}

}  // namespace detail
}  // namespace moekit
