// Every balancer × expert × scalar with TopK<4>, and its int8 layers forward only.
#include "combo_test.hpp"

namespace moekit::test {
INSTANTIATE_TYPED_TEST_SUITE_P(TopK4, LayerCombo, Combos<TopK<4>>, ComboName);
INSTANTIATE_TYPED_TEST_SUITE_P(TopK4, InferenceCombo, InferenceCombos<TopK<4>>, ComboName);
}  // namespace moekit::test
