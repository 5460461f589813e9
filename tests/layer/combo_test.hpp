#pragma once
// The tests every layer combination must pass. Each combo_<router>_test.cpp instantiates them
// for one router, which keeps each translation unit small enough to compile on two cores:
// LayerCombo for the layers that train, InferenceCombo (the same checks, forward only) for
// those that run forward only (int8 experts).
#include <gtest/gtest.h>
#include <tbb/global_control.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <numeric>
#include <tuple>
#include <utility>
#include <vector>

#include <moekit/io/hf_block.hpp>
#include <moekit/moekit.hpp>

#include "../support/combos.hpp"
#include "../support/grad_check.hpp"
#include "../support/random.hpp"
#include "../support/reference.hpp"
#include "../support/tolerance.hpp"

namespace moekit::test {

template <class Layer>
class LayerCombo : public ::testing::Test {
 protected:
  using T = typename Layer::scalar_type;
  using R = typename Layer::router_type;
  using B = typename Layer::balancer_type;
  using X = typename Layer::expert_type;
  static constexpr int K = Layer::top_k;

  static LayerConfig config() { return {.hidden = 6, .ffn = 5, .experts = K > 2 ? 6 : 4, .seed = 11}; }

  /// The router settings of the models moekit follows, all valid for this K; only those with
  /// noisy gating for a balancer that reads its logits.
  static std::vector<typename R::Options> router_variants() {
    using O = typename R::Options;
    if constexpr (BalancerReadsNoisyLogits<B, T>)
      return {O{.normalize = true, .noisy_gating = true, .seed = 7},  // Shazeer's
              O{.score = ScoreFn::sigmoid, .normalize = true, .scale = 2.5, .noisy_gating = true, .seed = 8}};
    const int groups = static_cast<int>(config().experts / 2);  // of two experts each
    if constexpr (K == 1)
      return {O{ScoreFn::softmax, false, 1.0}, O{ScoreFn::sigmoid, false, 1.0},
              O{ScoreFn::softmax, false, 2.5},
              O{ScoreFn::softmax, false, 1.0, groups, 1, GroupScore::max},  // DeepSeek-V2's groups
              O{.normalize = false, .jitter = 0.1, .seed = 5}};             // Switch's input jitter
    std::vector<O> variants{O{ScoreFn::softmax, true, 1.0}, O{ScoreFn::softmax, false, 1.0},
                            O{ScoreFn::sigmoid, true, 2.5}, O{ScoreFn::sigmoid, false, 1.0},
                            O{ScoreFn::sigmoid, true, 2.5, groups, K / 2, GroupScore::top2_sum}};  // DeepSeek-V3's
    if constexpr (K == 2) {
      variants.push_back(O{.normalize = true, .random_second = 0.6, .seed = 3});  // GShard's
      variants.push_back(O{.normalize = true, .noisy_gating = true, .seed = 7});  // Shazeer's
    }
    return variants;
  }

  /// A layer with a large balancer coefficient (so its gradient weighs in) and small GEMM tiles
  /// (so that even small batches are cut into many tiles).
  template <class L = Layer>
  static L make(const typename R::Options& router_options, LayerConfig c = config()) {
    L layer(c, R{router_options});
    set_coefficients(layer.balancer());
    if constexpr (std::same_as<typename L::dispatcher_type, Capacity>) layer.dispatcher().options.capacity_factor = 0.75;  // drops happen
    if constexpr (requires { layer.expert().options.row_tile; }) {
      layer.expert().options.row_tile = 3;
      layer.expert().options.column_tile = 2;
    }
    if constexpr (!L::quantises_weights)  // noise of a scale that differs by token and expert, not 0's
      if (router_options.noisy_gating) {
        auto w = layer.parameter("router.noise_weight").values();
        const Matrix<T> drawn = random(1, Index(w.size()), 17);
        std::copy(drawn.data(), drawn.data() + drawn.size(), w.begin());
      }
    return layer;
  }

