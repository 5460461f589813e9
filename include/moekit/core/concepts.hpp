#pragma once
// The six policy kinds. A policy first declares its kind (`using policy_kind = router_kind;`),
// then models that kind's concept below: the members the layer calls. This file is the complete
// definition of each kind: the members every policy of the kind has, and the optional hooks
// (named concepts) the layer calls where a policy has them. docs/policies/<kind>.md explains each.
#include <concepts>
#include <cstdint>
#include <span>
#include <string_view>
#include <utility>
#include <vector>

#include <moekit/core/group.hpp>
#include <moekit/core/routing.hpp>
#include <moekit/core/tensor.hpp>

namespace moekit {

namespace detail {
template <class T>
class GemmWorkspace;
}
/// Scratch a layer lends its expert at each call: per-thread GEMM packing buffers, grown as
/// products need and kept between calls, one set for all of the layer's GEMMs (router and
/// experts). Nothing in it is meant to outlive a call. core/gemm.hpp
template <class T>
using Workspace = detail::GemmWorkspace<T>;

struct router_kind {
  static constexpr std::string_view name = "Router";
};
struct balancer_kind {
  static constexpr std::string_view name = "Balancer";
};
struct dispatcher_kind {
  static constexpr std::string_view name = "Dispatcher";
};
struct expert_kind {
  static constexpr std::string_view name = "Expert";
};
struct parallel_kind {
  static constexpr std::string_view name = "Parallel";
};
struct shared_expert_kind {
  static constexpr std::string_view name = "SharedExpert";
};
struct precision_kind {
  static constexpr std::string_view name = "Precision";
};

/// What the experts' products compute on. docs/concepts.md#precision
enum class Precision {
  scalar,  // the layer's scalar, float or double
  bf16,    // operands rounded to bf16, sums in float (float layers): mixed precision
  int8,    // weights int8 per output channel, rows int8 per row, sums int32 (float layers): inference
};

/// A precision among MoELayer's policies: MoELayer<TopK<2>, bf16>.
template <Precision P>
struct ProductPrecision {
  using policy_kind = precision_kind;
  static constexpr Precision value = P;
  static constexpr std::string_view name = P == Precision::bf16 ? "bf16" : P == Precision::int8 ? "int8" : "scalar";
};

/// Mixed precision: the experts' (and shared expert's) products on bf16 operands with float sums;
/// the parameters, their gradients, the router and the balancing stay float.
using bf16 = ProductPrecision<Precision::bf16>;

/// Weight-only int8 inference: the experts' (and shared expert's) weights quantised to int8 per
/// output channel when the layer's parameters are set, their inputs per row as they run, the
/// sums exact in int32; the router and the balancing stay float. Forward only.
using int8 = ProductPrecision<Precision::int8>;

/// The precision of an expert's products: its own, or the layer's scalar for an expert that has
/// none.
template <class X>
inline constexpr Precision precision_of = [] {
  if constexpr (requires { X::precision; }) return X::precision;
  return Precision::scalar;
}();

template <class P, class Kind>
concept DeclaresKind = requires { typename P::policy_kind; } &&
                       std::same_as<typename P::policy_kind, Kind>;

/// A type that declares one of the six kinds.
template <class P>
concept Policy = DeclaresKind<P, router_kind> || DeclaresKind<P, balancer_kind> ||
                 DeclaresKind<P, dispatcher_kind> || DeclaresKind<P, expert_kind> ||
                 DeclaresKind<P, parallel_kind> || DeclaresKind<P, shared_expert_kind> ||
                 DeclaresKind<P, precision_kind>;

template <class P>
concept Named = requires {
  { P::name } -> std::convertible_to<std::string_view>;
};

/// Whether a router scores tokens against experts (router.weight, logits, scores): every router
/// but one that declares `scores = false` (Hash, which picks by token id).
template <class P>
inline constexpr bool router_scores = [] {
  if constexpr (requires { P::scores; }) return bool(P::scores);
  return true;
}();

/// Whether a router's choices per token vary (ExpertChoice, `choices_vary = true`: each expert
/// picks its tokens, so a token gets none, one or several). Its Routing has one slot per expert,
/// [T,E], slot e expert e or left empty, and its top_k is 0; the layer calls its select with the
/// context, whose batch group it picks over.
template <class P>
inline constexpr bool router_choices_vary = [] {
  if constexpr (requires { P::choices_vary; }) return bool(P::choices_vary);
  return false;
}();

/// Scores tokens against experts and picks K of them (or, with `choices_vary`, lets each expert
/// pick its tokens); or, with `scores = false`, picks them from what the layer tells it alone (the
/// token ids), and has no parameters and no gradient. docs/policies/router.md
template <class P>
concept Router =
    DeclaresKind<P, router_kind> && Named<P> &&
    requires(const P& p, const LayerShape& shape) {
      { P::top_k } -> std::convertible_to<int>;
      p.validate(shape);
    } &&
    (!router_scores<P> ||
     requires(const P& p, MatrixRef<double> scores, ConstMatrixRef<double> cscores, Routing<double>& routing,
              const Routing<double>& crouting, std::span<const double> d_weight) {
       { p.score_function() } -> std::same_as<ScoreFn>;
       p.score(scores);                                  // logits → scores, in place      [T,E]
       p.select(cscores, cscores, routing);              // selection scores, scores → routing
       p.backward(cscores, crouting, d_weight, scores);  // scores, routing, [T,K] → d_logits [T,E]
     }) &&
    (router_scores<P> || requires(const P& p, const RouterContext& context, Index experts, Routing<double>& routing) {
      p.select(context, experts, routing);  // the context's token ids → routing
    }) &&
    (!router_choices_vary<P> ||
     requires(const P& p, ConstMatrixRef<double> cscores, const RouterContext& context, Routing<double>& routing) {
       p.select(cscores, cscores, context, routing);  // over the context's batch group
     });

/// A router that reads each token's id (Hash): the layer then needs set_token_ids() before a
/// forward, has the router check the ids, and passes them in RouterContext::token_ids.
template <class P>
concept RouterReadsTokenIds = Router<P> && requires(const P& p, std::span<const Index> ids) {
  p.check_token_ids(ids);  // throws, naming the token, for an id the router cannot map
};

/// A router whose weights may scale the experts' input rather than their output (TopK's
/// weight_at option); a router without this hook scales the output.
template <class P>
concept RouterPlacesWeights = Router<P> && requires(const P& p) {
  { p.weight_at() } -> std::same_as<WeightAt>;
};

/// A router whose logits may have a bias of their own (TopK's logit_bias option): the layer then
/// holds router.logit_bias [E], adds it to x·Wᵀ and gives it its gradient.
template <class P>
concept RouterHasLogitBias = Router<P> && requires(const P& p) {
  { p.logit_bias() } -> std::same_as<bool>;
};

/// A router that may draw random numbers as it selects (TopK's random_second): when draws() says
/// so, the layer calls this select, telling it the mode, step and token numbering. Its plain
/// select is what it does at evaluation.
template <class P>
concept RouterDraws = Router<P> && requires(const P& p, ConstMatrixRef<double> selection, ConstMatrixRef<double> scores,
                                            const RouterContext& context, Routing<double>& out) {
  { p.draws() } -> std::same_as<bool>;
  p.select(selection, scores, context, out);
};

/// A router that may jitter its input in training (TopK's jitter option): the layer multiplies
/// each element of the router's copy of x by a draw from [1 − ε, 1 + ε) (the experts see x
/// itself) and gives x and router.weight the jittered product's gradient.
template <class P>
concept RouterJittersInput = Router<P> && requires(const P& p) {
  { p.input_jitter() } -> std::same_as<InputJitter>;
};

/// A router that may add noise of a learned scale to its logits in training (TopK's noisy_gating,
/// Shazeer's): when noisy_gating() says so, the layer holds router.noise_weight [E,H] (W_n, 0 at
/// initialisation), computes x·W_nᵀ beside the logits, adds n ⊙ softplus(x·W_nᵀ) to them in
/// training and gives W_n and x its gradient.
template <class P>
concept RouterHasNoisyGating = Router<P> && requires(const P& p) {
  { p.noisy_gating() } -> std::same_as<NoisyGating>;
};

/// Keeps expert load even: loss terms with their gradient, and/or a bias on selection.
/// docs/policies/balance.md
template <class P>
concept Balancer =
    DeclaresKind<P, balancer_kind> && Named<P> &&
    requires(const P& p, const LayerShape& shape, ConstMatrixRef<double> scores,
             const BalanceContext& context, typename P::template State<double>& state,
             MatrixRef<double> d_logits) {
      p.validate(shape);
      { p.forward(scores, context, state) } -> std::convertible_to<double>;  // the loss
      p.backward(scores, context, state, d_logits);  // adds d(loss)/d(logits)
    };

/// Whether a balancer reads what a router's scores give (scores, logits, weights): every one
/// but one that declares `reads_scores = false` (NoBalance). A router without scores (Hash) takes
/// only those.
template <class P>
inline constexpr bool balancer_reads_scores = [] {
  if constexpr (requires { P::reads_scores; }) return bool(P::reads_scores);
  return true;
}();

/// Whether a balancer assumes each token makes K choices (`assumes_top_k = true`: AuxLoss's and
/// SeqAuxLoss's f from each token's top K, Sinkhorn's and AuxFree's selection for a top K,
/// LoadLoss's K-th largest logit). A router whose choices vary (ExpertChoice) refuses it.
template <class P>
inline constexpr bool balancer_assumes_top_k = [] {
  if constexpr (requires { P::assumes_top_k; }) return bool(P::assumes_top_k);
  return false;
}();

// A balancer's optional hooks: the layer calls each one the balancer has, at the stage named.

/// Shapes what the router selects on, never the combine weights (Sinkhorn's plan, AuxFree's bias).
/// Called before the router's select, which then picks on `selection` and weighs by `scores`.
template <class P, class T>
concept BalancerSelects =
    Balancer<P> && requires(const P& p, ConstMatrixRef<T> scores, const BalanceContext& context,
                            typename P::template State<T>& state, MatrixRef<T> selection) {
      p.template select<T>(scores, context, state, selection);  // selection: the logits on entry [T,E]
    };

/// Reads the router's logits before the router turns them into scores (ZLoss: their
/// log-sum-exp). Its loss and gradient then come from forward and backward as any balancer's.
template <class P, class T>
concept BalancerReadsLogits =
    Balancer<P> && requires(const P& p, ConstMatrixRef<T> logits, const BalanceContext& context,
                            typename P::template State<T>& state) {
      p.template logits<T>(logits, context, state);  // [T,E]
    };

/// Reads noisy gating's logits (LoadLoss: each expert's probability of being chosen under fresh
/// noise), before the router turns them into scores; gives its gradient back through them. The
/// layer refuses it with a router without noisy gating.
template <class P, class T>
concept BalancerReadsNoisyLogits =
    Balancer<P> && requires(const P& p, const NoisyLogits<T>& logits, const BalanceContext& context,
                            typename P::template State<T>& state, MatrixRef<T> d_noisy, MatrixRef<T> d_clean,
                            MatrixRef<T> d_noise) {
      p.template noisy_logits<T>(logits, context, state);
      p.template noisy_logits_backward<T>(logits, context, state, d_noisy, d_clean, d_noise);  // each adds [T,E]
    };

/// Reads the router's choices and weights, before the plan (ImportanceLoss: each expert's sum of
/// gates), and adds its gradient with respect to the weights.
template <class P, class T>
concept BalancerReadsWeights =
    Balancer<P> && requires(const P& p, const Routing<T>& routing, const BalanceContext& context,
                            typename P::template State<T>& state, std::span<T> d_weight) {
      p.template weights<T>(routing, context, state);
      p.template weights_backward<T>(routing, context, state, d_weight);  // adds [T,K]
    };

/// Is told, after the plan, how many choices each expert kept (AuxFree counts them).
template <class P, class T>
concept BalancerCountsLoad =
    Balancer<P> && requires(const P& p, std::span<const Index> kept_per_expert,
                            typename P::template State<T>& state) {
      p.template routed<T>(kept_per_expert, state);  // [E]
    };

/// Updates its state at the layer's end_step(), after the optimizer's step (AuxFree's bias).
template <class P, class T>
concept BalancerSteps =
    Balancer<P> && requires(const P& p, const BalanceContext& context, typename P::template State<T>& state) {
      p.template step<T>(context, state);
    };

/// A balancer of several terms (Balanced<...>): each term's name and last loss, which the routing
/// statistics list one by one.
template <class P, class T>
concept BalancerHasTerms = Balancer<P> && requires(const P& p, const typename P::template State<T>& state) {
  { p.template term_losses<T>(state) } -> std::convertible_to<std::vector<std::pair<std::string_view, double>>>;
};

/// A balancer whose state saves and loads with the layer's parameters (AuxFree's bias): one
/// double tensor [E] under `saved_name`, empty until there is something to save.
template <class P, class T>
concept SavesState = Balancer<P> && requires(const P& p, const typename P::template State<T>& saved_state,
                                             typename P::template State<T>& state, std::vector<double> values) {
  { P::saved_name } -> std::convertible_to<std::string_view>;
  { p.saved(saved_state) } -> std::convertible_to<std::span<const double>>;
  p.restore(std::move(values), state);  // values [E], checked by the layer
};

/// Decides which (token, expert) pairs are kept and where their rows go. docs/policies/dispatch.md
template <class P>
concept Dispatcher = DeclaresKind<P, dispatcher_kind> && Named<P> &&
                     requires(const P& p, const LayerShape& shape,
                              const Routing<double>& routing, Index experts, Plan& plan) {
                       p.validate(shape);
                       p.plan(routing, experts, plan);  // choices → rows
                     };

// A dispatcher's optional hooks.

/// Changes the combine weights after the plan (Capacity's renormalize), and takes the weights'
/// gradient back through the change.
template <class P, class T>
concept DispatcherAdjustsWeights =
    Dispatcher<P> && requires(const P& p, const Plan& plan, Routing<T>& routing,
                              std::span<const T> weight_before, std::span<T> d_weight) {
      p.template adjust_weights<T>(plan, routing);
      p.template adjust_weights_backward<T>(plan, weight_before, d_weight);  // d(w') → d(w), in place
    };

/// Keeps or drops each choice by itself (Dropless: `decides_each_choice_alone = true`), so that
/// over ranks each plans its own tokens; any other dispatcher plans the whole batch group's
/// routing at once (dispatch/batch_plan.hpp).
template <class P>
concept DispatcherDecidesEachChoiceAlone = Dispatcher<P> && requires {
  requires bool(P::decides_each_choice_alone);
};

/// The expert network, run over contiguous per-expert row blocks. docs/policies/expert.md
template <class P>
concept Expert =
    DeclaresKind<P, expert_kind> && Named<P> &&
    requires(const P& p, const LayerShape& shape, std::span<const Tensor<double>> weights,
             std::span<Tensor<double>> grads, ConstMatrixRef<double> rows,
             std::span<const Index> offsets, MatrixRef<double> out, MatrixRef<double> rows_then_d_rows,
             ConstMatrixRef<double> d_out, typename P::template Saved<double>& saved,
             Workspace<double>& workspace) {
      { P::parameters(shape, Index{}) } -> std::same_as<std::vector<ParameterSpec>>;
      p.validate(shape);
      p.forward(weights, rows, offsets, out, saved, workspace);  // rows [S,H] → out [S,H]
      // d_out [S,H]; the rows forward had, overwritten with d_rows; adds the weights' gradients
      p.backward(weights, rows_then_d_rows, offsets, saved, d_out, grads, workspace);
    };

/// An always-on expert beside the routed ones (or none: `present = false`, no other member
/// needed but its parameters, none, and validate). docs/policies/expert.md#shared-experts
template <class P>
concept SharedExpert =
    DeclaresKind<P, shared_expert_kind> && Named<P> &&
    requires(const P& p, const LayerShape& shape) {
      { P::present } -> std::convertible_to<bool>;
      { P::parameters(shape) } -> std::same_as<std::vector<ParameterSpec>>;
      p.validate(shape);
    } &&
    (!P::present ||
     requires(const P& p, std::span<const Tensor<double>> weights, std::span<Tensor<double>> grads,
              ConstMatrixRef<double> x, MatrixRef<double> y, typename P::template Saved<double>& saved,
              Workspace<double>& workspace) {
       p.forward(weights, x, y, saved, workspace);  // y += the shared expert's output    [T,H]
       // dy → its d_x [T,H]; adds its parameters' gradients into grads
       { p.backward(weights, x, ConstMatrixRef<double>(y), saved, grads, workspace) }
           -> std::convertible_to<ConstMatrixRef<double>>;
     });

/// Where experts live and how rows travel to them. docs/policies/parallel.md
/// A policy with `moves_rows = true` must also model RowMovingParallel.
template <class P>
concept Parallel = DeclaresKind<P, parallel_kind> && Named<P> &&
                   requires(P& p, const P& cp, const LayerShape& shape,
                            std::span<Tensor<double>> grads) {
                     { P::moves_rows } -> std::convertible_to<bool>;
                     p.validate(shape);  // checks the shape; sets up any groups
                     { cp.local_experts(shape) } -> std::same_as<ExpertRange>;
                     { cp.local_ffn(shape) } -> std::same_as<ExpertRange>;  // this rank's F slice
                     { cp.batch() } -> std::convertible_to<const BatchGroup&>;
                     cp.all_or_none("forward", [] {});  // runs a step's checks; a failure anywhere fails everywhere
                     cp.reduce_gradients(grads, grads);  // (replicated, expert) after backward
                   };

/// A Parallel whose ranks hold copies of some parameters (the router's on every rank, an
/// expert's on its expert-data-parallel ranks): after construction and after a load it checks,
/// from each rank's hashes of its router and expert values, that the copies agree, so that a
/// rank built with another seed or loaded from another rank's file is named, not trained on.
template <class P>
concept ParallelChecksReplicas =
    Parallel<P> && requires(const P& cp, std::uint64_t router_hash, std::uint64_t expert_hash) {
      cp.check_replicas(router_hash, expert_hash, std::string_view("load"));
    };

/// A Parallel that sends each row to the rank of its expert and back (moves_rows = true), as
/// ExpertParallel does. The layer calls, in each forward and backward:
template <class P>
concept RowMovingParallel =
    Parallel<P> && P::moves_rows &&
    requires(P& p, const P& cp, std::span<const Index> rows_per_expert, ConstMatrixRef<double> rows,
             MatrixRef<double> expert_rows, MatrixRef<double> expert_out, MatrixRef<double> out) {
      p.route(rows_per_expert);  // forward: this rank's rows per expert; agrees what goes where
      { cp.expert_rows() } -> std::convertible_to<Index>;  // rows that arrive at this rank's experts
      { cp.chunks() } -> std::convertible_to<int>;         // pieces the exchange overlaps compute in
      // rows → expert_rows on the experts' ranks; compute(chunk, first_row, offsets) fills those
      // rows of expert_out; they come back into out, in rows' order
      p.template through_experts<double>(rows, expert_rows, expert_out, out,
                                         [](int, Index, std::span<const Index>) {});
    };

}  // namespace moekit
