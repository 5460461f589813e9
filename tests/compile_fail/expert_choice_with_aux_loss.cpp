// The aux loss counts each token's top K; Expert Choice has none (and its load is even).
#include <moekit/moekit.hpp>
int main() {
  moekit::MoELayer<moekit::ExpertChoice, moekit::Balanced<moekit::ZLoss, moekit::AuxLoss>> layer(
      {.hidden = 4, .ffn = 4, .experts = 4});
}