  static Matrix<T> random(Index rows, Index cols, unsigned seed) { return random_matrix<T>(rows, cols, seed); }

  /// What noisy gating adds to the logits of `layer` in training: n ⊙ softplus(x·W_nᵀ), n the
  /// draws its options name; none (an empty matrix) otherwise.
  template <class L>
  static Matrix<double> logit_noise(const Matrix<double>& routed_x, const typename R::Options& options, const L& layer) {
    if (!options.noisy_gating || !layer.training()) return {};
    const Matrix<double> noise = routed_x * layer.parameter("router.noise_weight").matrix().template cast<double>().transpose();
    Matrix<double> added(noise.rows(), noise.cols());
    for (Index t = 0; t < noise.rows(); ++t)
      for (Index e = 0; e < noise.cols(); ++e)
        added(t, e) = random_normal({options.seed, layer.step(), t, e, RandomStream::logit_noise}) * softplus(noise(t, e));
    return added;
  }

  /// The x the router of `layer` reads: x, or in training x jittered by the draws its options name.
  template <class L>
  static Matrix<double> router_input(const Matrix<double>& x, const typename R::Options& options, const L& layer) {
    Matrix<double> jittered = x;
    const std::uint64_t step = layer.step();
    if (options.jitter > 0 && layer.training())
      for (Index t = 0; t < x.rows(); ++t)
        for (Index h = 0; h < x.cols(); ++h) jittered(t, h) *= jitter_factor({options.seed, step, t, h}, options.jitter);
    return jittered;
  }

  /// Every loss term's coefficient 0.5 (so its gradient weighs in), each term of a Balanced too.
  template <class B>
  static void set_coefficients(B& balancer) {
    if constexpr (requires { balancer.options.coefficient; }) balancer.options.coefficient = 0.5;
    if constexpr (requires { balancer.terms; })
      std::apply([](auto&... term) { (set_coefficients(term), ...); }, balancer.terms);
  }

  /// Each balancing term's loss without its coefficient, from the reference.
  struct ReferenceTerms {
    double aux_loss = 0, z_loss = 0, importance = 0, load = 0;
  };

  /// The loss the balancer Bal reports, its coefficients set as above.
  template <class Bal>
  static double expected_balance_loss(const ReferenceTerms& r) {
    if constexpr (std::same_as<Bal, AuxLoss> || std::same_as<Bal, SeqAuxLoss>) return 0.5 * r.aux_loss;  // one sequence
    if constexpr (std::same_as<Bal, ZLoss>) return 0.5 * r.z_loss;
    if constexpr (std::same_as<Bal, ImportanceLoss>) return 0.5 * r.importance;
    if constexpr (std::same_as<Bal, LoadLoss>) return 0.5 * r.load;
    if constexpr (requires { Bal{}.terms; })
      return std::apply([&](const auto&... term) {
        return (expected_balance_loss<std::remove_cvref_t<decltype(term)>>(r) + ...);
      }, Bal{}.terms);
    return 0.0;
  }

  static double error(ConstMatrixRef<T> a, ConstMatrixRef<T> b) {
    return io::relative_error(std::span<const T>(a.data(), a.size()), std::span<const T>(b.data(), b.size()));
  }

  /// Whether the layer trains: one with int8 experts runs forward only.
  static constexpr bool trains = !Layer::quantises_weights;

  // ---- the checks, shared by LayerCombo and InferenceCombo -------------------------------------

