#pragma once
#include <moekit/core/tensor.hpp>

namespace moekit::detail {

/// The k largest of value(0) … value(n − 1), best first, into out[0..k). Ties go to the lower
/// index, as argmax and torch.topk on CPU do; a NaN is never preferred to a number.
template <class Value>
void top_k_by(Index n, int k, Value value, Index* out) {
  int filled = 0;
  for (Index e = 0; e < n; ++e) {
    const auto v = value(e);
    if (filled == k && !(v > value(out[k - 1]))) continue;
    int pos = filled < k ? filled++ : k - 1;
    while (pos > 0 && v > value(out[pos - 1])) {
      out[pos] = out[pos - 1];
      --pos;
    }
    out[pos] = e;
  }
}

/// The k largest of row[0..n), best first, into out[0..k) (top_k_by).
template <class T>
void top_k_indices(const T* row, Index n, int k, Index* out) {
  top_k_by(n, k, [row](Index e) { return row[e]; }, out);
}

}  // namespace moekit::detail
