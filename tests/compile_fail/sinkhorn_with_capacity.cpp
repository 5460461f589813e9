// A forbidden pair: Sinkhorn balancing with capacity drops.
#include <moekit/moekit.hpp>
int main() {
  moekit::MoELayer<moekit::TopK<2>, moekit::Sinkhorn, moekit::Capacity> layer({.hidden = 4, .ffn = 4, .experts = 4});
}
