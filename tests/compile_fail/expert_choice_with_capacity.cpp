// Each expert already takes exactly C tokens under Expert Choice; a capacity would drop from that.
#include <moekit/moekit.hpp>
int main() {
  moekit::MoELayer<moekit::ExpertChoice, moekit::NoBalance, moekit::Capacity> layer({.hidden = 4, .ffn = 4, .experts = 4});
}
