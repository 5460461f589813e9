// Weight-only int8 products (Int8Weights, Int8Rows, int8_gemm): each weight channel and each row
// rounded to the nearest of 255 symmetric levels, ties to even; each output the exact integer sum
// of the quantised values, converted to float and scaled by the row's and the channel's scales
// (so equal to that formula in float, bit for bit), and within the quantisation bound of the exact
// product of the float operands. Every form this CPU runs (vpdpbusd, and int32 vectors) gives
// the same bits, over edges (depth not a multiple of 4, a last panel c does not fill, rows past
// the last whole block, a block of columns from a later panel). This file is built with and
// without vector dispatch.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <tuple>

#include <moekit/core/gemm.hpp>

#include "../support/random.hpp"

namespace moekit {
namespace {

float nearest_even(float v) { return std::nearbyint(v); }  // the default rounding: ties to even

TEST(Int8, QuantisesEachRowToTheNearestOf255Levels) {
  Matrix<float> x(3, 7);
  x << 1.0f, -2.0f, 0.5f, 254.0f / 127.0f / 2, 0.0f, 2.0f, -0.01f,  // max 2: step 2/127
      0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f,                      // a zero row: scale 0, values 0
      -3.0f, 1.5f, 0.0f, 0.75f, 3.0f, -1.0f, 0.2f;
  Int8Rows rows;
  rows.resize(3, 7);
  rows.quantize(0, x);
  for (Index i = 0; i < 3; ++i) {
    const float max = x.row(i).cwiseAbs().maxCoeff();
    EXPECT_EQ(rows.scale(i), max / 127.0f);
    for (Index j = 0; j < 7; ++j) {
      const float expected = max > 0 ? nearest_even(x(i, j) / (max / 127.0f)) : 0.0f;
      EXPECT_EQ(rows.value(i, j), static_cast<int>(expected)) << i << "," << j;
      EXPECT_LE(std::abs(x(i, j) - rows.value(i, j) * rows.scale(i)), rows.scale(i) / 2 * (1 + 1e-5f));
    }
  }
  EXPECT_EQ(rows.value(0, 1), -127);
  EXPECT_EQ(rows.value(0, 3), 64);  // 63.5: a tie, to the even 64

  // A weight quantises each channel (row) the same way.
  const Int8Weights w(x);
  for (Index c = 0; c < 3; ++c) {
    EXPECT_EQ(w.scale(c), rows.scale(c));
    for (Index j = 0; j < 7; ++j) EXPECT_EQ(w.value(c, j), rows.value(c, j));
  }
}

TEST(Int8, ANonFiniteValueMakesItsRowsProductsNaN) {
  Matrix<float> x = test::random_matrix<float>(2, 40, 3);
  x(1, 37) = std::numeric_limits<float>::infinity();
  const Int8Weights w(test::random_matrix<float>(5, 40, 4));
  Int8Rows rows;
  rows.resize(2, 40);
  rows.quantize(0, x);
  Matrix<float> c(2, 5);
  int8_gemm(c, rows, 0, w, 0);
  EXPECT_TRUE(c.row(0).allFinite());
  EXPECT_TRUE(c.row(1).array().isNaN().all());
}

TEST(Int8, RefusesADepthWhoseSumsCouldLeaveInt32) {
  const Matrix<float> w = Matrix<float>::Zero(1, detail::int8_max_depth + 1);
  try {
    const Int8Weights quantised(w);
    FAIL() << "a depth of " << w.cols() << " was accepted";
  } catch (const error& e) {
    EXPECT_NE(std::string(e.what()).find(std::to_string(w.cols())), std::string::npos) << e.what();
  }
}

/// One case: c [m,n] = rows [first_row, +m) · W [first_output, +n)ᵀ, depth k.
struct Case {
  Index m, n, k, first_row, first_output;
};

std::string label(const Case& c) {
  return std::to_string(c.m) + "x" + std::to_string(c.n) + "x" + std::to_string(c.k) + " from " +
         std::to_string(c.first_row) + "," + std::to_string(c.first_output);
}

const Case cases[] = {{1, 1, 1, 0, 0},      {7, 37, 19, 0, 0},     {13, 50, 301, 2, 16}, {6, 64, 256, 0, 0},
                      {25, 16, 2, 5, 32},   {64, 96, 128, 0, 64},  {5, 3, 1000, 1, 0},   {70, 130, 66, 0, 0},
                      {1, 200, 1024, 0, 48}};

template <class F>
void for_each_form(F&& f) {
#if MOEKIT_VECTOR_DISPATCH
  const std::tuple<detail::Int8InBuildInts, detail::Int8InAvx2Ints, detail::Int8InAvx512Ints, detail::Int8Dot> forms;
#else
  const std::tuple<detail::Int8InBuildInts> forms;
#endif
  std::apply([&](auto... form) { (f(form), ...); }, forms);
}

struct Operands {
  Matrix<float> x, w;
  Int8Rows rows;
  Int8Weights weights;
};

Operands operands(const Case& c, std::uint64_t seed) {
  Operands o{test::random_matrix<float>(c.first_row + c.m, c.k, seed),
             test::random_matrix<float>(c.first_output + c.n, c.k, seed + 1), {}, {}};
  o.x.row(0) *= 50.0f;  // rows and channels of different scales
  o.w.row(o.w.rows() - 1) *= 0.01f;
  o.rows.resize(o.x.rows(), c.k);
  o.rows.quantize(0, o.x.topRows(1));  // in two blocks, as threads would
  o.rows.quantize(1, o.x.bottomRows(o.x.rows() - 1));
  o.weights = Int8Weights(o.w);
  return o;
}

TEST(Int8, EachOutputIsTheExactIntegerSumScaled) {
  for (const Case& c : cases) {
    const Operands o = operands(c, 11);
    Matrix<float> out = Matrix<float>::Constant(c.m, c.n, 7.0f);
    int8_gemm(out, o.rows, c.first_row, o.weights, c.first_output);
    for (Index i = 0; i < c.m; ++i)
      for (Index j = 0; j < c.n; ++j) {
        const Index r = c.first_row + i, ch = c.first_output + j;
        std::int64_t sum = 0;
        for (Index l = 0; l < c.k; ++l) sum += std::int64_t{o.rows.value(r, l)} * o.weights.value(ch, l);
        const float expected = static_cast<float>(sum) * o.rows.scale(r) * o.weights.scale(ch);
        ASSERT_EQ(out(i, j), expected) << label(c) << " at " << i << "," << j;
      }
  }
}

TEST(Int8, EveryFormGivesTheSameBits) {
  for (const Case& c : cases) {
    const Operands o = operands(c, 21);
    Matrix<float> reference(c.m, c.n);
    detail::int8_gemm(detail::Int8InBuildInts{}, reference, o.rows, c.first_row, o.weights, c.first_output);
    for_each_form([&](auto form) {
      if (!form.available()) return;
      Matrix<float> out(c.m, c.n);
      detail::int8_gemm(form, out, o.rows, c.first_row, o.weights, c.first_output);
      EXPECT_EQ(out, reference) << form.name << " " << label(c);
      Int8Rows again;  // the form's own quantisation of the rows
      again.resize(o.x.rows(), c.k);
      form.quantize(const_cast<std::uint32_t*>(again.words()), const_cast<float*>(again.scales()), o.x.data(), c.k,
                    o.x.rows(), c.k);
      for (Index i = 0; i < o.x.rows(); ++i) {
        ASSERT_EQ(again.scale(i), o.rows.scale(i)) << form.name;
        for (Index l = 0; l < c.k; ++l) ASSERT_EQ(again.value(i, l), o.rows.value(i, l)) << form.name;
      }
    });
  }
}

// |Σ x w − Σ x̂ ŵ| ≤ Σ (|x||w − ŵ| + |x − x̂||ŵ|) ≤ (s_w/2)·Σ|x| + (s_x/2)·Σ|ŵ|, each quantised value
// within half a step (s_x, s_w) of its operand; the float conversion and two products add at
// most 3 roundings of float (u = 2^-24) to |Σ x̂ ŵ|.
TEST(Int8, WithinTheQuantisationBoundOfTheExactProduct) {
  for (const Case& c : cases) {
    const Operands o = operands(c, 31);
    Matrix<float> out(c.m, c.n);
    int8_gemm(out, o.rows, c.first_row, o.weights, c.first_output);
    for (Index i = 0; i < c.m; ++i)
      for (Index j = 0; j < c.n; ++j) {
        const Index r = c.first_row + i, ch = c.first_output + j;
        double exact = 0, x_norm = 0, w_norm = 0, quantised = 0;
        for (Index l = 0; l < c.k; ++l) {
          const double w_hat = static_cast<double>(o.weights.value(ch, l)) * o.weights.scale(ch);
          exact += double{o.x(r, l)} * o.w(ch, l);
          x_norm += std::abs(o.x(r, l));
          w_norm += std::abs(w_hat);
          quantised += std::abs(static_cast<double>(o.rows.value(r, l)) * o.rows.scale(r) * w_hat);
        }
        const double bound = o.weights.scale(ch) / 2 * x_norm + o.rows.scale(r) / 2 * w_norm + 3 * 0x1p-24 * quantised;
        ASSERT_LE(std::abs(out(i, j) - exact), bound) << label(c) << " at " << i << "," << j;
      }
  }
}

}  // namespace
}  // namespace moekit
