// bf16 products in a double layer.
#include <moekit/moekit.hpp>
int main() {
  moekit::MoELayer<moekit::TopK<2>, double, moekit::bf16> layer({.hidden = 4, .ffn = 4, .experts = 4});
}
