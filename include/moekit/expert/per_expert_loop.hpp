#pragma once
#include <span>
#include <string_view>
#include <vector>

#include <moekit/core/concepts.hpp>
#include <moekit/expert/activation.hpp>

namespace moekit {

/// The reference expert: one token at a time, plain loops, one thread, nothing saved (backward
/// recomputes). Slow and obviously right; GroupedGemm is tested against it.
/// docs/policies/expert.md#perexpertloop
template <Activation Act, ExpertBias Bias = ExpertBias::none>
struct PerExpertLoopType {
  using policy_kind = expert_kind;
  using activation = Act;
  static constexpr std::string_view name = "PerExpertLoop";
  static constexpr ExpertBias bias = Bias;

  template <Scalar T>
  struct Saved {
    std::vector<T> gate, up, hidden;  // [F] one token's values
  };

  static std::vector<ParameterSpec> parameters(const LayerShape& s, Index local_experts) {
    return detail::ffn_parameters<Act, Bias>(s, local_experts);
  }

  void validate(const LayerShape&) const {}

  template <Scalar T>
  void forward(std::span<const Tensor<T>> weights, ConstMatrixRef<T> rows,
               std::span<const Index> offsets, MatrixRef<T> out, Saved<T>& saved, Workspace<T>&) const {
    for_each_row(weights, rows, offsets, saved, [&](Index e, Index r) {
      const auto down = weights[Slot::down].slice(e);
      for (Index h = 0; h < rows.cols(); ++h) {
        T sum = bias_of(weights, Slot::down_bias, e, h);
        for (Index f = 0; f < down.cols(); ++f) sum += down(h, f) * saved.hidden[f];
        out(r, h) = sum;
      }
    });
  }

  /// Row by row: each row is recomputed from its values, which are then overwritten by d_rows
  /// one element at a time, each after its last read.
  template <Scalar T>
  void backward(std::span<const Tensor<T>> weights, MatrixRef<T> rows, std::span<const Index> offsets,
                Saved<T>& saved, ConstMatrixRef<T> d_out, std::span<Tensor<T>> grads, Workspace<T>&) const {
    for_each_row<T>(weights, rows, offsets, saved, [&](Index e, Index r) {
      const auto down = weights[Slot::down].slice(e), up = weights[Slot::up].slice(e);
      auto d_down = grads[Slot::down].slice(e), d_up = grads[Slot::up].slice(e);
      const Index width = down.cols();
      if constexpr (Slot::biased)
        for (Index h = 0; h < rows.cols(); ++h) grads[Slot::down_bias].matrix()(e, h) += d_out(r, h);
      for (Index f = 0; f < width; ++f) {
        T d_hidden = 0;
        for (Index h = 0; h < rows.cols(); ++h) {
          d_hidden += down(h, f) * d_out(r, h);
          d_down(h, f) += d_out(r, h) * saved.hidden[f];
        }
        // d_hidden → d(up·x) and, for gated units, d(gate·x); stored over the forward values.
        if constexpr (Act::gated) {
          const T g = saved.gate[f], u = saved.up[f];
          saved.gate[f] = d_hidden * detail::gated_up<Act>(u) * Act::derivative(g);
          saved.up[f] = d_hidden * Act::apply(g) * detail::gated_up_derivative<Act>(u);
        } else {
          saved.up[f] = d_hidden * Act::derivative(saved.up[f]);
        }
        if constexpr (Slot::biased) {
          grads[Slot::up_bias].matrix()(e, f) += saved.up[f];
          if constexpr (Act::gated) grads[Slot::gate_bias].matrix()(e, f) += saved.gate[f];
        }
      }
      for (Index h = 0; h < rows.cols(); ++h) {
        T sum = 0;
        for (Index f = 0; f < width; ++f) {
          sum += saved.up[f] * up(f, h);
          d_up(f, h) += saved.up[f] * rows(r, h);
          if constexpr (Act::gated) {
            sum += saved.gate[f] * weights[Slot::gate].slice(e)(f, h);
            grads[Slot::gate].slice(e)(f, h) += saved.gate[f] * rows(r, h);
          }
        }
        rows(r, h) = sum;  // d_rows
      }
    });
  }

 private:
  using Slot = detail::FfnSlots<Act, Bias>;

  /// Expert e's bias in `slot` at column i; 0 without biases.
  template <Scalar T>
  static T bias_of(std::span<const Tensor<T>> weights, int slot, Index e, Index i) {
    if constexpr (Slot::biased) return weights[static_cast<std::size_t>(slot)].matrix()(e, i);
    else return T(0);
  }

  /// Computes one row's gate·x, up·x and hidden into saved, then calls body(expert, row).
  template <Scalar T, class Body>
  static void for_each_row(std::span<const Tensor<T>> weights, ConstMatrixRef<T> rows,
                           std::span<const Index> offsets, Saved<T>& saved, Body body) {
    const auto width = static_cast<std::size_t>(weights[Slot::up].shape()[1]);
    saved.gate.resize(width);
    saved.up.resize(width);
    saved.hidden.resize(width);
    for (std::size_t e = 0; e + 1 < offsets.size(); ++e) {
      const auto up = weights[Slot::up].slice(static_cast<Index>(e));
      for (Index r = offsets[e]; r < offsets[e + 1]; ++r) {
        for (std::size_t f = 0; f < width; ++f) {
          const auto expert = static_cast<Index>(e), column = static_cast<Index>(f);
          T u = bias_of(weights, Slot::up_bias, expert, column), g = 0;
          if constexpr (Act::gated) g = bias_of(weights, Slot::gate_bias, expert, column);
          for (Index h = 0; h < rows.cols(); ++h) {
            u += up(static_cast<Index>(f), h) * rows(r, h);
            if constexpr (Act::gated)
              g += weights[Slot::gate].slice(static_cast<Index>(e))(static_cast<Index>(f), h) * rows(r, h);
          }
          saved.up[f] = u;
          saved.gate[f] = g;
          saved.hidden[f] = Act::gated ? Act::apply(g) * detail::gated_up<Act>(u) : Act::apply(u);
        }
        body(static_cast<Index>(e), r);
      }
    }
  }
};

/// SwiGLU reference experts.
using PerExpertLoop = PerExpertLoopType<SwiGLU>;

static_assert(Expert<PerExpertLoop>);
static_assert(Expert<PerExpertLoopType<ClampedSwiGLU, ExpertBias::projections>>);

}  // namespace moekit
