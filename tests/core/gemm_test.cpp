// detail::gemm packs into kept buffers but must compute what Eigen's product operator computes:
// the same kernel and, up to a depth of max_packed_depth, the same blocking, so the same bits.
// Deeper products are packed in shorter blocks: they equal it up to rounding. (x · Wᵀ with a few
// rows has a kernel of its own, and so do x · Wᵀ and products into rows of B where the CPU runs
// wider vectors than the build's, and where it runs AVX-512 products into rows of B and, turned,
// x · Wᵀ past turned_past rows: vector_kernels_test.cpp. This test is built to keep to the
// build's vectors, MOEKIT_VECTOR_DISPATCH=0: in a build for AVX-512 those go to the kernels, and
// are held here to Eigen's result up to rounding.)
#include <gtest/gtest.h>

#include <moekit/core/gemm.hpp>

namespace moekit {
namespace {

using ColMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor>;

TEST(Gemm, EqualsEigensProductBitForBit) {
  detail::GemmWorkspace<float> workspace;
  // (m, n, k): tiny, single row and column (GEMV), past Eigen's 128 KiB stack blocks, odd sizes;
  // k at most max_packed_depth.
  static_assert(detail::max_packed_depth == 256);
  const Index shapes[][3] = {{1, 1, 1}, {1, 300, 200}, {300, 1, 200}, {9, 7, 3}, {64, 700, 256}, {129, 65, 251}};
  for (const auto& [m, n, k] : shapes) {
    const Matrix<float> a = Matrix<float>::Random(m, k);          // row-major
    const ColMatrix bt = ColMatrix::Random(n, k);                 // b = btᵀ, a transposed view
    Matrix<float> c = Matrix<float>::Random(m, n), expected = c;  // row-major result
    gemm_add(workspace, c, a, bt.transpose());
    expected.noalias() += a * bt.transpose();
    const bool turned = detail::widest_vector_bytes() == 64 && m > detail::turned_past;
    if (turned)
      EXPECT_TRUE(c.isApprox(expected, 1e-5f)) << m << "x" << n << "x" << k << ": row-major result, turned";
    else
      EXPECT_TRUE(c == expected) << m << "x" << n << "x" << k << ": row-major result";

    ColMatrix cc(m, n), expected_cc(m, n);  // column-major result, of blocks of larger matrices
    const Matrix<float> wide = Matrix<float>::Random(m + 2, k + 3);
    gemm(workspace, cc, wide.block(1, 2, m, k), bt.transpose());
    expected_cc.noalias() = wide.block(1, 2, m, k) * bt.transpose();
    EXPECT_TRUE(cc == expected_cc) << m << "x" << n << "x" << k << ": column-major result of a block";
  }
}

TEST(Gemm, DeepProductsMatchEigenAndPackAtMostMaxPackedDepth) {
  detail::GemmWorkspace<float> workspace;
  // k: just past one block, not a multiple of 8, and the FFN's 2816 (Eigen would pack ~1000).
  for (Index k : {257, 1031, 2816}) {
    const Index m = 256, n = 200;
    const Matrix<float> a = Matrix<float>::Random(m, k);
    const ColMatrix bt = ColMatrix::Random(n, k);
    Matrix<float> c = Matrix<float>::Random(m, n), expected = c;
    gemm_add(workspace, c, a, bt.transpose());
    expected.noalias() += a * bt.transpose();
    // Sums of k products of numbers in [-1, 1]: rounding grows like √k · ε · (size of the sum).
    EXPECT_LE((c - expected).cwiseAbs().maxCoeff(), 1e-5f * float(k)) << "k = " << k;

    const auto sizes = detail::GemmBlocks<float>::sizes(n, m, k);  // the row-major result's
    EXPECT_LE(sizes.kc, detail::max_packed_depth) << "k = " << k;
    EXPECT_LE(workspace.local().a_size() + workspace.local().b_size(),
              std::size_t(detail::max_packed_depth * (m + n)))
        << "k = " << k << ": packing buffers";
  }
}

TEST(Gemm, EmptyProductsLeaveTheResult) {
  detail::GemmWorkspace<double> workspace;
  Matrix<double> c = Matrix<double>::Ones(3, 4);
  gemm_add(workspace, c, Matrix<double>(3, 0), Matrix<double>(0, 4));
  EXPECT_TRUE(c == Matrix<double>::Ones(3, 4));
}

// The table of cases in detail::choose_kernel, row by row, on any CPU: the vectors are arguments.
TEST(Gemm, ChoosesTheKernelByTheTableOfCases) {
  using detail::ProductKernel;
  constexpr int R = Eigen::RowMajor, C = Eigen::ColMajor;
  const auto x_wt = [](Index m, Index n, Index k, int bytes, bool wider) {  // row-major x · Wᵀ into rows
    return detail::choose_kernel<R, R, C>(m, n, k, bytes, wider);
  };
  const Index past = detail::turned_past, slabs = detail::slab_rows, few = detail::few_rows;
  EXPECT_EQ(x_wt(2, 3, 4, 64, true), ProductKernel::coefficients);
  EXPECT_EQ(x_wt(past + 1, 256, 1024, 64, false), ProductKernel::turned);
  EXPECT_EQ(x_wt(past, 256, 1024, 64, false), ProductKernel::row_dots);  // up to few_rows: dot products
  EXPECT_EQ(x_wt(slabs, 256, 1024, 32, true), ProductKernel::slabs);
  EXPECT_EQ(x_wt(slabs - 1, 256, 1024, 32, true), ProductKernel::row_dots);
  EXPECT_EQ(x_wt(few, 256, 1024, 16, false), ProductKernel::row_dots);
  EXPECT_EQ(x_wt(few + 1, 256, 1024, 16, false), ProductKernel::eigen);
  EXPECT_EQ(x_wt(few + 1, 1, 1024, 16, false), ProductKernel::gemv);
  // x · Wᵀ into a column-major result: never turned nor by slabs.
  EXPECT_EQ((detail::choose_kernel<C, R, C>(past + 1, 256, 1024, 64, true)), ProductKernel::row_dots);
  // a · B into rows of a row-major B (the backward's products), a row-major or transposed.
  EXPECT_EQ((detail::choose_kernel<R, R, R>(256, 256, 1024, 64, false)), ProductKernel::broadcasts);
  EXPECT_EQ((detail::choose_kernel<R, C, R>(256, 256, 1024, 32, true)), ProductKernel::broadcasts);
  EXPECT_EQ((detail::choose_kernel<R, C, R>(256, 256, 1024, 32, false)), ProductKernel::eigen);
  EXPECT_EQ((detail::choose_kernel<R, R, R>(1, 256, 1024, 64, false)), ProductKernel::gemv);
  EXPECT_EQ((detail::choose_kernel<C, R, R>(256, 256, 1024, 64, true)), ProductKernel::eigen);
}

}  // namespace
}  // namespace moekit

