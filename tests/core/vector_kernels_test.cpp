// The vector kernels, x · Wᵀ (times_wt: decode, and the forward where the CPU's vectors are wider
// than the build's) and a · B (times_b: the backward, there too), come in forms for the build's
// vectors and, on x86, for AVX2 and AVX-512. Every form this CPU runs must equal Eigen's product up
// to rounding, at a few rows and at many, and give each row the same bits whatever rows are beside
// it. gemm_add must run the widest form the CPU has, or the build's own when
// MOEKIT_VECTOR_DISPATCH is 0 (this file is built both ways): times_wt at a few rows always, and
// past them (from slab_rows, times_b over the transposed weights), and times_b, only where that
// form is wider than the build's vectors, and so than Eigen's GEMM; where the CPU runs AVX-512,
// times_b at any width, and x · Wᵀ turned (times_b over xᵀ) past a few rows, by blocks of
// turned_rows. Each form's transpose, which lays out the slabs, must copy every element to its
// place.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <limits>
#include <numeric>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <moekit/core/gemm.hpp>

namespace moekit {
namespace {

template <class List>
struct GtestTypes;
template <class... Form>
struct GtestTypes<std::tuple<Form...>> {
  using type = ::testing::Types<Form...>;
};
using Forms = GtestTypes<detail::VectorForms>::type;

struct FormName {
  template <class Form>
  static std::string GetName(int) {
    return Form::name;
  }
};

template <class Form>
class TimesWt : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!Form::available()) GTEST_SKIP() << "this CPU does not run the " << Form::name << " form";
  }
};
TYPED_TEST_SUITE(TimesWt, Forms, FormName);

template <class Form, class T>
void expect_match_eigen(Index k, Index n, T tolerance) {
  using M = Matrix<T>;
  // Every row count up to few_rows, then past it: the kernel takes any rows where the CPU runs
  // wider vectors than the build.
  std::vector<Index> rows(detail::few_rows);
  std::iota(rows.begin(), rows.end(), 1);
  rows.insert(rows.end(), {detail::few_rows + 1, 47, 100});
  for (Index m : rows) {
    // Blocks of larger matrices, so the strides differ from the widths.
    const M x = M::Random(m + 1, k + 5), w = M::Random(n + 2, k + 3);
    const auto xs = x.block(1, 2, m, k);
    const auto ws = w.block(2, 1, n, k);
    M c = M::Random(m, n), expected = c;
    detail::times_wt(Form{}, c, xs.data(), xs.outerStride(), m, ws.data(), ws.outerStride(), n, k);
    expected.noalias() += xs * ws.transpose();
    EXPECT_LE((c - expected).cwiseAbs().maxCoeff(), tolerance) << m << " rows, k = " << k << ", n = " << n;
  }
}

TYPED_TEST(TimesWt, MatchEigen) {
  // k: shorter than a vector, not a multiple of one, a multiple; n: odd, and past a 128 KiB slice.
  for (Index k : {3, 333, 1024}) {
    expect_match_eigen<TypeParam, float>(k, 517, 1e-4f);
    expect_match_eigen<TypeParam, double>(k, 61, 1e-12);
  }
}

TYPED_TEST(TimesWt, GiveEachRowTheSameBitsWhateverRowsAreBesideIt) {
  // A token's output must not depend on which other tokens its expert got, at decode or past it.
  const Index most = 2 * detail::few_rows + 3;
  const Matrix<float> x = Matrix<float>::Random(most, 777), w = Matrix<float>::Random(301, 777);
  const auto product = [&](Index m) {
    Matrix<float> c = Matrix<float>::Zero(m, 301);
    detail::times_wt(TypeParam{}, c, x.bottomRows(m).data(), x.outerStride(), m, w.data(), w.outerStride(),
                              w.rows(), w.cols());
    return c;
  };
  const Matrix<float> all = product(most);
  for (Index m = 1; m < most; ++m) EXPECT_TRUE(product(m) == all.bottomRows(m)) << m << " rows";
}

template <class Form>
class TimesB : public TimesWt<Form> {};
TYPED_TEST_SUITE(TimesB, Forms, FormName);

/// c += a · b by times_b, a row-major or a transposed view of a row-major matrix.
template <class Form, class T, class A>
void times_b(Matrix<T>& c, const A& a, const Matrix<T>& b, T* panel_copy = nullptr) {
  constexpr bool a_rows = A::IsRowMajor;
  detail::times_b(Form{}, c.data(), c.outerStride(), a.data(), a_rows ? a.outerStride() : 1,
                  a_rows ? 1 : a.outerStride(), c.rows(), b.data(), b.outerStride(), c.cols(), b.rows(), panel_copy);
}

