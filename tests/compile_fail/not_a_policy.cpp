// A type of no kind.
#include <moekit/moekit.hpp>
struct NotAPolicy {};
int main() {
  moekit::MoELayer<moekit::TopK<2>, NotAPolicy> layer({.hidden = 4, .ffn = 4, .experts = 4});
}
