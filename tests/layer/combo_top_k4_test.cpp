// Every balancer × expert × scalar with TopK<4>.
#include "combo_test.hpp"

namespace moekit::test {
INSTANTIATE_TYPED_TEST_SUITE_P(TopK4, LayerCombo, Combos<TopK<4>>, ComboName);
}  // namespace moekit::test
