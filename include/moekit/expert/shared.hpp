#pragma once
// Shared experts: an always-on expert beside the routed ones, run on every token and added to
// the layer's output (DeepSeek's, unscaled; Qwen2-MoE's, scaled per token by σ(x·w)).
// docs/policies/expert.md#shared-experts
#include <cmath>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <moekit/core/concepts.hpp>
#include <moekit/core/error.hpp>
#include <moekit/core/token_loops.hpp>
#include <moekit/expert/grouped_gemm.hpp>

namespace moekit {

/// No shared expert: the layer's output is the routed experts' alone. The default.
struct NoSharedExpert {
  using policy_kind = shared_expert_kind;
  static constexpr std::string_view name = "NoSharedExpert";
  static constexpr bool present = false;
  template <Scalar T>
  struct Saved {};

  static std::vector<ParameterSpec> parameters(const LayerShape&) { return {}; }

  void validate(const LayerShape& shape) const {
    require(shape.shared_ffn == 0, "moekit::MoELayer: shared_ffn = ", shape.shared_ffn,
            " with no shared expert; expected 0, or a Shared<> policy among the layer's policies");
  }
};

/// How a shared expert's output is scaled for each token.
enum class SharedGate {
  none,     // y += shared(x)                    (DeepSeek-V2/V3, Llama 4)
  sigmoid,  // y += σ(x · w_gate) · shared(x)    (Qwen2-MoE): w_gate is shared.output_gate [1,H]
};

/// One expert of width LayerConfig::shared_ffn run on every token, computed by the expert
/// policy X (GroupedGemm: one block of all T rows), added to y. Its parameters are those of X
/// for one expert, named shared.* ([1,F_s,H] for gate and up, [1,H,F_s] for down; a file may
/// hold them without the leading 1, as Hugging Face's do), and shared.output_gate [1,H] when
/// gated. Over expert-parallel ranks every rank holds it whole and runs it on its own tokens;
/// its gradients are reduced as the router's are.
template <SharedGate G = SharedGate::none, Expert X = GroupedGemm>
struct Shared {
  using policy_kind = shared_expert_kind;
  using expert_type = X;
  static constexpr std::string_view name = G == SharedGate::none ? "Shared" : "SharedSigmoidGated";
  static constexpr bool present = true;
  static constexpr SharedGate gate = G;

  X expert{};  // the expert policy, with its own options (GroupedGemm's tiles)

  /// What forward keeps for backward: the expert's, its output (for the gate's gradient) and
  /// the gate σ(x·w) per token.
  template <Scalar T>
  struct Saved {
    typename X::template Saved<T> expert;
    detail::Buffer<T> out, rows;  // [T,H] the expert's output; backward: x, then d_x
    std::vector<T> gate;          // [T]
  };

  static std::vector<ParameterSpec> parameters(const LayerShape& shape) {
    std::vector<ParameterSpec> specs = X::parameters({shape.hidden, shape.shared_ffn, 1, 1, 0}, 1);
    for (auto& spec : specs) spec.name = "shared." + spec.name.substr(spec.name.find('.') + 1);
    if constexpr (G == SharedGate::sigmoid) specs.push_back({"shared.output_gate", {1, shape.hidden}});
    return specs;
  }

  void validate(const LayerShape& shape) const {
    require(shape.shared_ffn >= 1, "moekit::Shared: shared_ffn = ", shape.shared_ffn,
            "; expected the shared expert's width, at least 1 (LayerConfig::shared_ffn)");
    expert.validate({shape.hidden, shape.shared_ffn, 1, 1, 0});
  }

  /// An expert that keeps its own form of its weights (int8) makes it from them.
  template <Scalar T>
    requires requires(X& x, std::span<const Tensor<T>> w) { x.template prepare<T>(w); }
  void prepare(std::span<const Tensor<T>> weights) {
    expert.template prepare<T>(expert_weights(weights));
  }

