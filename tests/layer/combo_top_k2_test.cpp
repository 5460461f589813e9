// Every balancer × expert × scalar with TopK<2>, and its int8 layers forward only; the balancers
// that need noisy gating (Shazeer's losses).
#include "combo_test.hpp"

namespace moekit::test {
INSTANTIATE_TYPED_TEST_SUITE_P(TopK2, LayerCombo, Combos<TopK<2>>, ComboName);
INSTANTIATE_TYPED_TEST_SUITE_P(TopK2, InferenceCombo, InferenceCombos<TopK<2>>, ComboName);
INSTANTIATE_TYPED_TEST_SUITE_P(NoisyGating, LayerCombo, NoisyGatingCombos, ComboName);
}  // namespace moekit::test
