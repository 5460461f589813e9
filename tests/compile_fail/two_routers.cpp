// Two policies of one kind.
#include <moekit/moekit.hpp>
int main() {
  moekit::MoELayer<moekit::TopK<2>, moekit::TopK<1>, moekit::AuxLoss> layer({.hidden = 4, .ffn = 4, .experts = 4});
}
