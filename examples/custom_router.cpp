// A user-written router (examples/first_k.hpp), used in a layer.
#include "first_k.hpp"

#include <cstdio>

int main() {
  moekit::MoELayer<FirstK<2>, moekit::NoBalance> layer({.hidden = 8, .ffn = 8, .experts = 4});
  const moekit::Matrix<float> y = layer.forward(moekit::Matrix<float>::Random(5, 8));
  std::printf("FirstK: tokens per expert %ld %ld %ld %ld\n", long(layer.tokens_per_expert()[0]),
              long(layer.tokens_per_expert()[1]), long(layer.tokens_per_expert()[2]),
              long(layer.tokens_per_expert()[3]));
  return y.allFinite() ? 0 : 1;
}
