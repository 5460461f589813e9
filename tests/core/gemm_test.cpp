// detail::gemm packs into kept buffers but must compute exactly what Eigen's product operator
// computes: the same kernel, the same blocking, so the same bits. Only x · Wᵀ with a few rows
// (2 … few_rows) is taken as one GEMV per row instead, equal up to rounding.
#include <gtest/gtest.h>

#include <moekit/core/detail/gemm.hpp>

namespace moekit {
namespace {

using ColMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor>;

TEST(Gemm, EqualsEigensProductBitForBit) {
  detail::GemmWorkspace<float> workspace;
  // (m, n, k): tiny, single row and column (GEMV), past Eigen's 128 KiB stack blocks, odd sizes.
  const Index shapes[][3] = {{1, 1, 1}, {1, 300, 200}, {300, 1, 200}, {9, 7, 3}, {64, 700, 300}, {129, 65, 1031}};
  for (const auto& [m, n, k] : shapes) {
    const Matrix<float> a = Matrix<float>::Random(m, k);          // row-major
    const ColMatrix bt = ColMatrix::Random(n, k);                 // b = btᵀ, a transposed view
    Matrix<float> c = Matrix<float>::Random(m, n), expected = c;  // row-major result
    detail::gemm_add(workspace, c, a, bt.transpose());
    expected.noalias() += a * bt.transpose();
    EXPECT_TRUE(c == expected) << m << "x" << n << "x" << k << ": row-major result";

    ColMatrix cc(m, n), expected_cc(m, n);  // column-major result, of blocks of larger matrices
    const Matrix<float> wide = Matrix<float>::Random(m + 2, k + 3);
    detail::gemm(workspace, cc, wide.block(1, 2, m, k), bt.transpose());
    expected_cc.noalias() = wide.block(1, 2, m, k) * bt.transpose();
    EXPECT_TRUE(cc == expected_cc) << m << "x" << n << "x" << k << ": column-major result of a block";
  }
}

TEST(Gemm, AFewRowsTimesATransposedMatrixAreOneGemvPerRow) {
  detail::GemmWorkspace<float> workspace;
  for (Index m = 2; m <= detail::few_rows; ++m) {
    const Matrix<float> x = Matrix<float>::Random(m, 333), w = Matrix<float>::Random(517, 333);
    Matrix<float> c = Matrix<float>::Random(m, 517), expected = c;
    detail::gemm_add(workspace, c, x, w.transpose());
    expected.noalias() += x * w.transpose();
    EXPECT_LE((c - expected).cwiseAbs().maxCoeff(), 1e-4f) << m << " rows";
  }
}

TEST(Gemm, EmptyProductsLeaveTheResult) {
  detail::GemmWorkspace<double> workspace;
  Matrix<double> c = Matrix<double>::Ones(3, 4);
  detail::gemm_add(workspace, c, Matrix<double>(3, 0), Matrix<double>(0, 4));
  EXPECT_TRUE(c == Matrix<double>::Ones(3, 4));
}

}  // namespace
}  // namespace moekit
