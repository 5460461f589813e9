// The load loss reads noisy gating's logits; a router without noisy gating has none.
#include "../../examples/first_k.hpp"
int main() {
  moekit::MoELayer<FirstK<2>, moekit::LoadLoss> layer({.hidden = 4, .ffn = 4, .experts = 4});
}