  /// y against the formulas in double (tests/support/reference.hpp), for every router setting.
  static void forward_matches_the_formulas() {
    using A = typename X::activation;
    const Unit u = A::name == "SwiGLU" ? Unit::swiglu
                   : A::name == "GeLU"  ? Unit::gelu
                   : A::name == "ReLU"  ? Unit::relu
                                        : Unit::clamped_swiglu;
    // Ten times the layer's tolerance (float sums in another order than the reference's), but an
    // int8 layer's tolerance is already the bound its quantisation is documented to keep.
    const double bound = trains ? 10 * layer_tolerance<Layer> : layer_tolerance<Layer>;
    for (const auto& options : router_variants()) {
      auto layer = make(options);
      const auto x = random(9, 6, 3);
      const Matrix<T> y = layer.forward(x);
      auto as_double = [&](std::string_view name) {
        const auto v = std::as_const(layer).parameter(name).values();
        return std::vector<double>(v.begin(), v.end());
      };
      // Balancers that shape selection (Sinkhorn), dispatchers that drop (Capacity) and group-limited
      // routing (its rule is held to its own reference in tests/router/top_k_test.cpp) decide
      // elsewhere: the formulas then follow the layer's choices and hold it to the rest.
      const bool plain_selection = !std::same_as<typename Layer::balancer_type, Sinkhorn> &&
                                   std::same_as<typename Layer::dispatcher_type, Dropless> && options.groups == 1 &&
                                   (options.random_second == 0 || !layer.training());
      ForcedChoices forced;
      for (Index t = 0; t < x.rows(); ++t) {
        forced.chosen.emplace_back();
        forced.kept.emplace_back();
        for (int k = 0; k < K; ++k) {
          const auto c = static_cast<std::size_t>(t * K + k);
          forced.chosen.back().push_back(Routing<T>::expert_of(layer.routing().index[c]));  // an empty choice's too
          forced.kept.back().push_back(layer.plan().slot[c] != Plan::no_slot);
        }
      }
      const Matrix<double> routed_x = router_input(x.template cast<double>(), options, layer);
      const Matrix<double> noise_added = logit_noise(routed_x, options, layer);
      const auto ref = reference_forward(
          x.template cast<double>(), as_double("router.weight"),
          A::gated ? as_double("experts.gate") : std::vector<double>{}, as_double("experts.up"),
          as_double("experts.down"), layer.shape().experts, layer.shape().ffn, K,
          {options.score, options.normalize, options.scale, &routed_x, noise_added.size() ? &noise_added : nullptr}, u, plain_selection ? nullptr : &forced, [&] {
            Biases b;
            if constexpr (requires { X::bias; })
              if (X::bias == ExpertBias::projections)
                b = {A::gated ? as_double("experts.gate_bias") : std::vector<double>{}, as_double("experts.up_bias"),
                     as_double("experts.down_bias")};
            return b;
          }());
      EXPECT_LT(error(y, ref.y.template cast<T>()), bound);
      if (plain_selection) {
        for (Index t = 0; t < x.rows(); ++t)
          for (int k = 0; k < K; ++k)
            EXPECT_EQ(layer.routing().index[static_cast<std::size_t>(t * K + k)],
                      ref.chosen[static_cast<std::size_t>(t)][static_cast<std::size_t>(k)]);
      }
      // The balancer runs in float whatever the experts' precision.
      ReferenceTerms terms{ref.aux_loss, reference_z_loss(ref.logits), reference_cv_squared(ref.importance)};
      if (options.noisy_gating) {
        const auto [clean, noise] = [&] {
          const auto weight = [&](std::string_view name) {
            return ConstMatrixMap<double>(as_double(name).data(), layer.shape().experts, x.cols()).eval();
          };
          return std::pair{Matrix<double>(routed_x * weight("router.weight").transpose()),
                           Matrix<double>(routed_x * weight("router.noise_weight").transpose())};
        }();
        terms.load = reference_cv_squared(reference_load(clean, ref.logits, noise, K));
      }
      const double expected_loss = expected_balance_loss<B>(terms);
      EXPECT_NEAR(layer.balance_loss(), expected_loss, 10 * tolerance<T>);
    }
  }

