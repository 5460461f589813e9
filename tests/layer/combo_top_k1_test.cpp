// Every balancer × expert × scalar with TopK<1>, and its int8 layers forward only.
#include "combo_test.hpp"

namespace moekit::test {
INSTANTIATE_TYPED_TEST_SUITE_P(TopK1, LayerCombo, Combos<TopK<1>>, ComboName);
INSTANTIATE_TYPED_TEST_SUITE_P(TopK1, InferenceCombo, InferenceCombos<TopK<1>>, ComboName);
}  // namespace moekit::test
