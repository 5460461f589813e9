// Control: a valid composition, policies in any order, compiles.
#include <moekit/moekit.hpp>
int main() {
  moekit::MoELayer<moekit::GroupedGemm, moekit::TopK<2>, double, moekit::AuxLoss> layer(
      {.hidden = 4, .ffn = 4, .experts = 4});
  return layer.parameters().size() == 4 ? 0 : 1;
}
