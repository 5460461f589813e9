// bf16 products with an expert that computes only in the layer's scalar.
#include <moekit/moekit.hpp>
int main() {
  moekit::MoELayer<moekit::TopK<2>, moekit::PerExpertLoop, moekit::bf16> layer({.hidden = 4, .ffn = 4, .experts = 4});
}
