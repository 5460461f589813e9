// The layer tests over the policies that shape selection (Sinkhorn, AuxFree) or drop (Capacity).
#include "combo_test.hpp"

namespace moekit::test {
INSTANTIATE_TYPED_TEST_SUITE_P(Selection, LayerCombo, SelectionCombos<TopK<2>>, ComboName);
}  // namespace moekit::test