  /// y (and, where the layer trains, dx and every gradient) bit for bit on 1 and 8 threads.
  static void one_thread_and_many_give_the_same_bits() {
    const auto options = router_variants().front();
    const auto x = random(40, 6, 8);
    const auto dy = random(40, 6, 9);
    auto run = [&](std::size_t threads) {
      tbb::global_control limit(tbb::global_control::max_allowed_parallelism, threads);
      auto layer = make(options);
      Matrix<T> y = layer.forward(x);
      std::vector<T> all(y.data(), y.data() + y.size());
      if constexpr (trains) {
        Matrix<T> dx = layer.backward(dy);
        all.insert(all.end(), dx.data(), dx.data() + dx.size());
        for (const auto& g : layer.gradients()) all.insert(all.end(), g.values().begin(), g.values().end());
      }
      return all;
    };
    const auto one = run(1);
    const auto many = run(8);
    ASSERT_EQ(one.size(), many.size());
    EXPECT_EQ(0, std::memcmp(one.data(), many.data(), one.size() * sizeof(T)));
  }

  /// The grouped GEMM against the per-expert loop with the same parameters (the loop computes
  /// exactly: a bf16 or int8 layer is held to its precision's tolerance).
  static void grouped_gemm_and_per_expert_loop_agree() {
    using Twin = rebind<Layer, T, typename twin_expert<X>::type>;
    for (const auto& options : router_variants()) {
      auto layer = make(options);
      auto twin = make<Twin>(options);
      copy_parameters(twin, layer);
      if (!layer.training()) twin.eval();  // an int8 layer evaluates: its twin draws nothing either
      const auto x = random(13, 6, 12);
      const auto dy = random(13, 6, 13);
      const double forward_error = error(layer.forward(x), twin.forward(x));
      EXPECT_LT(forward_error, layer_tolerance<Layer>);
      if constexpr (precision_of<X> != Precision::scalar) {
        EXPECT_GT(forward_error, 1e-6) << "no rounding seen";
      }
      if constexpr (trains) {
        EXPECT_LT(error(layer.backward(dy), twin.backward(dy)), layer_tolerance<Layer>);
        for (std::size_t p = 0; p < layer.gradients().size(); ++p) {
          // router.noise_weight's gradient, Σ_t (d_H ⊙ n ⊙ σ)ᵀ x with draws n of either sign, cancels
          // more than the others: in bf16 its relative error reaches past the layer's tolerance.
          const double bound = layer.gradients()[p].name() == "router.noise_weight" ? 2 * layer_tolerance<Layer>
                                                                                     : layer_tolerance<Layer>;
          EXPECT_LT(io::relative_error(layer.gradients()[p].values(), twin.gradients()[p].values()), bound)
              << layer.gradients()[p].name();
        }
      }
    }
  }

  static void empty_batch_gives_empty_output_and_no_gradient() {
    auto layer = make(router_variants().front());
    const Matrix<T> x(0, 6), dy(0, 6);
    EXPECT_EQ(layer.forward(x).rows(), 0);
    EXPECT_EQ(layer.balance_loss(), T(0));
    for (Index n : layer.tokens_per_expert()) EXPECT_EQ(n, 0);
    if constexpr (trains) {
      EXPECT_EQ(layer.backward(dy).rows(), 0);
      for (const auto& g : layer.gradients())
        for (T v : g.values()) ASSERT_EQ(v, T(0)) << g.name();
    }
  }

