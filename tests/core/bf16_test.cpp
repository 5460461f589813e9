// Products on bf16 operands (bf16_gemm_add): each operand rounded to the nearest bf16, ties to
// even; each output the float sum of the rounded products in order, so within float's summation
// bound of the exact sum of the rounded operands, and within bf16's rounding bound of the exact
// product. Every form this CPU runs (vdpbf16ps, and float vectors) gives the same bits, over every
// way an operand can lie (row-major, transposed, a column block) and every edge (odd k, a last
// panel c does not fill, rows past the last whole block). This file is built with and without
// vector dispatch.
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include <moekit/core/gemm.hpp>

#include "../support/random.hpp"
#include "../support/tolerance.hpp"

namespace moekit {
namespace {

TEST(Bf16, RoundsToNearestTiesToEven) {
  using detail::round_to_bf16;
  EXPECT_EQ(round_to_bf16(1.0f + 0x1p-8f), 1.0f);                   // a tie: down to the even 1
  EXPECT_EQ(round_to_bf16(1.0f + 3 * 0x1p-8f), 1.0f + 0x1p-6f);    // a tie: up to the even
  EXPECT_EQ(round_to_bf16(1.0f + 0x1p-8f + 0x1p-20f), 1.0f + 0x1p-7f);  // past the tie: up
  EXPECT_EQ(round_to_bf16(-3.0f), -3.0f);                          // exact values stay
  EXPECT_EQ(round_to_bf16(std::numeric_limits<float>::infinity()), std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(round_to_bf16(std::numeric_limits<float>::quiet_NaN())));
  // A NaN whose payload lies only in the low bits must not round to infinity.
  EXPECT_TRUE(std::isnan(round_to_bf16(std::bit_cast<float>(0x7f800001u))));
  EXPECT_EQ(round_to_bf16(std::numeric_limits<float>::max()), std::numeric_limits<float>::infinity());
}

/// One case: c [m,n] += a [m,k] · b [k,n], each operand as it may lie.
struct Case {
  Index m, n, k;
  bool a_transposed, b_transposed;
};

std::string label(const Case& c) {
  return std::to_string(c.m) + "x" + std::to_string(c.n) + "x" + std::to_string(c.k) +
         (c.a_transposed ? " aT" : "") + (c.b_transposed ? " bT" : "");
}

const Case cases[] = {
    {1, 1, 1, false, false},    {7, 37, 19, false, false}, {13, 50, 301, false, true}, {6, 64, 256, true, false},
    {25, 16, 2, true, true},    {64, 96, 128, false, true}, {5, 3, 1000, false, false}, {70, 130, 66, true, false},
};

/// The product by the given form, from a and b as the case lays them out, into c (starting at 0.25).
template <class Form>
Matrix<float> product(Form form, const Case& c, const Matrix<float>& a, const Matrix<float>& b) {
  Matrix<float> out = Matrix<float>::Constant(c.m, c.n, 0.25f);
  // a(i, j) = a[i·ar + j·ak]: a is [m,k] row-major, or its transpose [k,m] read across.
  const Index ar = c.a_transposed ? 1 : c.k, ak = c.a_transposed ? c.m : 1;
  const Index bk = c.b_transposed ? 1 : c.n, bn = c.b_transposed ? c.k : 1;
  detail::bf16_gemm_add(form, out.data(), c.n, c.m, c.n, a.data(), ar, ak, b.data(), bk, bn, c.k);
  return out;
}

/// The same by the fastest form this CPU runs.
Matrix<float> product(const Case& c, const Matrix<float>& a, const Matrix<float>& b) {
  return detail::with_bf16_form([&](auto form) { return product(form, c, a, b); });
}

template <class F>
void for_each_form(F&& f) {
#if MOEKIT_VECTOR_DISPATCH
  const std::tuple<detail::Bf16InBuildFloats, detail::Bf16InAvx2Floats, detail::Bf16InAvx512Floats, detail::Bf16Dot> forms;
#else
  const std::tuple<detail::Bf16InBuildFloats> forms;
#endif
  std::apply([&](auto... form) { (f(form), ...); }, forms);
}

TEST(Bf16, EveryFormGivesTheSameBits) {
  int forms_run = 0;
  for (const Case& c : cases) {
    const Matrix<float> a = test::random_matrix<float>(c.a_transposed ? c.k : c.m, c.a_transposed ? c.m : c.k, 1);
    const Matrix<float> b = test::random_matrix<float>(c.b_transposed ? c.n : c.k, c.b_transposed ? c.k : c.n, 2);
    const Matrix<float> first = product(detail::Bf16InBuildFloats{}, c, a, b);
    for_each_form([&](auto form) {
      if (!form.available()) return;
      ++forms_run;
      EXPECT_TRUE(product(form, c, a, b) == first) << form.name << " " << label(c);
    });
  }
  RecordProperty("forms_run", forms_run);
  EXPECT_GE(forms_run, static_cast<int>(std::size(cases)));
}

// |c − (c₀ + Σ â·b̂)| ≤ γ_k Σ|â·b̂| + its start, float's bound for k adds in turn: the sum is of the
// rounded operands, none left out, none rounded twice. And |c − (c₀ + Σ a·b)| within bf16's
// bound, (2u + u²) Σ|a·b| more, element by element.
TEST(Bf16, WithinTheRoundingBounds) {
  const double u = test::bf16_unit, float_unit = 0x1p-24;
  for (const Case& c : cases) {
    const Matrix<float> a = test::random_matrix<float>(c.a_transposed ? c.k : c.m, c.a_transposed ? c.m : c.k, 3);
    const Matrix<float> b = test::random_matrix<float>(c.b_transposed ? c.n : c.k, c.b_transposed ? c.k : c.n, 4);
    const auto at = [](const Matrix<float>& x, bool transposed, Index i, Index j) {
      return double{transposed ? x(j, i) : x(i, j)};
    };
    const Matrix<float> out = product(c, a, b);
    const double gamma = (c.k + 1) * float_unit / (1 - (c.k + 1) * float_unit);
    double worst_rounded = 0, worst_exact = 0;
    for (Index i = 0; i < c.m; ++i)
      for (Index j = 0; j < c.n; ++j) {
        double rounded = 0.25, rounded_size = 0.25, exact = 0.25, exact_size = 0;
        for (Index q = 0; q < c.k; ++q) {
          const double x = at(a, c.a_transposed, i, q), y = at(b, c.b_transposed, q, j);
          const double xr = detail::round_to_bf16(static_cast<float>(x)), yr = detail::round_to_bf16(static_cast<float>(y));
          rounded += xr * yr;
          rounded_size += std::abs(xr * yr);
          exact += x * y;
          exact_size += std::abs(x * y);
        }
        const double got = out(i, j);
        worst_rounded = std::max(worst_rounded, std::abs(got - rounded) / (gamma * rounded_size));
        worst_exact = std::max(worst_exact, std::abs(got - exact) / ((2 * u + u * u) * exact_size + gamma * rounded_size));
      }
    EXPECT_LE(worst_rounded, 1.0) << label(c) << ": off the float sum of the rounded operands";
    EXPECT_LE(worst_exact, 1.0) << label(c) << ": off the exact product by more than bf16's bound";
    EXPECT_GT(worst_exact, 0.01) << label(c) << ": no rounding seen; are the operands rounded?";
  }
}

// Through the public call, on Eigen blocks as the experts pass them: a block of c, a transposed
// weight block. The same as the packed call on copies.
TEST(Bf16, EigenBlocksAsTheExpertsPassThem) {
  const Matrix<float> x = test::random_matrix<float>(20, 40, 5), w = test::random_matrix<float>(30, 40, 6);
  Matrix<float> c = Matrix<float>::Zero(24, 33);
  bf16_gemm_add(c.block(2, 1, 18, 30), x.middleRows(1, 18), w.transpose());
  const Matrix<float> x_copy = x.middleRows(1, 18), w_t = w.transpose();
  Matrix<float> expected = Matrix<float>::Zero(18, 30);
  detail::bf16_gemm_add(expected.data(), 30, 18, 30, x_copy.data(), 40, 1, w_t.data(), 30, 1, 40);
  EXPECT_TRUE(c.block(2, 1, 18, 30) == expected);
  EXPECT_EQ(c.block(0, 0, 2, 33).norm(), 0.0f);  // nothing outside the block
  EXPECT_EQ(c.col(0).norm(), 0.0f);
}

}  // namespace
}  // namespace moekit
