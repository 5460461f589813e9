// x · Wᵀ with a few rows (decode) has a kernel of its own, in forms for the build's vectors and,
// on x86, for AVX2 and AVX-512. Every form this CPU runs must equal Eigen's product up to rounding,
// at a few rows and at many, and give each row the same bits whatever rows are beside it. gemm_add
// must run the widest form the CPU has, or the build's own when MOEKIT_DECODE_DISPATCH is 0 (this
// file is built both ways), and past a few rows the kernel only where that form is wider than the
// build's vectors, and so than Eigen's GEMM.
#include <gtest/gtest.h>

#include <numeric>
#include <string>
#include <tuple>
#include <vector>

#include <moekit/core/detail/gemm.hpp>

namespace moekit {
namespace {

template <class List>
struct GtestTypes;
template <class... Form>
struct GtestTypes<std::tuple<Form...>> {
  using type = ::testing::Types<Form...>;
};
using Forms = GtestTypes<detail::DecodeForms>::type;

struct FormName {
  template <class Form>
  static std::string GetName(int) {
    return Form::name;
  }
};

template <class Form>
class FewRows : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!Form::available()) GTEST_SKIP() << "this CPU does not run the " << Form::name << " form";
  }
};
TYPED_TEST_SUITE(FewRows, Forms, FormName);

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
    detail::few_rows_times_wt(Form{}, c, xs.data(), xs.outerStride(), m, ws.data(), ws.outerStride(), n, k);
    expected.noalias() += xs * ws.transpose();
    EXPECT_LE((c - expected).cwiseAbs().maxCoeff(), tolerance) << m << " rows, k = " << k << ", n = " << n;
  }
}

TYPED_TEST(FewRows, MatchEigen) {
  // k: shorter than a vector, not a multiple of one, a multiple; n: odd, and past a 128 KiB slice.
  for (Index k : {3, 333, 1024}) {
    expect_match_eigen<TypeParam, float>(k, 517, 1e-4f);
    expect_match_eigen<TypeParam, double>(k, 61, 1e-12);
  }
}

TYPED_TEST(FewRows, GiveEachRowTheSameBitsWhateverRowsAreBesideIt) {
  // A token's output must not depend on which other tokens its expert got, at decode or past it.
  const Index most = 2 * detail::few_rows + 3;
  const Matrix<float> x = Matrix<float>::Random(most, 777), w = Matrix<float>::Random(301, 777);
  const auto product = [&](Index m) {
    Matrix<float> c = Matrix<float>::Zero(m, 301);
    detail::few_rows_times_wt(TypeParam{}, c, x.bottomRows(m).data(), x.outerStride(), m, w.data(), w.outerStride(),
                              w.rows(), w.cols());
    return c;
  };
  const Matrix<float> all = product(most);
  for (Index m = 1; m < most; ++m) EXPECT_TRUE(product(m) == all.bottomRows(m)) << m << " rows";
}

/// The name of the widest form this CPU runs, found here without the library's choice.
std::string widest_form() {
  std::string name = detail::BuildVectors::name;
  int bytes = detail::BuildVectors::bytes;
  [&]<class... Form>(std::tuple<Form...>*) {
    ((Form::available() && Form::bytes > bytes ? (name = Form::name, bytes = Form::bytes) : 0), ...);
  }(static_cast<detail::DecodeForms*>(nullptr));
  return name;
}

TEST(FewRowsDispatch, GemmAddRunsTheWidestFormThisCpuRuns) {
  std::string chosen;
  detail::with_decode_vectors([&](auto form) { chosen = decltype(form)::name; });
  EXPECT_EQ(chosen, widest_form());

  detail::with_decode_vectors([](auto form) {
    const Matrix<float> x = Matrix<float>::Random(5, 300), w = Matrix<float>::Random(70, 300);
    Matrix<float> c = Matrix<float>::Zero(5, 70), expected = c;
    detail::GemmWorkspace<float> workspace;
    detail::gemm_add(workspace, c, x, w.transpose());
    detail::few_rows_times_wt(form, expected, x.data(), x.outerStride(), 5, w.data(), w.outerStride(), 70, 300);
    EXPECT_TRUE(c == expected) << "gemm_add and the " << decltype(form)::name << " form disagree";
  });
}

TEST(FewRowsDispatch, PastAFewRowsGemmAddRunsTheKernelOnlyWhereItsVectorsAreWiderThanTheBuilds) {
  const bool wider = widest_form() != detail::BuildVectors::name;
  EXPECT_EQ(detail::runs_wider_than_build(), wider);

  const Index m = detail::few_rows + 9, n = 70, k = 200;  // k within one packed block: Eigen's bits
  const Matrix<float> x = Matrix<float>::Random(m, k), w = Matrix<float>::Random(n, k);
  Matrix<float> c = Matrix<float>::Zero(m, n), kernel = c, eigen = c;
  detail::GemmWorkspace<float> workspace;
  detail::gemm_add(workspace, c, x, w.transpose());
  detail::with_decode_vectors([&](auto form) {
    detail::few_rows_times_wt(form, kernel, x.data(), x.outerStride(), m, w.data(), w.outerStride(), n, k);
  });
  eigen.noalias() += x * w.transpose();
  ASSERT_FALSE(kernel == eigen) << "the test needs products whose bits tell the two apart";
  if (wider)
    EXPECT_TRUE(c == kernel) << "gemm_add did not run the " << widest_form() << " form";
  else
    EXPECT_TRUE(c == eigen) << "gemm_add did not run Eigen's GEMM";
}

}  // namespace
}  // namespace moekit
