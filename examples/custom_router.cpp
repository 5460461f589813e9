// A user-written router, used in a layer: always the first K experts, equal weights.
#include <moekit/moekit.hpp>

#include <cstdio>

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

int main() {
  moekit::MoELayer<FirstK<2>, moekit::NoBalance> layer({.hidden = 8, .ffn = 8, .experts = 4});
  const moekit::Matrix<float> y = layer.forward(moekit::Matrix<float>::Random(5, 8));
  std::printf("FirstK: tokens per expert %ld %ld %ld %ld\n", long(layer.tokens_per_expert()[0]),
              long(layer.tokens_per_expert()[1]), long(layer.tokens_per_expert()[2]),
              long(layer.tokens_per_expert()[3]));
  return y.allFinite() ? 0 : 1;
}