template <class Form, class T>
void expect_times_b_match_eigen(Index n, T tolerance) {
  using M = Matrix<T>;
  // k: shorter than a vector, a few blocks of broadcast_depth and a part; rows: one, every
  // remainder of a group, many.
  for (Index k : {Index{3}, 2 * detail::broadcast_depth + 77})
    for (Index m : {1, 2, 3, 4, 5, 6, 7, 11, 100}) {
      const M a = M::Random(m, k), at = M::Random(k, m), b = M::Random(k, n);
      M c = M::Random(m, n), expected = c;
      times_b<Form>(c, a, b);
      expected.noalias() += a * b;
      EXPECT_LE((c - expected).cwiseAbs().maxCoeff(), tolerance) << m << " rows, k = " << k << ", n = " << n;

      c = M::Random(m, n), expected = c;  // a transposed: the weight gradients' dyᵀ · x
      times_b<Form>(c, at.transpose(), b);
      expected.noalias() += at.transpose() * b;
      EXPECT_LE((c - expected).cwiseAbs().maxCoeff(), tolerance) << m << " rows of aᵀ, k = " << k;
    }
}

TYPED_TEST(TimesB, MatchEigen) {
  // n: panels of several vectors, single vectors and a few columns past them.
  expect_times_b_match_eigen<TypeParam, float>(517, 1e-4f);
  expect_times_b_match_eigen<TypeParam, double>(61, 1e-12);
}

TYPED_TEST(TimesB, GiveTheSameBitsReadingACopyOfBsPanels) {
  // With a transposed a, every group of rows but the first reads b's panel from the copy the
  // first made: every panel width (517 floats or 61 doubles: whole panels, the vectors left, the
  // last columns), depths of one block, several and a part, and rows of one group or many.
  const auto expect_same_bits = [&]<class T>(Index n, T tolerance) {
    using M = Matrix<T>;
    std::vector<T> copy(detail::panel_copy_size<T>);
    for (Index k : {Index{3}, Index{64}, 2 * detail::broadcast_depth + 77})
      for (Index m : {5, 7, 11, 100}) {
        const M at = M::Random(k, m), b = M::Random(k, n), start = M::Random(m, n);
        M read = start, copied = start;
        times_b<TypeParam>(read, at.transpose(), b);
        std::fill(copy.begin(), copy.end(), std::numeric_limits<T>::quiet_NaN());
        times_b<TypeParam>(copied, at.transpose(), b, copy.data());
        EXPECT_TRUE(copied == read) << m << " rows, k = " << k << ", n = " << n;
        EXPECT_LE((read - start - at.transpose() * b).cwiseAbs().maxCoeff(), tolerance) << m << " rows, k = " << k;
      }
  };
  expect_same_bits.template operator()<float>(517, 1e-3f);
  expect_same_bits.template operator()<double>(61, 1e-10);
}

TYPED_TEST(TimesB, TakeEveryNumberOfVectorsAndGiveEachColumnTheSameBits) {
  // Panels of whole vectors, and the vectors left: one to a panel's less one, and one more than a
  // panel (taken as two panels). Turned, b's columns are an expert's rows padded to whole
  // vectors, and a token's output must not depend on which panel its column fell in. (Columns
  // past the last whole vector are summed one by one, not in lanes: they match to rounding.)
  constexpr Index lanes = TypeParam::bytes / Index{sizeof(float)};
  const Index k = 37, m = 7, most = 10 * lanes + 3;
  const Matrix<float> a = Matrix<float>::Random(m, k), b = Matrix<float>::Random(k, most);
  const auto product = [&](Index n) {
    Matrix<float> c = Matrix<float>::Zero(m, n);
    times_b<TypeParam>(c, a, Matrix<float>(b.leftCols(n)));
    return c;
  };
  const Matrix<float> all = product(most);
  EXPECT_LE((all - a * b).cwiseAbs().maxCoeff(), 1e-4f);
  for (Index vectors = 1; vectors <= 9; ++vectors)
    for (Index n : {vectors * lanes, vectors * lanes + 3}) {
      const Matrix<float> c = product(n);
      EXPECT_TRUE(c.leftCols(vectors * lanes) == all.leftCols(vectors * lanes)) << vectors << " vectors, " << n << " columns";
      EXPECT_LE((c - all.leftCols(n)).cwiseAbs().maxCoeff(), 1e-4f) << n << " columns";
    }
}

