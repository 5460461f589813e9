// What a translation unit that builds the default layer and runs it forward costs to compile
// (scripts/compile_cost.py).
#include <moekit/moekit.hpp>

int main() {
  moekit::MoELayer<moekit::TopK<2>> layer({.hidden = 64, .ffn = 128, .experts = 8});
  const moekit::Matrix<float> x = moekit::Matrix<float>::Random(32, 64);
  const moekit::Matrix<float> y = layer.forward(x);
  return y.allFinite() ? 0 : 1;
}
