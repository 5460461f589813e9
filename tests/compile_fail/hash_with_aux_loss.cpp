// Hash routing has no scores; the aux loss reads them.
#include <moekit/moekit.hpp>
int main() {
  moekit::MoELayer<moekit::Hash, moekit::AuxLoss> layer({.hidden = 4, .ffn = 4, .experts = 4});
}