TYPED_TEST(TimesB, GiveEachRowTheSameBitsWhateverRowsAreBesideIt) {
  // A token's input gradient must not depend on which other tokens its expert got.
  const Index most = 20;
  const Matrix<float> a = Matrix<float>::Random(most, 600), b = Matrix<float>::Random(600, 301);
  const auto product = [&](Index m) {
    Matrix<float> c = Matrix<float>::Zero(m, 301);
    times_b<TypeParam>(c, a.bottomRows(m), b);
    return c;
  };
  const Matrix<float> all = product(most);
  for (Index m = 1; m < most; ++m) EXPECT_TRUE(product(m) == all.bottomRows(m)) << m << " rows";
}

template <class Form>
class Transpose : public TimesWt<Form> {};
TYPED_TEST_SUITE(Transpose, Forms, FormName);

template <class Form, class T>
void expect_transpose_copies_every_element() {
  // Squares of vectors and edges past them on either side, from a block of a wider matrix.
  for (const auto& [n, depth] : {std::pair<Index, Index>{1, 1}, {3, 40}, {16, 16}, {37, 45}, {70, 256}}) {
    const Matrix<T> w = Matrix<T>::Random(n + 1, depth + 7);
    const auto block = w.block(1, 3, n, depth);
    // Rows of the slab as long as the block's, and longer (padded, as times_wt_turned lays them).
    for (const Index stride : {n, n + 5}) {
      std::vector<T> slab(static_cast<std::size_t>(stride * depth), T(-99));
      Form::transpose(block.data(), block.outerStride(), n, depth, slab.data(), stride);
      const Eigen::Map<const Matrix<T>, 0, Eigen::OuterStride<>> transposed(slab.data(), depth, n, Eigen::OuterStride<>(stride));
      EXPECT_TRUE(transposed == block.transpose()) << "n = " << n << ", depth = " << depth << ", stride " << stride;
      for (Index i = 0; i < depth; ++i)
        for (Index j = n; j < stride; ++j) EXPECT_EQ(slab[static_cast<std::size_t>(i * stride + j)], T(-99)) << "the padding was written";
    }
  }
}

TYPED_TEST(Transpose, CopiesEveryElementToItsPlace) {
  expect_transpose_copies_every_element<TypeParam, float>();
  expect_transpose_copies_every_element<TypeParam, double>();
}

/// The name of the widest form this CPU runs, found here without the library's choice.
std::string widest_form() {
  std::string name = detail::BuildVectors::name;
  int bytes = detail::BuildVectors::bytes;
  [&]<class... Form>(std::tuple<Form...>*) {
    ((Form::available() && Form::bytes > bytes ? (name = Form::name, bytes = Form::bytes) : 0), ...);
  }(static_cast<detail::VectorForms*>(nullptr));
  return name;
}

template <class Form>
class TimesWtTurned : public TimesWt<Form> {};
TYPED_TEST_SUITE(TimesWtTurned, Forms, FormName);

/// c += x · wᵀ by times_wt_turned in the given form, its scratch its own.
template <class Form, class T>
Matrix<T> turned(Matrix<T> c, const Matrix<T>& x, Index m, const Matrix<T>& w) {
  detail::GemmBlocks<T> blocks;
  detail::times_wt_turned(Form{}, blocks, std::array{&c}, x.bottomRows(m).data(), x.outerStride(), m,
                          std::array<const T*, 1>{w.data()}, w.outerStride(), w.rows(), w.cols());
  return c;
}

template <class Form, class T>
void expect_turned_match_eigen(T tolerance) {
  // Rows: one, a vector's and one past it, the dispatch's bound, one block of turned_rows, two and
  // three; rows past the last whole vector that go by dot products (one, and a whole group of
  // times_wt) and that do not (one more); depth: shorter than a vector, a few blocks of
  // broadcast_depth and a part; weight rows: fewer than a square of vectors, more.
  constexpr Index lanes = Form::bytes / Index{sizeof(T)}, group = detail::times_wt_group<Form>;
  for (Index k : {Index{3}, 2 * detail::broadcast_depth + 77})
    for (Index m : {Index{1}, Index{16}, Index{17}, detail::turned_past + 1, detail::few_rows + 1, 2 * lanes + group,
                    2 * lanes + group + 1, detail::turned_rows, detail::turned_rows + 1, 2 * detail::turned_rows + 37})
      for (Index n : {Index{5}, Index{70}}) {
        const Matrix<T> x = Matrix<T>::Random(m, k), w = Matrix<T>::Random(n, k), c = Matrix<T>::Random(m, n);
        const Matrix<T> expected = c + x * w.transpose();
        EXPECT_TRUE(turned<Form>(c, x, m, w).isApprox(expected, tolerance)) << m << " × " << n << ", k = " << k;
      }
}

