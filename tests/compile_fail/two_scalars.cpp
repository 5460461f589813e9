// Two scalar types.
#include <moekit/moekit.hpp>
int main() {
  moekit::MoELayer<float, moekit::TopK<2>, double> layer({.hidden = 4, .ffn = 4, .experts = 4});
}
