// moekit's products and thread loops, compiled once for a whole program: the one optional source
// file of the header-only library. Compile it once (CMake: link moekit::kernels, which does it and
// defines MOEKIT_COMPILED_KERNELS for the rest), and define MOEKIT_COMPILED_KERNELS in every other
// translation unit: they then take the products from here instead of compiling them each, and
// parse no TBB header (docs/getting_started.md#compile-time). Compile it with the same
// MOEKIT_VECTOR_DISPATCH and vector flags (-march) as the rest of the program.
#ifndef MOEKIT_COMPILED_KERNELS
#define MOEKIT_COMPILED_KERNELS 1
#endif
#define MOEKIT_DEFINE_THREADS 1
#include <moekit/core/detail/gemm.hpp>
#include <moekit/core/detail/threads.hpp>

namespace moekit::detail {
MOEKIT_GEMM_INSTANCES(, float)
MOEKIT_GEMM_INSTANCES(, double)
}  // namespace moekit::detail