TYPED_TEST(TimesWtTurned, MatchesEigen) {
  expect_turned_match_eigen<TypeParam, float>(1e-4f);
  expect_turned_match_eigen<TypeParam, double>(1e-12);
}

TYPED_TEST(TimesWtTurned, GivesEachRowTheSameBitsWhateverRowsAreBesideIt) {
  // Rows of x are columns of xᵀ here: a row must not be summed differently in another lane, past
  // the last whole vector or in another block of rows (up to three blocks of turned_rows). The
  // rows past the last whole vector, where they fit one group of times_wt, go by its dot products
  // instead, over each block of broadcast_depth in turn: those bits, whatever rows are beside them.
  constexpr Index lanes = TypeParam::bytes / Index{sizeof(float)};
  const Index most = 2 * detail::turned_rows + 2 * lanes, depth = detail::broadcast_depth;
  const Matrix<float> x = Matrix<float>::Random(most, 2 * depth + 77), w = Matrix<float>::Random(37, x.cols());
  const Matrix<float> all = turned<TypeParam, float>(Matrix<float>::Zero(most, 37), x, most, w);
  ASSERT_EQ(most % lanes, 0) << "every row of `all` must be summed turned";
  for (Index m = 1; m < most; ++m) {
    const Matrix<float> some = turned<TypeParam, float>(Matrix<float>::Zero(m, 37), x, m, w);
    const Index dotted = detail::dotted_rows<TypeParam, float>(m);
    EXPECT_TRUE(some.topRows(m - dotted) == all.bottomRows(m).topRows(m - dotted)) << m << " rows";
    Matrix<float> dots = Matrix<float>::Zero(dotted, 37);
    for (Index p = 0; p < x.cols(); p += depth)
      detail::times_wt(TypeParam{}, dots, x.bottomRows(dotted).data() + p, x.outerStride(), dotted, w.data() + p,
                       w.outerStride(), w.rows(), std::min(depth, x.cols() - p));
    EXPECT_TRUE(some.bottomRows(dotted) == dots) << m << " rows, the last " << dotted << " by dot products";
  }
}

TEST(VectorDispatch, GemmAddRunsTheWidestFormThisCpuRuns) {
  std::string chosen;
  detail::with_widest_vectors([&](auto form) { chosen = decltype(form)::name; });
  EXPECT_EQ(chosen, widest_form());

  detail::with_widest_vectors([](auto form) {
    const Matrix<float> x = Matrix<float>::Random(5, 300), w = Matrix<float>::Random(70, 300);
    Matrix<float> c = Matrix<float>::Zero(5, 70), expected = c;
    detail::GemmWorkspace<float> workspace;
    gemm_add(workspace, c, x, w.transpose());
    detail::times_wt(form, expected, x.data(), x.outerStride(), 5, w.data(), w.outerStride(), 70, 300);
    EXPECT_TRUE(c == expected) << "gemm_add and the " << decltype(form)::name << " form disagree";
  });
}