  /// Buffers are reused across calls (and across batch sizes); nothing stale may leak through.
  static void repeated_steps_give_the_same_result() {
    auto layer = make(router_variants().front());
    const auto small = random(5, 6, 20), large = random(30, 6, 21);
    const Matrix<T> first = layer.forward(small);
    if constexpr (trains) {
      const Matrix<T> first_dx = layer.backward(small);
      layer.forward(large);
      layer.backward(large);
      layer.zero_grad();
      EXPECT_EQ(first, layer.forward(small));
      EXPECT_EQ(first_dx, layer.backward(small));
    } else {
      layer.forward(large);
      EXPECT_EQ(first, layer.forward(small));
    }
  }
};

TYPED_TEST_SUITE_P(LayerCombo);

TYPED_TEST_P(LayerCombo, ForwardMatchesTheFormulas) { TestFixture::forward_matches_the_formulas(); }

TYPED_TEST_P(LayerCombo, GradientsAreRight) {
  static_assert(TestFixture::trains);
  using T = typename TestFixture::T;
  for (const auto& options : TestFixture::router_variants()) {
    if constexpr (std::same_as<T, double>) {
      // Central differences of Σ(y ⊙ dy) + balance_loss, for x and every parameter.
      auto layer = TestFixture::make(options);
      const auto x = TestFixture::random(7, 6, 5);
      const auto dy = TestFixture::random(7, 6, 6);
      for (const auto& report : check_gradients(layer, x, dy))
        EXPECT_LT(report.error, 1e-6) << report.name << " with score "
                                      << to_string(options.score) << ", normalize "
                                      << options.normalize << ", scale " << options.scale;
    } else {
      // float: the same gradients as the double layer (checked above) to float precision.
      auto layer = TestFixture::make(options);
      auto exact = TestFixture::template make<rebind<TypeParam, double>>(options);
      copy_parameters(exact, layer);
      expect_gradients_as_exact(layer, exact, TestFixture::random(7, 6, 5), TestFixture::random(7, 6, 6),
                                5 * layer_tolerance<TypeParam>);
    }
  }
}

TYPED_TEST_P(LayerCombo, OneThreadAndManyGiveTheSameBits) { TestFixture::one_thread_and_many_give_the_same_bits(); }

TYPED_TEST_P(LayerCombo, GroupedGemmAndPerExpertLoopAgree) { TestFixture::grouped_gemm_and_per_expert_loop_agree(); }

TYPED_TEST_P(LayerCombo, EmptyBatchGivesEmptyOutputAndNoGradient) {
  TestFixture::empty_batch_gives_empty_output_and_no_gradient();
}

TYPED_TEST_P(LayerCombo, RepeatedStepsGiveTheSameResult) { TestFixture::repeated_steps_give_the_same_result(); }

REGISTER_TYPED_TEST_SUITE_P(LayerCombo, ForwardMatchesTheFormulas, GradientsAreRight,
                            OneThreadAndManyGiveTheSameBits, GroupedGemmAndPerExpertLoopAgree,
                            EmptyBatchGivesEmptyOutputAndNoGradient,
                            RepeatedStepsGiveTheSameResult);

/// The layers that run forward only (int8 experts): every check above but the gradients'.
template <class Layer>
class InferenceCombo : public LayerCombo<Layer> {
  static_assert(!LayerCombo<Layer>::trains, "InferenceCombo is for layers that run forward only; LayerCombo checks the others");
};

TYPED_TEST_SUITE_P(InferenceCombo);

TYPED_TEST_P(InferenceCombo, ForwardMatchesTheFormulas) { TestFixture::forward_matches_the_formulas(); }

TYPED_TEST_P(InferenceCombo, OneThreadAndManyGiveTheSameBits) { TestFixture::one_thread_and_many_give_the_same_bits(); }

TYPED_TEST_P(InferenceCombo, GroupedGemmAndPerExpertLoopAgree) {
  TestFixture::grouped_gemm_and_per_expert_loop_agree();
}

TYPED_TEST_P(InferenceCombo, EmptyBatchGivesEmptyOutput) { TestFixture::empty_batch_gives_empty_output_and_no_gradient(); }

TYPED_TEST_P(InferenceCombo, RepeatedStepsGiveTheSameResult) { TestFixture::repeated_steps_give_the_same_result(); }

REGISTER_TYPED_TEST_SUITE_P(InferenceCombo, ForwardMatchesTheFormulas, OneThreadAndManyGiveTheSameBits,
                            GroupedGemmAndPerExpertLoopAgree, EmptyBatchGivesEmptyOutput,
                            RepeatedStepsGiveTheSameResult);

}  // namespace moekit::test
