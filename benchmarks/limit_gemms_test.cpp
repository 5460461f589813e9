// The oneDNN limit computes what the Eigen limit computes: y, dx and the three weight gradients,
// on one thread and two, for shapes whose sizes fit no vector or tile exactly. A limit that
// multiplied the wrong operands (a transpose missed) would time much the same and prove nothing.
#include <gtest/gtest.h>

#include <cstdlib>

#include "limit_gemms.hpp"

namespace {

double relative(const moekit::Matrix<float>& a, const moekit::Matrix<float>& b) {
  return double((a - b).cwiseAbs().maxCoeff() / b.cwiseAbs().maxCoeff());
}

// With bf16 operands the products round them: the same results to bf16's precision (a few units
// of 2^-8 relative to the largest output), and visibly not float's.
TEST(Limit, OneDnnComputesWhatEigenComputes) {
  for (const auto precision : {moekit::Precision::scalar, moekit::Precision::bf16}) {
  const double bound = precision == moekit::Precision::bf16 ? 4 * 0x1p-8 : 1e-5;
  for (const int threads : {1, 2}) {
    for (const auto& [rows, hidden, ffn] : {std::tuple{37, 24, 40}, {130, 72, 17}}) {
      SCOPED_TRACE(::testing::Message() << threads << " threads, " << rows << "×" << hidden << "×" << ffn
                                        << (precision == moekit::Precision::bf16 ? ", bf16" : ""));
      std::srand(7);  // Matrix::Random draws from std::rand: both limits get the same operands
      probes::EigenLimit eigen(rows, hidden, ffn);
      std::srand(7);
      probes::OneDnnLimit onednn(rows, hidden, ffn, precision);
      for (int step = 0; step < 2; ++step) {  // the second step adds to the weight gradients
        eigen.forward(threads);
        eigen.backward(threads);
        onednn.forward(threads);
        onednn.backward(threads);
      }
      EXPECT_LT(relative(onednn.y(), eigen.y()), bound);
      EXPECT_LT(relative(onednn.dx(), eigen.dx()), bound);
      EXPECT_LT(relative(onednn.d_gate_weight(), eigen.d_gate_weight()), bound);
      EXPECT_LT(relative(onednn.d_up_weight(), eigen.d_up_weight()), bound);
      EXPECT_LT(relative(onednn.d_down_weight(), eigen.d_down_weight()), bound);
      if (precision == moekit::Precision::bf16) {
        EXPECT_GT(relative(onednn.y(), eigen.y()), 1e-4) << "not rounded";
      }
    }
  }
  }
}

}  // namespace
