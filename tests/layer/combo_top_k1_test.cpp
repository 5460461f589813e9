// Every balancer × expert × scalar with TopK<1>.
#include "combo_test.hpp"

namespace moekit::test {
INSTANTIATE_TYPED_TEST_SUITE_P(TopK1, LayerCombo, Combos<TopK<1>>, ComboName);
}  // namespace moekit::test
