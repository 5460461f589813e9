// The router of examples/first_k.hpp through the router law suite, as a user runs their own.
#include "../../examples/first_k.hpp"
#include "router_laws.hpp"

namespace moekit::laws {

using FirstKRouters = ::testing::Types<FirstK<1>, FirstK<2>, FirstK<3>>;
INSTANTIATE_TYPED_TEST_SUITE_P(Example, RouterLaws, FirstKRouters, CaseName);

}  // namespace moekit::laws
