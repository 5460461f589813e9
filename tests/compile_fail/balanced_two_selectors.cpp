// Two balancing terms that both shape selection: AuxFree's bias and Sinkhorn's plan.
#include <moekit/moekit.hpp>
int main() {
  moekit::MoELayer<moekit::TopK<2>, moekit::Balanced<moekit::AuxFree, moekit::Sinkhorn>> layer(
      {.hidden = 4, .ffn = 4, .experts = 4});
}
