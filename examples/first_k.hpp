#pragma once
// A user-written router: always the first K experts, with equal weights. It uses only moekit's
// public names; examples/custom_router.cpp runs it in a layer, and
// tests/laws/custom_router_laws_test.cpp runs it through the router law suite.
#include <moekit/moekit.hpp>

template <int K>
struct FirstK {
  using policy_kind = moekit::router_kind;
  static constexpr std::string_view name = "FirstK";
  static constexpr int top_k = K;
  void validate(const moekit::LayerShape& s) const {
    moekit::require(K <= s.experts, "FirstK: K = ", K, "; expected K <= ", s.experts);
  }
  moekit::ScoreFn score_function() const { return moekit::ScoreFn::softmax; }
  template <moekit::Scalar T> void score(moekit::MatrixRef<T>) const {}
  template <moekit::Scalar T>
  void select(moekit::ConstMatrixRef<T>, moekit::ConstMatrixRef<T> scores, moekit::Routing<T>& out) const {
    out.resize(scores.rows(), K);
    for (moekit::Index c = 0; c < out.choices(); ++c) {
      out.index[c] = c % K;
      out.weight[c] = T(1) / K;
    }
  }
  template <moekit::Scalar T>
  void backward(moekit::ConstMatrixRef<T>, const moekit::Routing<T>&, std::span<const T>,
                moekit::MatrixRef<T> d_logits) const { d_logits.setZero(); }
};
static_assert(moekit::Router<FirstK<2>>);
