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

TEST(Limit, OneDnnComputesWhatEigenComputes) {
  for (const int threads : {1, 2}) {
    for (const auto& [rows, hidden, ffn] : {std::tuple{37, 24, 40}, {130, 72, 17}}) {
      SCOPED_TRACE(::testing::Message() << threads << " threads, " << rows << "×" << hidden << "×" << ffn);
      std::srand(7);  // Matrix::Random draws from std::rand: both limits get the same operands
      probes::EigenLimit eigen(rows, hidden, ffn);
      std::srand(7);
      probes::OneDnnLimit onednn(rows, hidden, ffn);
      for (int step = 0; step < 2; ++step) {  // the second step adds to the weight gradients
        eigen.forward(threads);
        eigen.backward(threads);
        onednn.forward(threads);
        onednn.backward(threads);
      }
      EXPECT_LT(relative(onednn.y(), eigen.y()), 1e-5);
      EXPECT_LT(relative(onednn.dx(), eigen.dx()), 1e-5);
      EXPECT_LT(relative(onednn.d_gate_weight(), eigen.d_gate_weight()), 1e-5);
      EXPECT_LT(relative(onednn.d_up_weight(), eigen.d_up_weight()), 1e-5);
      EXPECT_LT(relative(onednn.d_down_weight(), eigen.d_down_weight()), 1e-5);
    }
  }
}

}  // namespace
