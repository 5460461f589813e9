#include <moekit/moekit.hpp>

#include <cstdio>

int main() {
  moekit::MoELayer<moekit::TopK<2>, moekit::AuxLoss, moekit::Dropless, moekit::GroupedGemm> layer(
      {.hidden = 8, .ffn = 16, .experts = 4});
  const moekit::Matrix<float> x = moekit::Matrix<float>::Random(5, 8);
  const auto y = layer.forward(x);
  const auto dx = layer.backward(y);
  std::printf("consumer: y %ldx%ld, dx %ldx%ld\n", long(y.rows()), long(y.cols()), long(dx.rows()), long(dx.cols()));
  return y.allFinite() && dx.allFinite() ? 0 : 1;
}
