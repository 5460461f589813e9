#pragma once
// Upcycling: a layer's experts built from a trained dense FFN, as Megatron-Core's upcycling does
// it (sparse upcycling with granularity 1, granular upcycling above). docs/policies/upcycling.md
#include <algorithm>
#include <cmath>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include <moekit/core/error.hpp>
#include <moekit/core/tensor.hpp>
#include <moekit/expert/activation.hpp>

namespace moekit {

/// A trained dense FFN as the models store it: gate and up [F_dense, H] (no gate for activations
/// without one: leave it empty), down [H, F_dense]. y = down · act(gate · x, up · x).
template <Scalar T>
struct DenseFfn {
  Matrix<T> gate, up, down;
};

struct UpcycleOptions {
  /// g: each copy of the dense FFN is split into g experts of F_dense / g columns; E / g copies.
  Index granularity = 1;
};

/// How much upcycle() scales every expert weight by: Megatron-Core's s = A^(1/3) for a gated
/// activation (A^(1/2) otherwise) with A = g when the router normalises its top-k weights and
/// A = (E / g) · g² / k when it does not. docs/policies/upcycling.md
inline double upcycle_weight_scale(bool gated, bool normalize, Index experts, Index top_k, Index granularity) {
  const double g = static_cast<double>(granularity), copies = static_cast<double>(experts) / g;
  const double a = normalize ? g : copies * g * g / static_cast<double>(top_k);
  return std::pow(a, gated ? 1.0 / 3.0 : 1.0 / 2.0);
}

/// Sets the layer's experts from a dense FFN: expert j is shard j mod g (F_dense / g columns of the
/// FFN's hidden width: rows of gate and up, columns of down) of copy j / g, every weight times
/// upcycle_weight_scale() and down also over the router's top-k scale (its weights then sum to 1
/// where they are normalised; down is linear, so that is undone exactly). The router keeps its
/// first E / g rows (and logit biases), each repeated g times, so the shards of one copy tie and
/// are chosen together. Every other parameter (a shared expert's) is left as it is. With a normalising router and K a multiple of g the layer then
/// computes the dense FFN, exactly for g = 1 and for activations that scale with their input
/// (ReLU).
template <class Layer>
void upcycle(Layer& layer, const DenseFfn<typename Layer::scalar_type>& dense, UpcycleOptions options = {}) {
  using T = typename Layer::scalar_type;
  using X = typename Layer::expert_type;
  using A = typename X::activation;
  if constexpr (requires { X::bias; })
    static_assert(X::bias == ExpertBias::none,
                  "moekit::upcycle: experts with biases; upcycling builds experts without biases from a dense FFN");
  static_assert(requires(const Layer& l) {
    l.router().options.normalize;
    l.router().options.scale;
  }, "moekit::upcycle: the router must have TopK's options (normalize, scale), which choose the weights' scale");
  const auto& shape = layer.shape();
  const Index g = options.granularity, ffn = shape.ffn, hidden = shape.hidden, experts = shape.experts;
  require(g >= 1 && experts % g == 0, "moekit::upcycle: granularity = ", g, " with ", experts,
          " experts; expected a divisor of the experts");
  require(dense.up.rows() == g * ffn && dense.up.cols() == hidden, "moekit::upcycle: up is [", dense.up.rows(), ",",
          dense.up.cols(), "]; expected [", g * ffn, ",", hidden, "] (granularity ", g, " × the layer's ffn ", ffn,
          ", its hidden)");
  require(dense.down.rows() == hidden && dense.down.cols() == g * ffn, "moekit::upcycle: down is [", dense.down.rows(),
          ",", dense.down.cols(), "]; expected [", hidden, ",", g * ffn, "]");
  if constexpr (A::gated)
    require(dense.gate.rows() == g * ffn && dense.gate.cols() == hidden, "moekit::upcycle: gate is [",
            dense.gate.rows(), ",", dense.gate.cols(), "]; expected [", g * ffn, ",", hidden, "] for ", A::name);
  else
    require(dense.gate.size() == 0, "moekit::upcycle: a gate [", dense.gate.rows(), ",", dense.gate.cols(),
            "] for ", A::name, ", which has none; expected an empty gate");

  const auto& router = layer.router().options;
  const double s = upcycle_weight_scale(A::gated, router.normalize, experts, Layer::top_k, g);
  std::vector<Tensor<T>> whole;
  for (const Tensor<T>& p : std::as_const(layer).parameters()) {
    const std::string& name = p.name();
    if (name == "router.weight" || name == "router.logit_bias") {  // replicated: whole on every rank
      Tensor<T> t = p;
      const Index width = p.size() / experts;
      for (Index j = 0; j < experts; ++j)
        std::copy_n(p.data() + (j / g) * width, width, t.data() + j * width);
      whole.push_back(std::move(t));
    } else if (name == "experts.gate" || name == "experts.up" || name == "experts.down") {
      Tensor<T> t(name, {experts, p.shape()[1], p.shape()[2]});
      const Matrix<T>& w = name == "experts.gate" ? dense.gate : name == "experts.up" ? dense.up : dense.down;
      for (Index j = 0; j < experts; ++j) {
        const Index first = (j % g) * ffn;
        if (name == "experts.down")
          t.slice(j) = static_cast<T>(s / router.scale) * w.middleCols(first, ffn);
        else
          t.slice(j) = static_cast<T>(s) * w.middleRows(first, ffn);
      }
      whole.push_back(std::move(t));
    } else {
      whole.push_back(p);
    }
  }
  layer.assign_whole(whole);
}

}  // namespace moekit