  /// y += g ⊙ shared(x), g = 1 or σ(x·w) per token.                         x, y [T,H]
  template <Scalar T>
  void forward(std::span<const Tensor<T>> weights, ConstMatrixRef<T> x, MatrixRef<T> y, Saved<T>& saved,
               Workspace<T>& workspace) const {
    const Index tokens = x.rows();
    auto out = saved.out.matrix(tokens, x.cols());
    const Index offsets[2] = {0, tokens};
    expert.template forward<T>(expert_weights(weights), x, offsets, out, saved.expert, workspace);
    if constexpr (G == SharedGate::sigmoid) {
      saved.gate.resize(static_cast<std::size_t>(tokens));
      const auto w = weights.back().matrix();
      for_each_token(tokens, [&](Index t) {
        const T a = x.row(t).dot(w.row(0));
        const T g = T(1) / (T(1) + std::exp(-a));
        saved.gate[static_cast<std::size_t>(t)] = g;
        y.row(t) += g * out.row(t);
      });
    } else {
      detail::for_each_block(tokens, token_block, [&](Index first, Index n) { y.middleRows(first, n) += out.middleRows(first, n); });
    }
  }

  /// The shared expert's gradients from dy, added into grads; returns its d_x [T,H], which the
  /// layer adds into dx. x is the forward's input, dy the layer's output gradient.
  template <Scalar T>
  ConstMatrixMap<T> backward(std::span<const Tensor<T>> weights, ConstMatrixRef<T> x, ConstMatrixRef<T> dy,
                             Saved<T>& saved, std::span<Tensor<T>> grads, Workspace<T>& workspace) const {
    const Index tokens = x.rows(), hidden = x.cols();
    auto d_out = saved.out.matrix(tokens, hidden);  // gated: the output, read once more, becomes d_out
    auto rows = saved.rows.matrix(tokens, hidden);
    if constexpr (G == SharedGate::sigmoid) {
      // d_out = g·dy; d_a = g(1−g)·(dy·out) per token; d_w = Σ_t d_a·x_t; d_x gets d_a·w below.
      std::vector<T>& d_a = saved.gate;  // g, overwritten with d_a
      for_each_token(tokens, [&](Index t) {
        const T g = saved.gate[static_cast<std::size_t>(t)];
        const T d_g = dy.row(t).dot(d_out.row(t));
        d_out.row(t) = g * dy.row(t);
        d_a[static_cast<std::size_t>(t)] = d_g * g * (T(1) - g);
      });
      const ConstMatrixMap<T> d_a_row(d_a.data(), 1, tokens);
      grads.back().matrix().noalias() += d_a_row * x;
    }
    detail::for_each_block(tokens, token_block, [&](Index first, Index n) { rows.middleRows(first, n) = x.middleRows(first, n); });
    const Index offsets[2] = {0, tokens};
    // Ungated, the expert's output gradient is dy itself: no copy of it is made.
    const ConstMatrixRef<T> d_expert_out = G == SharedGate::sigmoid ? ConstMatrixRef<T>(d_out) : dy;
    expert.template backward<T>(expert_weights(weights), rows, offsets, saved.expert, d_expert_out,
                                 expert_weights(grads), workspace);
    if constexpr (G == SharedGate::sigmoid) {
      const auto w = weights.back().matrix();
      const std::vector<T>& d_a = saved.gate;
      for_each_token(tokens, [&](Index t) { rows.row(t) += d_a[static_cast<std::size_t>(t)] * w.row(0); });
    }
    return ConstMatrixMap<T>(rows.data(), tokens, hidden);
  }

 private:
  static constexpr Index token_block = 256;

  /// The expert's own tensors: all but the gate's weight.
  template <class Tensors>
  static Tensors expert_weights(Tensors weights) {
    return G == SharedGate::sigmoid ? weights.first(weights.size() - 1) : weights;
  }
};

}  // namespace moekit
