// backward through an int8 layer: int8 layers are for inference.
#include <moekit/moekit.hpp>
int main() {
  moekit::MoELayer<moekit::TopK<2>, moekit::int8> layer({.hidden = 4, .ffn = 4, .experts = 4});
  const moekit::Matrix<float> dy = moekit::Matrix<float>::Zero(2, 4);
  layer.backward(dy);
}
