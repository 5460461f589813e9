#pragma once
// The expert networks' activations, and the parameters an FFN expert of each kind owns.
//   gated (SwiGLU):   y = down · (act(gate · x) ⊙ (up · x))      experts.gate, .up [E,F,H]; .down [E,H,F]
//   plain (GeLU, ReLU): y = down · act(up · x)                   experts.up [E,F,H]; .down [E,H,F]
#include <cmath>
#include <numbers>
#include <string_view>
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
};

/// The exact (erf) GeLU.
struct GeLU {
  static constexpr std::string_view name = "GeLU";
  static constexpr bool gated = false;
  template <Scalar T>
  static T apply(T g) { return T(0.5) * g * (T(1) + std::erf(g * T(std::numbers::sqrt2 / 2))); }
  template <Scalar T>
  static T derivative(T g) {
    const T cdf = T(0.5) * (T(1) + std::erf(g * T(std::numbers::sqrt2 / 2)));
    const T pdf = std::exp(T(-0.5) * g * g) * T(std::numbers::inv_sqrtpi / std::numbers::sqrt2);
    return cdf + g * pdf;
  }
};

struct ReLU {
  static constexpr std::string_view name = "ReLU";
  static constexpr bool gated = false;
  template <Scalar T>
  static T apply(T g) { return g > T(0) ? g : T(0); }
  template <Scalar T>
  static T derivative(T g) { return g > T(0) ? T(1) : T(0); }
};

template <class A>
concept Activation = requires(double g) {
  { A::name } -> std::convertible_to<std::string_view>;
  { A::gated } -> std::convertible_to<bool>;
  { A::apply(g) } -> std::same_as<double>;
  { A::derivative(g) } -> std::same_as<double>;
};

namespace detail {

/// Positions of an FFN expert's tensors in its parameter list.
template <Activation A>
struct FfnSlots {
  static constexpr int gate = 0;  // gated only
  static constexpr int up = A::gated ? 1 : 0;
  static constexpr int down = up + 1;
};

template <Activation A>
std::vector<ParameterSpec> ffn_parameters(const LayerShape& s, Index local_experts) {
  std::vector<ParameterSpec> specs;
  if constexpr (A::gated) specs.push_back({"experts.gate", {local_experts, s.ffn, s.hidden}});
  specs.push_back({"experts.up", {local_experts, s.ffn, s.hidden}});
  specs.push_back({"experts.down", {local_experts, s.hidden, s.ffn}});
  return specs;
}

}  // namespace detail
}  // namespace moekit