TEST(VectorDispatch, PastAFewRowsGemmAddRunsTheKernelsOnlyWhereTheirVectorsAreWiderThanTheBuilds) {
  const bool wider = widest_form() != detail::BuildVectors::name;
  EXPECT_EQ(detail::runs_wider_than_build(), wider);

  // (rows, depth): past few_rows, times_wt; from slab_rows, times_b over slabs of wᵀ, one and
  // several; with AVX-512, times_wt_turned at all of them past turned_past (up to few_rows, times_wt
  // on any CPU). Where the vectors are the build's, depths within one packed block: Eigen's bits.
  static_assert(detail::turned_past < detail::few_rows);
  const bool avx512 = detail::widest_vector_bytes() == 64;
  const Index n = 70;
  const Index cases[][2] = {{detail::turned_past, 200},
                            {detail::turned_past + 1, 200},
                            {detail::few_rows + 9, 200},
                            {detail::slab_rows + 5, 200},
                            {detail::slab_rows + 5, 2 * detail::broadcast_depth + 77},
                            {detail::turned_rows + 5, 200}};
  for (const auto& [m, k] : cases) {
    const Matrix<float> x = Matrix<float>::Random(m, k), w = Matrix<float>::Random(n, k);
    Matrix<float> c = Matrix<float>::Zero(m, n), kernel = c, eigen = c;
    detail::GemmWorkspace<float> workspace;
    gemm_add(workspace, c, x, w.transpose());
    const bool turns = avx512 && m > detail::turned_past;
    detail::with_widest_vectors([&](auto form) {
      if (turns) {
        kernel = turned<decltype(form), float>(kernel, x, m, w);
      } else if (m < detail::slab_rows) {
        detail::times_wt(form, kernel, x.data(), x.outerStride(), m, w.data(), w.outerStride(), n, k);
      } else {
        const Matrix<float> wt = w.transpose();
        times_b<decltype(form)>(kernel, x, wt);
      }
    });
    eigen.noalias() += x * w.transpose();
    if (wider || turns || m <= detail::few_rows) {
      ASSERT_FALSE(kernel == eigen) << "the test needs products whose bits tell the two apart";
      EXPECT_TRUE(c == kernel) << "gemm_add did not run the " << widest_form() << " form" << (turns ? ", turned" : "")
                               << ": " << m << " rows, k = " << k;
    } else if (k <= detail::max_packed_depth) {
      EXPECT_TRUE(c == eigen) << "gemm_add did not give Eigen's bits: " << m << " rows";
    }
  }
}

TEST(VectorDispatch, GemmEachGivesEachProductTheBitsGemmGivesIt) {
  // Rows: decode, turned in one block of rows and in two; weights of one shape (turned, x shared
  // with AVX-512) and of two (each its own product).
  const Index k = 2 * detail::broadcast_depth + 77;
  for (Index m :
       {Index{5}, detail::turned_past + 1, detail::few_rows + 1, Index{64}, detail::turned_rows, detail::turned_rows + 5})
    for (Index second : {Index{70}, Index{40}}) {
      const Matrix<float> x = Matrix<float>::Random(m, k), w0 = Matrix<float>::Random(70, k),
                          w1 = Matrix<float>::Random(second, k);
      Matrix<float> c0 = Matrix<float>::Random(m, 70), c1 = Matrix<float>::Random(m, second), e0(m, 70), e1(m, second);
      detail::GemmWorkspace<float> workspace;
      const auto w0t = w0.transpose(), w1t = w1.transpose();
      gemm_each(workspace, std::array{&c0, &c1}, x, std::array{&w0t, &w1t});
      gemm(workspace, e0, x, w0t);
      gemm(workspace, e1, x, w1t);
      EXPECT_TRUE(c0 == e0 && c1 == e1) << m << " rows, weights of " << 70 << " and " << second << " rows";
    }
}

// a · B and aᵀ · B (the backward's products) go to times_b in AVX-512 even where the build has it too.
TEST(VectorDispatch, GemmAddRunsTimesBWhereItsVectorsAreWiderThanTheBuildsOrAreAvx512) {
  const bool wider = widest_form() != detail::BuildVectors::name;
  const bool avx512 = detail::widest_vector_bytes() == 64;
  EXPECT_EQ(avx512, widest_form() == "avx512" || (!wider && detail::BuildVectors::bytes == 64));
  const Index m = 41, n = 70, k = 200;  // k within one packed block: Eigen's bits
  const Matrix<float> a = Matrix<float>::Random(m, k), at = Matrix<float>::Random(k, m), b = Matrix<float>::Random(k, n);
  detail::GemmWorkspace<float> workspace;
  for (bool transposed : {false, true}) {
    Matrix<float> c = Matrix<float>::Zero(m, n), kernel = c, eigen = c;
    if (transposed) {
      gemm_add(workspace, c, at.transpose(), b);
      detail::with_widest_vectors([&](auto form) { times_b<decltype(form)>(kernel, at.transpose(), b); });
      eigen.noalias() += at.transpose() * b;
    } else {
      gemm_add(workspace, c, a, b);
      detail::with_widest_vectors([&](auto form) { times_b<decltype(form)>(kernel, a, b); });
      eigen.noalias() += a * b;
    }
    const char* which = transposed ? " for aᵀ" : "";
    if (wider || avx512) {
      ASSERT_FALSE(kernel == eigen) << "the test needs products whose bits tell the two apart";
      EXPECT_TRUE(c == kernel) << "gemm_add did not run the " << widest_form() << " form" << which;
    } else {
      EXPECT_TRUE(c == eigen) << "gemm_add did not give Eigen's bits" << which;
    }
  }
}

}  // namespace
}  // namespace moekit
