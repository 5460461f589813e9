// Sinkhorn among a balancer's terms, with capacity drops: the forbidden pair all the same.
#include <moekit/moekit.hpp>
int main() {
  moekit::MoELayer<moekit::TopK<2>, moekit::Balanced<moekit::Sinkhorn, moekit::ZLoss>, moekit::Capacity> layer(
      {.hidden = 4, .ffn = 4, .experts = 4});
}
