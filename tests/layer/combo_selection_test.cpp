// The layer tests over the policies that shape selection (Sinkhorn, AuxFree) or drop (Capacity).
#include "combo_test.hpp"

namespace moekit::test {
INSTANTIATE_TYPED_TEST_SUITE_P(Selection, LayerCombo, SelectionCombos<TopK<2>>, ComboName);
// Selection and dropping do not depend on the experts' precision: int8 layers are checked with
// every balancer in combo_top_k*_test.cpp.
GTEST_ALLOW_UNINSTANTIATED_PARAMETERIZED_TEST(InferenceCombo);
}  // namespace moekit::test
