#pragma once
#include <atomic>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include <moekit/core/concepts.hpp>
#include <moekit/core/gemm.hpp>
#include <moekit/core/detail/tiles.hpp>
#include <moekit/core/error.hpp>
#include <moekit/core/random.hpp>
#include <moekit/dispatch/batch_plan.hpp>
#include <moekit/dispatch/permute.hpp>
#include <moekit/expert/activation.hpp>
#include <moekit/io/safetensors.hpp>
#include <moekit/layer/compose.hpp>
#include <moekit/layer/parameters.hpp>
#include <moekit/layer/routing_stats.hpp>

namespace moekit {

namespace detail {

/// "TopK2", "GroupedGemmSwiGLU", "GroupedGemmClampedSwiGLUBiased": a policy's name with its compile-time arguments.
template <class P>
std::string policy_label() {
  std::string label(P::name);
  if constexpr (requires { P::top_k; } && router_scores<P> && !router_choices_vary<P>)
    label += std::to_string(P::top_k);  // not Hash's (always 1) nor ExpertChoice's (none)
  if constexpr (requires { typename P::activation; }) label += P::activation::name;
  if constexpr (requires { P::bias; })
    if (P::bias == ExpertBias::projections) label += "Biased";
  return label;
}

}  // namespace detail

/// The MoE layer. Users name it through MoELayer<Ps...>, which puts the policies in this order.
/// docs/getting_started.md
///
/// forward(x) routes, dispatches, runs the experts and combines; backward(dy) returns dx and
/// adds the gradients of every parameter (and of the balancer's loss) into gradients().
template <Scalar T, Router R, Balancer B, Dispatcher D, Expert X, Parallel P, SharedExpert S>
class BasicMoELayer {
 public:
  using scalar_type = T;
  using router_type = R;
  using balancer_type = B;
  using dispatcher_type = D;
  using expert_type = X;
  using parallel_type = P;
  using shared_expert_type = S;
  static constexpr int top_k = R::top_k;  // 0 for a router whose choices vary
  static_assert(!BalancerReadsNoisyLogits<B, T> || RouterHasNoisyGating<R>,
                "moekit::MoELayer: the balancer reads noisy gating's logits (LoadLoss) but the router has no "
                "noisy gating; use TopK with noisy_gating = true, or another balancer");
  static_assert(router_scores<R> || !balancer_reads_scores<B>,
                "moekit::MoELayer: the router has no scores (Hash picks by token id) but the balancer reads "
                "them; use NoBalance (a hash is balanced by its construction)");
  /// Whether the experts, routed or shared, keep their weights quantised (int8): made from the
  /// parameters whenever those are set; such a layer runs forward only.
  static constexpr bool quantises_weights = precision_of<X> == Precision::int8 || [] {
    if constexpr (requires { typename S::expert_type; })
      return precision_of<typename S::expert_type> == Precision::int8;
    return false;
  }();

  /// Policies, in any order, replace the default-constructed ones: Layer(config, TopK<2>{{...}}).
  template <class... Policies>
  explicit BasicMoELayer(const LayerConfig& config, const Policies&... policies) : config_(config) {
    static_assert((is_own_policy<Policies> && ...),
                  "moekit::MoELayer: a constructor argument is not one of this layer's policy "
                  "types; pass policies of the types named in MoELayer<...>");
    (set_policy(policies), ...);
    if constexpr (RouterHasLogitBias<R>) logit_bias_ = router_.logit_bias();
    if constexpr (RouterHasNoisyGating<R>) noisy_ = router_.noisy_gating().enabled;
    shape_ = {config.hidden, config.ffn, config.experts, routing_slots(config.experts), config.shared_ffn};
    parallel_.validate(shape_);  // first: over ranks, it agrees the shape before anything can throw
    parallel_.all_or_none("construction", [&] {
      require(config.experts >= 1, "moekit::MoELayer: experts = ", config.experts,
              "; expected at least 1");
      require(config.hidden >= 1, "moekit::MoELayer: hidden = ", config.hidden,
              "; expected at least 1");
      require(config.ffn >= 1, "moekit::MoELayer: ffn = ", config.ffn,
              "; expected at least 1");
      Index size = 0;
      require(!__builtin_mul_overflow(config.experts, config.ffn, &size) &&
                  !__builtin_mul_overflow(size, config.hidden, &size) && size < (Index{1} << 62),
              "moekit::MoELayer: experts × ffn × hidden = ", config.experts, " × ", config.ffn, " × ",
              config.hidden, " overflows; expected a product below 2^62");
      require(config.shared_ffn >= 0 && !__builtin_mul_overflow(config.shared_ffn, config.hidden, &size) &&
                  size < (Index{1} << 62),
              "moekit::MoELayer: shared_ffn = ", config.shared_ffn, " with hidden = ", config.hidden,
              "; expected shared_ffn >= 0 and shared_ffn × hidden below 2^62");
      if constexpr (requires { X::bias; })
        require(X::bias == ExpertBias::none || parallel_.local_ffn(shape_).count == shape_.ffn,
                "moekit::MoELayer: experts with biases and each expert's ffn = ", shape_.ffn, " split over ",
                shape_.ffn / parallel_.local_ffn(shape_).count,
                " expert-tensor-parallel ranks; expected etp = 1 (each rank would add experts.down_bias to its "
                "partial sum)");
      validate_policies();
    });

    parameters_ = make_parameters();
    initialize(config.seed);
    check_replicas("construction");  // over ranks: every rank drew the same values from its seed
  }

  // ---- data path ----------------------------------------------------------------------------

  /// y = Σ_k weight_k · expert_k(x) for each token.                               [T,H] → [T,H]
  void forward(ConstMatrixRef<T> x, MatrixRef<T> y) {
    check_forward(x, y);
    have_forward_ = false;
    tokens_ = x.rows();
    score(x);                  // router: logits = x·Wᵀ → scores                        [T,E]
    select();                  // balancer shapes the selection, router picks K       [T,K]
    if constexpr (BalancerReadsWeights<B, T>) balancer_.template weights<T>(routing_, balance_context(), balance_state_);
    balance_loss_ = balancer_.template forward<T>(scores(), balance_context(), balance_state_);
    plan_rows();               // dispatcher: each kept choice's row                   [T·K] → [S]
    auto rows = rows_.matrix(plan_.rows(), shape_.hidden);
    gather<T>(plan_, input(), rows, input_weights());  // rows, times their weights if those scale the input
    auto out = expert_out_.matrix(plan_.rows(), shape_.hidden);
    run_experts(rows, out);    // expert, wherever the parallel policy puts it         [S,H]
    combine<T>(plan_, output_weights(), out, y);
    if constexpr (S::present)  // y += the shared expert's output, from the kept x (y may alias x)
      shared_.template forward<T>(parameters_.shared_weights(), input(), y, shared_saved_, workspace_);
    have_forward_ = true;
    if (observer_) observer_(stats());
  }

  Matrix<T> forward(ConstMatrixRef<T> x) {
    Matrix<T> y(x.rows(), shape_.hidden);
    forward(x, y);
    return y;
  }

  /// dx from dy, for the last forward; adds every parameter's gradient.          [T,H] → [T,H]
  /// The balancer's loss counts with weight 1, so the gradients are those of
  /// Σ(y ⊙ dy) + balance_loss(). One backward per forward: it overwrites what forward saved
  /// with gradients, so the step needs no second copy of the activations.
  void backward(ConstMatrixRef<T> dy, MatrixRef<T> dx) {
    static_assert(!quantises_weights, "moekit::MoELayer: an int8 layer is for inference, forward only; train in "
                                      "float or bf16 and convert (moekit::convert_layer)");
    check_backward(dy, dx);
    const Index rows = plan_.rows(), hidden = shape_.hidden;
    d_weight_.assign(static_cast<std::size_t>(routing_.choices()), T(0));
    auto d_out = expert_out_.matrix(rows, hidden);  // the experts' output, read once, becomes d_out
    combine_backward<T>(plan_, output_weights(), dy, d_out, d_weight_);
    // The shared expert reads dy, which dx may alias, so it goes back now; its d_x is added last.
    const auto shared_dx = [&] {
      if constexpr (S::present)
        return shared_.template backward<T>(parameters_.shared_weights(), input(), dy, shared_saved_,
                                            parameters_.shared_gradients(), workspace_);
      else
        return nullptr;
    }();
    // The experts write d_rows over the rows they were given, which backward reads for the last
    // time there: no [S,H] buffer is added for it.
    auto d_rows = rows_.matrix(rows, hidden);
    run_experts_backward(d_out, d_rows);
    if (!input_weights().empty())  // the weights scaled the rows: their gradient, and the rows' back to x
      weighted_gather_backward<T>(plan_, routing_.weight, input(), d_rows, d_weight_);
    if constexpr (DispatcherAdjustsWeights<D, T>)
      dispatcher_.template adjust_weights_backward<T>(plan_, weight_before_adjust_, d_weight_);
    if constexpr (BalancerReadsWeights<B, T>)
      balancer_.template weights_backward<T>(routing_, balance_context(), balance_state_, std::span<T>(d_weight_));
    if constexpr (router_scores<R>) {
      auto d_logits = d_logits_.matrix(tokens_, shape_.experts);
      router_.template backward<T>(scores(), routing_, d_weight_, d_logits);
      balancer_.template backward<T>(scores(), balance_context(), balance_state_, d_logits);
      if (noisy_) noise_backward(d_logits);  // d_logits becomes d(clean logits); d(noise logits) beside it
      score_backward(d_logits, d_rows, dx);  // dx = d_logits·W + scatter(d_rows); the router's gradient
    } else {  // the weights are constants: x's gradient comes through the experts alone
      detail::for_each_block(tokens_, token_block, [&](Index first, Index n) {
        dx.middleRows(first, n).setZero();
        scatter_add<T>(plan_, d_rows, first, n, dx);
      });
    }
    if constexpr (S::present)
      detail::for_each_block(tokens_, token_block,
                             [&](Index first, Index n) { dx.middleRows(first, n) += shared_dx.middleRows(first, n); });
    have_forward_ = false;                 // the saved activations now hold gradients
  }

  Matrix<T> backward(ConstMatrixRef<T> dy) {
    Matrix<T> dx(dy.rows(), shape_.hidden);
    backward(dy, dx);
    return dx;
  }

  // ---- parameters, by name; gradients mirror them one to one --------------------------------

  /// An int8 layer's parameters are read-only: set them with initialize, assign_whole or load,
  /// which quantise the experts' weights anew.
  std::span<Tensor<T>> parameters()
    requires(!quantises_weights)
  {
    return parameters_.values();
  }
  std::span<const Tensor<T>> parameters() const { return parameters_.values(); }
  std::span<Tensor<T>> gradients() { return parameters_.gradients(); }
  std::span<const Tensor<T>> gradients() const { return parameters_.gradients(); }
  Tensor<T>& parameter(std::string_view name)
    requires(!quantises_weights)
  {
    return parameters_.value(name);
  }
  const Tensor<T>& parameter(std::string_view name) const { return parameters_.value(name); }
  Tensor<T>& gradient(std::string_view name) { return parameters_.gradient(name); }
  const Tensor<T>& gradient(std::string_view name) const { return parameters_.gradient(name); }

  void zero_grad() { parameters_.zero_grad(); }

  /// The mode, as torch's train() and eval(). Training (the default, but for int8 layers, which
  /// only evaluate): backward runs and balancers count each forward's load (AuxFree). Evaluation:
  /// nothing is counted, Sinkhorn selects on the plain scores (Megatron-Core's evaluation) and
  /// backward is refused. Forward is otherwise the same. docs/concepts.md#mode
  void train()
    requires(!quantises_weights)
  {
    training_ = true;
  }
  void eval() { training_ = false; }
  bool training() const { return training_; }

  /// The batch's sequences, for balancing terms computed per sequence (SeqAuxLoss): their
  /// lengths in token order, which must add up to the tokens of every forward that follows; empty
  /// (the default) makes the batch one sequence.
  void set_sequences(std::span<const Index> lengths) {
    for (const Index n : lengths)
      require(n >= 1, "moekit::MoELayer::set_sequences: a sequence of ", n, " tokens; expected at least 1");
    sequence_offsets_.assign(1, 0);
    for (const Index n : lengths) sequence_offsets_.push_back(sequence_offsets_.back() + n);
    if (lengths.empty()) sequence_offsets_.clear();
  }
  /// Where each sequence set_sequences() gave begins, and the token count last; empty if none.
  std::span<const Index> sequence_offsets() const { return sequence_offsets_; }

  /// The batch's token ids (their indices in the vocabulary), in token order, for a router that
  /// reads them (Hash): one per token of every forward that follows, until set again.
  void set_token_ids(std::span<const Index> ids)
    requires RouterReadsTokenIds<R>
  {
    token_ids_.assign(ids.begin(), ids.end());
  }
  std::span<const Index> token_ids() const { return token_ids_; }

  /// Over ranks, after the last backward of a step and before the optimizer: gradients become
  /// those of J = (1/D)·Σ_r J_r over the D token shards of the batch group (the router's and the
  /// shared expert's averaged, the routed experts' summed over their replicas and divided by D).
  /// In one process, nothing to do. docs/distributed.md#gradients
  void reduce_gradients() {
    parallel_.template reduce_gradients<T>(parameters_.replicated_gradients(), parameters_.expert_gradients());
  }

  /// Fresh parameters, as torch's Linear draws them: U(±1/√fan_in), fan_in = the last dim; but
  /// router.noise_weight starts at 0, as Shazeer's, and takes no draws. The values are drawn for
  /// the whole layer and this rank keeps its slice, so a layer split over ranks starts where one
  /// process would.
  void initialize(std::uint64_t seed) {
    parameters_.initialize(seed);
    prepare_experts();
  }

  /// Sets every parameter from the whole layer's values (as one process holds them; same
  /// names and order as parameters()): a rank keeps its own slice.
  void assign_whole(std::span<const Tensor<T>> whole) {
    parameters_.assign_whole(whole);
    prepare_experts();
  }

  // ---- what the last forward decided --------------------------------------------------------

  const Routing<T>& routing() const { return routing_; }
  const Plan& plan() const { return plan_; }
  /// Kept choices per expert in the last forward (padding rows not counted).
  std::span<const Index> tokens_per_expert() const { return load_; }
  /// Load statistics of the last forward: per-expert tokens, drops, max/mean, balancer terms.
  RoutingStats stats() const {
    RoutingStats s = RoutingStats::from(plan_, load_);
    if constexpr (BalancerHasTerms<B, T>)
      for (const auto& [name, loss] : balancer_.template term_losses<T>(balance_state_))
        s.balance_terms.emplace_back(std::string(name), loss);
    else
      s.balance_terms.emplace_back(std::string(B::name), static_cast<double>(balance_loss_));
    return s;
  }
  /// Marks a step boundary (after the optimizer step): balancers that adapt between steps, such
  /// as AuxFree's bias, update here, and the step that random draws are counted from advances.
  void end_step() {
    if constexpr (BalancerSteps<B, T>) balancer_.template step<T>(balance_context(), balance_state_);
    ++step_;
  }

  /// The step random draws come from (the router's jitter): 0 when the layer is built, one more
  /// at each end_step(). Every forward of a step draws the same numbers; set_step replays a step
  /// or resumes a run. docs/concepts.md#random
  std::uint64_t step() const { return step_; }
  void set_step(std::uint64_t step) { step_ = step; }

  /// The balancer's state (AuxFree: its bias and counts).
  const typename B::template State<T>& balance_state() const { return balance_state_; }

  /// Calls `observer(stats())` after every forward, e.g. a JsonLinesLogger; {} detaches.
  void observe(std::function<void(const RoutingStats&)> observer) { observer_ = std::move(observer); }
  /// The balancer's loss (coefficient included) for the last forward.
  T balance_loss() const { return balance_loss_; }

  // ---- policies and shape -------------------------------------------------------------------

  const LayerShape& shape() const { return shape_; }
  const LayerConfig& config() const { return config_; }
  R& router() { return router_; }
  const R& router() const { return router_; }
  B& balancer() { return balancer_; }
  const B& balancer() const { return balancer_; }
  D& dispatcher() { return dispatcher_; }
  const D& dispatcher() const { return dispatcher_; }
  X& expert() { return expert_; }
  const X& expert() const { return expert_; }
  P& parallel() { return parallel_; }
  const P& parallel() const { return parallel_; }
  S& shared_expert() { return shared_; }
  const S& shared_expert() const { return shared_; }

  /// "TopK2_AuxLoss_Dropless_GroupedGemmSwiGLU_SingleProcess_f32" (and "_Shared" or
  /// "_SharedSigmoidGated" before the scalar, with a shared expert; "_bf16" or "_i8" for the
  /// scalar where the products are bf16 or int8)
  static std::string name() {
    std::string name = detail::policy_label<R>() + "_" + detail::policy_label<B>() + "_" +
                       detail::policy_label<D>() + "_" + detail::policy_label<X>() + "_" + detail::policy_label<P>();
    if constexpr (S::present) (name += '_') += S::name;  // +=, not "_" + …: GCC 12 warns falsely (-Wrestrict)
    if (precision_of<X> == Precision::bf16) return name += "_bf16";
    if (precision_of<X> == Precision::int8) return name += "_i8";
    return (name += '_') += scalar_name<T>;
  }

  // ---- safetensors --------------------------------------------------------------------------

  /// Writes every parameter under its name, in this layer's scalar type, and the balancer's
  /// saved state if it has one. Over ranks, each rank writes its own slices (to its own path).
  void save(const std::filesystem::path& path) const { checkpoint().write(path); }

  /// What save writes, as a file in memory.
  io::SafeTensors checkpoint() const {
    io::SafeTensors file;
    file.metadata() = {{"format", "moekit"},
                       {"layer", name()},
                       {"hidden", std::to_string(shape_.hidden)},
                       {"ffn", std::to_string(shape_.ffn)},
                       {"experts", std::to_string(shape_.experts)}};
    if constexpr (!router_choices_vary<R>) file.metadata()["topk"] = std::to_string(top_k);
    if constexpr (S::present) file.metadata()["shared_ffn"] = std::to_string(shape_.shared_ffn);
    parameters_.write_to(file);
    if constexpr (SavesState<B, T>) {
      if (const auto state = balancer_.saved(balance_state_); !state.empty())
        file.add<double>(std::string(B::saved_name), {shape_.experts}, state);
    }
    return file;
  }

  /// Reads every parameter by name from a safetensors file (F32 or F64; other tensors in the
  /// file are ignored). Everything is checked before anything is changed: a load that fails
  /// leaves the layer as it was. A tensor of the whole layer's shape gives this rank its slice,
  /// so a single-process checkpoint loads at any EP degree. Over ranks, every rank loads.
  void load(const std::filesystem::path& path) {
    io::SafeTensors file;
    parallel_.all_or_none("load", [&] {  // over ranks, every rank's file is checked before any changes
      file = io::SafeTensors::read(path);
      check_loadable(file, path);
    });
    take_loaded(file);
  }

  /// The same from a file in memory (e.g. tensors gathered from a model folder); `source` names
  /// it in messages.
  void load(const io::SafeTensors& file, const std::filesystem::path& source) {
    parallel_.all_or_none("load", [&] { check_loadable(file, source); });
    take_loaded(file);
  }

 private:
  void prepare_experts() {
    if constexpr (requires { expert_.template prepare<T>(parameters_.expert_weights()); })
      expert_.template prepare<T>(parameters_.expert_weights());
    if constexpr (requires { shared_.template prepare<T>(parameters_.shared_weights()); })
      shared_.template prepare<T>(parameters_.shared_weights());
  }

  template <class Q>
  static constexpr bool is_own_policy = std::is_same_v<Q, R> || std::is_same_v<Q, B> ||
                                        std::is_same_v<Q, D> || std::is_same_v<Q, X> ||
                                        std::is_same_v<Q, P> || std::is_same_v<Q, S>;

  void set_policy(const R& r) { router_ = r; }
  void set_policy(const B& b) { balancer_ = b; }
  void set_policy(const D& d) { dispatcher_ = d; }
  void set_policy(const X& x) { expert_ = x; }
  void set_policy(const P& p) { parallel_ = p; }
  void set_policy(const S& s) { shared_ = s; }

  /// That `file` holds every parameter, and the balancer's state if it has any, in shapes and
  /// types this layer can take; changes nothing.
  void check_loadable(const io::SafeTensors& file, const std::filesystem::path& path) const {
    parameters_.check(file, path);
    if constexpr (SavesState<B, T>) {
      const std::string name(B::saved_name);
      if (file.contains(name)) {
        const auto& info = file.info(name);
        require(info.shape == std::vector<Index>{shape_.experts}, "moekit::MoELayer::load: '", path.string(),
                "' tensor '", name, "' is ", shape_string(info.shape), "; expected [", shape_.experts, "]");
        require(info.dtype == io::DType::f32 || info.dtype == io::DType::f64, "moekit::MoELayer::load: '",
                path.string(), "' tensor '", name, "' is ", io::to_string(info.dtype), "; expected F32 or F64");
      }
    }
  }

  /// Sets the parameters (and the balancer's state) from a file that passed check_loadable on
  /// every rank; over ranks, the replicas' copies must agree before any is changed.
  void take_loaded(const io::SafeTensors& file) {
    if constexpr (ParallelChecksReplicas<P>) {
      LayerParameters<T> loaded = parameters_;
      loaded.read_from(file);
      const auto [router, experts] = loaded.hashes();
      parallel_.check_replicas(router, experts, "load");
      parameters_ = std::move(loaded);
    } else {
      parameters_.read_from(file);
    }
    prepare_experts();
    if constexpr (SavesState<B, T>) {
      if (file.contains(std::string(B::saved_name)))
        balancer_.restore(file.values<double>(std::string(B::saved_name)), balance_state_);
    }
  }

  /// router.weight (and router.logit_bias, router.noise_weight; none for a router without
  /// scores), the shared expert's (whole on every rank), then the routed experts'.
  LayerParameters<T> make_parameters() const {
    std::vector<ParameterSpec> local;
    if (router_scores<R>) local.push_back({"router.weight", {shape_.experts, shape_.hidden}});
    if (logit_bias_) local.push_back({"router.logit_bias", {shape_.experts}});
    if (noisy_) local.push_back({"router.noise_weight", {shape_.experts, shape_.hidden}, true});  // 0, as Shazeer's
    const std::size_t router_tensors = local.size();
    for (auto& spec : S::parameters(shape_)) local.push_back(std::move(spec));
    std::vector<std::vector<Index>> whole;
    for (const auto& spec : local) whole.push_back(spec.shape);
    const std::size_t replicated = local.size();
    LayerShape local_shape = shape_;  // the expert sizes this rank's parameters by its slice of F
    local_shape.ffn = parallel_.local_ffn(shape_).count;
    for (auto& spec : X::parameters(local_shape, parallel_.local_experts(shape_).count))
      local.push_back(std::move(spec));
    for (auto& spec : X::parameters(shape_, shape_.experts)) whole.push_back(std::move(spec.shape));
    return LayerParameters<T>(std::move(local), std::move(whole), parallel_.local_experts(shape_),
                              parallel_.local_ffn(shape_), replicated, router_tensors);
  }

  /// Over ranks, that the copies of replicated parameters agree (ParallelChecksReplicas).
  void check_replicas(std::string_view step) const {
    if constexpr (ParallelChecksReplicas<P>) {
      const auto [router, experts] = parameters_.hashes();
      parallel_.check_replicas(router, experts, step);
    }
  }


  // ---- the stages of forward and backward ---------------------------------------------------

  auto input() { return input_.matrix(tokens_, shape_.hidden); }  // x, kept for backward

  /// The weights as gather and combine apply them: to the experts' input or to their output
  /// (the other gets none).
  bool weights_scale_input() const {
    if constexpr (RouterPlacesWeights<R>) return router_.weight_at() == WeightAt::input;
    return false;
  }
  std::span<const T> input_weights() const { return weights_scale_input() ? std::span<const T>(routing_.weight) : std::span<const T>(); }
  std::span<const T> output_weights() const { return weights_scale_input() ? std::span<const T>() : std::span<const T>(routing_.weight); }
  auto scores() { return scores_.matrix(tokens_, shape_.experts); }

  /// Whether this forward jitters the router's input: in training, with a router's jitter ε > 0.
  bool jitters_input() const {
    if constexpr (RouterJittersInput<R>) return training_ && router_.input_jitter().epsilon > 0;
    return false;
  }
  /// Whether this forward's router draws as it selects: in training, if it says it does.
  bool router_draws() const {
    if constexpr (RouterDraws<R>) return training_ && router_.draws();
    return false;
  }
  /// The x the router reads: x itself, or x jittered.                                      [T,H]
  auto router_input() { return jittered_ ? jittered_input_.matrix(tokens_, shape_.hidden) : input(); }
  /// The factors x was jittered by, if it was.                                           [T,H]
  MatrixMap<T> jitter_factors() {
    return jittered_ ? jitter_factors_.matrix(tokens_, shape_.hidden) : MatrixMap<T>(nullptr, 0, 0);
  }

  /// Rows [first, first + n) of the router's x: x times a draw from [1 − ε, 1 + ε) per element,
  /// counted by (seed, step, the token's number in the whole batch, column).
  void jitter_rows(Index first, Index n, ConstMatrixRef<T> input, MatrixRef<T> factors, MatrixRef<T> jittered) const {
    if constexpr (RouterJittersInput<R>) {
      const auto [epsilon, seed] = router_.input_jitter();
      for (Index t = first; t < first + n; ++t) {
        const std::uint64_t token = token_bits({seed, step_, first_token_ + t, 0, RandomStream::jitter});
        for (Index h = 0; h < shape_.hidden; ++h) {
          factors(t, h) = T(jitter_of(uniform_of(lane_bits(token, h)), epsilon));
          jittered(t, h) = input(t, h) * factors(t, h);
        }
      }
    }
  }

  /// This rank's first token in the numbering of the whole batch: the tokens of the ranks before it.
  Index batch_first_token() const {
    const BatchGroup& batch = parallel_.batch();
    if (batch.size() == 1) return 0;
    const double mine = static_cast<double>(tokens_);
    std::vector<double> all;
    std::vector<Index> counts;
    batch.gather(std::span<const double>(&mine, 1), all, counts);
    Index first = 0;
    for (int r = 0; r < batch.rank(); ++r) first += static_cast<Index>(all[static_cast<std::size_t>(r)]);
    return first;
  }

  /// Keeps x (which also lets y alias it), then logits = x·Wᵀ (x jittered, if the router asks;
  /// with noise, in training, if it has noisy gating), turned into scores by the router. A router
  /// without scores has nothing to compute.
  void score(ConstMatrixRef<T> x) {
    if constexpr (router_scores<R>) {
      score_tokens(x);
    } else {
      auto input = this->input();
      detail::for_each_block(tokens_, token_block,
                             [&](Index first, Index n) { input.middleRows(first, n) = x.middleRows(first, n); });
    }
  }

  void score_tokens(ConstMatrixRef<T> x) {
    auto input = this->input();
    auto scores = this->scores();
    jittered_ = jitters_input();
    noised_ = noisy_ && training_;
    first_token_ = jittered_ || noised_ || router_draws() ? batch_first_token() : 0;
    auto router_input = this->router_input();
    auto factors = jitter_factors();
    auto clean = clean_logits_.matrix(noisy_ && BalancerReadsNoisyLogits<B, T> ? tokens_ : 0, shape_.experts);
    auto noise = noise_logits_.matrix(noisy_ ? tokens_ : 0, shape_.experts);
    auto normals = normals_.matrix(noised_ ? tokens_ : 0, shape_.experts);
    workspace_.ready();
    detail::for_each_block(tokens_, token_block, [&](Index first, Index n) {
      input.middleRows(first, n) = x.middleRows(first, n);
      if (jittered_) jitter_rows(first, n, input, factors, router_input);
      gemm(workspace_, scores.middleRows(first, n), router_input.middleRows(first, n),
                   parameters_.router_weight().matrix().transpose());
      if (logit_bias_) scores.middleRows(first, n).rowwise() += parameters_.router_bias().matrix().row(0);
      if (!noisy_) return;
      if constexpr (BalancerReadsNoisyLogits<B, T>) clean.middleRows(first, n) = scores.middleRows(first, n);
      else if (!noised_) return;  // at evaluation only a balancer that reads them needs the noise logits
      gemm(workspace_, noise.middleRows(first, n), router_input.middleRows(first, n),
           parameters_.router_noise_weight().matrix().transpose());
      if (noised_) add_noise(first, n, noise, normals, scores);
    });
    workspace_.ready();
    if constexpr (BalancerSelects<B, T>) selection_.matrix(tokens_, shape_.experts) = scores;  // the logits
    if constexpr (BalancerReadsLogits<B, T>) balancer_.template logits<T>(scores, balance_context(), balance_state_);
    if constexpr (BalancerReadsNoisyLogits<B, T>) {
      if (noised_) noisy_logits_.matrix(tokens_, shape_.experts) = scores;  // H, which the router overwrites
      balancer_.template noisy_logits<T>(noisy_logits(), balance_context(), balance_state_);
    }
    router_.template score<T>(scores);
  }

  /// Rows [first, first + n) of the logits plus n ⊙ softplus(noise), n a standard normal draw
  /// counted by (seed, step, the token's number in the whole batch, expert).
  void add_noise(Index first, Index n, ConstMatrixRef<T> noise, MatrixRef<T> normals, MatrixRef<T> logits) const {
    if constexpr (RouterHasNoisyGating<R>) {
      const std::uint64_t seed = router_.noisy_gating().seed;
      for (Index t = first; t < first + n; ++t) {
        const std::uint64_t token = token_bits({seed, step_, first_token_ + t, 0, RandomStream::logit_noise});
        for (Index e = 0; e < shape_.experts; ++e) {
          normals(t, e) = T(normal_of_lane(token, e));
          logits(t, e) += normals(t, e) * softplus(noise(t, e));
        }
      }
    }
  }

  /// The last forward's clean, noisy (the logits before the router scored them) and noise logits.
  NoisyLogits<T> noisy_logits() {
    auto clean = clean_logits_.matrix(tokens_, shape_.experts);
    return {clean, noised_ ? noisy_logits_.matrix(tokens_, shape_.experts) : clean,
            noise_logits_.matrix(tokens_, shape_.experts)};
  }

  /// d(H) → d(clean logits), in place, and d(noise logits) = d(H) ⊙ n ⊙ σ(noise), where H = clean
  /// + n ⊙ softplus(noise) (backward follows a training forward, which drew n); with the gradient
  /// of a balancing term that reads the noisy logits.
  void noise_backward(MatrixRef<T> d_logits) {
    auto d_noise = d_noise_logits_.matrix(tokens_, shape_.experts);
    auto d_clean = d_clean_logits_.matrix(BalancerReadsNoisyLogits<B, T> ? tokens_ : 0, shape_.experts);
    d_noise.setZero();
    if constexpr (BalancerReadsNoisyLogits<B, T>) {
      d_clean.setZero();
      balancer_.template noisy_logits_backward<T>(noisy_logits(), balance_context(), balance_state_, d_logits,
                                                  d_clean, d_noise);
    }
    const auto noise = noise_logits_.matrix(tokens_, shape_.experts);
    const auto normals = normals_.matrix(tokens_, shape_.experts);
    d_noise.array() += d_logits.array() * normals.array() / (T(1) + (-noise.array()).exp());
    if constexpr (BalancerReadsNoisyLogits<B, T>) d_logits += d_clean;
  }

  /// The router's K choices and their weights; a balancer that selects shapes what the router
  /// picks on, never the weights. A router that draws is told the mode, step and token numbering;
  /// a router without scores picks from the token ids.
  void select() {
    if constexpr (router_scores<R>)
      select_on_scores();
    else
      router_.template select<T>(RouterContext{training_, step_, 0, token_ids_}, shape_.experts, routing_);
  }

  void select_on_scores() {
    auto scores = this->scores();
    auto choose = [&](ConstMatrixRef<T> selection) {
      if constexpr (router_choices_vary<R>)
        return router_.template select<T>(selection, scores, RouterContext{.batch = &parallel_.batch()}, routing_);
      if constexpr (RouterDraws<R>)
        if (router_draws())
          return router_.template select<T>(selection, scores, RouterContext{training_, step_, first_token_}, routing_);
      router_.template select<T>(selection, scores, routing_);
    };
    if constexpr (BalancerSelects<B, T>) {
      auto selection = selection_.matrix(tokens_, shape_.experts);
      balancer_.template select<T>(scores, balance_context(), balance_state_, selection);
      choose(selection);
    } else {
      choose(scores);
    }
  }

  /// The dispatcher's plan, over the batch group when its decisions depend on the whole batch;
  /// then the kept choices per expert, and the weights' adjustment for drops.
  void plan_rows() {
    if (DispatcherDecidesEachChoiceAlone<D> || parallel_.batch().size() == 1)
      dispatcher_.plan(routing_, shape_.experts, plan_);
    else
      batch_plan_.plan(dispatcher_, parallel_.batch(), routing_, shape_.experts, plan_);
    count_kept(plan_, routing_.index, load_);
    if constexpr (BalancerCountsLoad<B, T>)
      if (training_) balancer_.template routed<T>(load_, balance_state_);
    if constexpr (DispatcherAdjustsWeights<D, T>) {  // e.g. renormalising after drops
      weight_before_adjust_.assign(routing_.weight.begin(), routing_.weight.end());
      dispatcher_.template adjust_weights<T>(plan_, routing_);
    }
  }

  /// out = expert(rows): here, or on the experts' ranks, chunk by chunk, and back.
  void run_experts(MatrixRef<T> rows, MatrixRef<T> out) {
    if constexpr (P::moves_rows) {
      static_assert(RowMovingParallel<P>, "moekit::MoELayer: a Parallel with moves_rows = true must model "
                                          "moekit::RowMovingParallel; see docs/policies/parallel.md");
      parallel_.route(plan_.counts);
      auto remote = remote_rows_.matrix(parallel_.expert_rows(), shape_.hidden);
      auto remote_out = remote_out_.matrix(parallel_.expert_rows(), shape_.hidden);
      expert_saved_.resize(static_cast<std::size_t>(parallel_.chunks()));
      parallel_.template through_experts<T>(
          rows, remote, remote_out, out, [&](int chunk, Index first, std::span<const Index> offsets) {
            expert_.template forward<T>(parameters_.expert_weights(), remote.middleRows(first, offsets.back()),
                                        offsets, remote_out.middleRows(first, offsets.back()),
                                        expert_saved_[static_cast<std::size_t>(chunk)], workspace_);
          });
    } else {
      expert_.template forward<T>(parameters_.expert_weights(), rows, plan_.offsets, out, expert_saved_.front(),
                                  workspace_);
    }
  }

  /// d_rows from d_out, and the experts' gradients; over ranks the experts' copies of the rows
  /// become d_rows and come back.
  void run_experts_backward(MatrixRef<T> d_out, MatrixRef<T> d_rows) {
    if constexpr (P::moves_rows) {
      const Index received = parallel_.expert_rows();
      auto remote = remote_rows_.matrix(received, shape_.hidden);
      auto remote_d_out = remote_out_.matrix(received, shape_.hidden);  // the output is no longer needed
      parallel_.template through_experts<T>(
          d_out, remote_d_out, remote, d_rows, [&](int chunk, Index first, std::span<const Index> offsets) {
            const Index n = offsets.back();
            expert_.template backward<T>(parameters_.expert_weights(), remote.middleRows(first, n), offsets,
                                         expert_saved_[static_cast<std::size_t>(chunk)],
                                         remote_d_out.middleRows(first, n), parameters_.expert_gradients(),
                                         workspace_);
          });
    } else {
      expert_.template backward<T>(parameters_.expert_weights(), d_rows, plan_.offsets, expert_saved_.front(),
                                   d_out, parameters_.expert_gradients(), workspace_);
    }
  }

  /// dx = d_logits·W (+ d_noise·W_n, with noisy gating; times the jitter factors, if x was
  /// jittered) + the scatter of d_rows to their tokens; the router's gradient d_logitsᵀ·(the
  /// router's x), by blocks of H columns, each summed over all tokens. dy was read for the last
  /// time before, so dx may alias it.
  void score_backward(ConstMatrixRef<T> d_logits, ConstMatrixRef<T> d_rows, MatrixRef<T> dx) {
    const auto factors = jitter_factors();
    const auto d_noise = d_noise_logits_.matrix(noisy_ ? tokens_ : 0, shape_.experts);
    workspace_.ready();
    detail::for_each_block(tokens_, token_block, [&](Index first, Index n) {
      gemm(workspace_, dx.middleRows(first, n), d_logits.middleRows(first, n),
                   parameters_.router_weight().matrix());
      if (noisy_)
        gemm_add(workspace_, dx.middleRows(first, n), d_noise.middleRows(first, n),
                 parameters_.router_noise_weight().matrix());
      if (jittered_) dx.middleRows(first, n).array() *= factors.middleRows(first, n).array();
      scatter_add<T>(plan_, d_rows, first, n, dx);
    });
    auto d_router = parameters_.router_gradient().matrix();
    if (logit_bias_) parameters_.router_bias_gradient().matrix() += d_logits.colwise().sum();
    const auto input = router_input();
    detail::for_each_block(shape_.hidden, hidden_block, [&](Index first, Index n) {
      gemm_add(workspace_, d_router.middleCols(first, n), d_logits.transpose(), input.middleCols(first, n));
      if (noisy_)
        gemm_add(workspace_, parameters_.router_noise_gradient().matrix().middleCols(first, n), d_noise.transpose(),
                 input.middleCols(first, n));
    });
    workspace_.ready();
  }

  // ---- checks -------------------------------------------------------------------------------

  /// Each policy checks its options against the shape: at construction, and again at every
  /// forward, since options may be changed between steps.
  void validate_policies() const {
    if constexpr (RouterHasLogitBias<R>)
      require(router_.logit_bias() == logit_bias_, "moekit::MoELayer: the router's logit_bias is now ",
              logit_bias_ ? "false" : "true", "; expected ", logit_bias_ ? "true" : "false",
              " as when the layer was built (router.logit_bias is a parameter only if it was)");
    if constexpr (RouterHasNoisyGating<R>)
      require(router_.noisy_gating().enabled == noisy_, "moekit::MoELayer: the router's noisy_gating is now ",
              noisy_ ? "false" : "true", "; expected ", noisy_ ? "true" : "false",
              " as when the layer was built (router.noise_weight is a parameter only if it was)");
    if constexpr (BalancerReadsNoisyLogits<B, T>)
      require(noisy_, "moekit::MoELayer: ", B::name, " reads noisy gating's logits but the router has no noisy "
                      "gating; expected a router built with noisy_gating = true (TopK's option)");
    router_.validate(shape_);
    balancer_.validate(shape_);
    dispatcher_.validate(shape_);
    expert_.validate(shape_);
    shared_.validate(shape_);
  }

  void check_forward(ConstMatrixRef<T> x, MatrixRef<T> y) const {
    parallel_.all_or_none("forward", [&] {
      validate_policies();
      check_matrix(x, "forward", "x", x.rows());
      require(y.rows() == x.rows() && y.cols() == shape_.hidden, "moekit::MoELayer::forward: y is [", y.rows(), ",",
              y.cols(), "]; expected [", x.rows(), ",", shape_.hidden, "] like x");
      require(sequence_offsets_.empty() || sequence_offsets_.back() == x.rows(), "moekit::MoELayer::forward: ",
              x.rows(), " tokens but the sequences set_sequences() gave have ",
              sequence_offsets_.empty() ? 0 : sequence_offsets_.back(), "; expected them to add up to the tokens");
      if constexpr (RouterReadsTokenIds<R>) {
        require(static_cast<Index>(token_ids_.size()) == x.rows(), "moekit::MoELayer::forward: ", x.rows(),
                " tokens but set_token_ids() gave ", token_ids_.size(), " ids; expected one id per token (", R::name,
                " routes by token id)");
        router_.check_token_ids(token_ids_);
      }
    });
  }

  void check_backward(ConstMatrixRef<T> dy, MatrixRef<T> dx) const {
    parallel_.all_or_none("backward", [&] {
      require(training_, "moekit::MoELayer::backward: the layer is in evaluation mode; expected train() before a "
                         "training step's forward and backward");
      require(have_forward_,
              "moekit::MoELayer::backward: no forward to go back through (backward consumes "
              "the last forward's saved activations); expected a call of forward(x) first");
      check_matrix(dy, "backward", "dy", tokens_);
      require(dx.rows() == tokens_ && dx.cols() == shape_.hidden, "moekit::MoELayer::backward: dx is [", dx.rows(),
              ",", dx.cols(), "]; expected [", tokens_, ",", shape_.hidden, "] like x");
    });
  }

  BalanceContext balance_context() const {
    return {score_function(), shape_.top_k, &parallel_.batch(), training_, sequence_offsets_, shape_.experts};
  }

  /// Each token's slots in the routing: K, or one per expert for a router whose choices vary.
  static int routing_slots(Index experts) {
    if constexpr (router_choices_vary<R>) return static_cast<int>(experts);
    return top_k;
  }

  /// The router's; for a router without scores, whose balancer reads none, softmax's.
  ScoreFn score_function() const {
    if constexpr (router_scores<R>) return router_.score_function();
    return ScoreFn::softmax;
  }

  void check_matrix(ConstMatrixRef<T> m, std::string_view call, std::string_view what,
                    Index rows) const {
    require(m.cols() == shape_.hidden && m.rows() == rows, "moekit::MoELayer::", call,
            ": ", what, " is [", m.rows(), ",", m.cols(), "]; expected [", rows, ",",
            shape_.hidden, "] (tokens × hidden)");
    if (!config_.check_finite || all_finite(m)) return;
    for (Index t = 0; t < m.rows(); ++t)
      for (Index h = 0; h < m.cols(); ++h)
        if (!std::isfinite(m(t, h)))
          fail("moekit::MoELayer::", call, ": ", what, "[", t, ",", h, "] is ", m(t, h),
               "; expected finite values (LayerConfig::check_finite = false skips this check)");
  }

  /// Whether every element is finite. 0·v is 0 for finite v and NaN otherwise, and a sum with a
  /// NaN term is NaN: a vectorised sum per block of rows, in parallel (Eigen's allFinite is neither).
  static bool all_finite(ConstMatrixRef<T> m) {
    std::atomic<bool> finite{true};
    detail::for_each_block(m.rows(), token_block, [&](Index first, Index n) {
      if (!((m.middleRows(first, n).array() * T(0)).sum() == T(0))) finite = false;
    });
    return finite;
  }

  // Blocks of the router's products; fixed sizes keep every sum in the same order on any thread count.
  static constexpr Index token_block = 256, hidden_block = 256;

  LayerConfig config_;
  LayerShape shape_;
  bool logit_bias_ = false;  // the router's logits have a bias (router.logit_bias), fixed at construction
  R router_{};
  B balancer_{};
  D dispatcher_{};
  X expert_{};
  P parallel_{};
  S shared_{};
  LayerParameters<T> parameters_;

  // Saved by forward for backward; buffers grow to the largest batch and are reused.
  bool have_forward_ = false;
  bool training_ = !quantises_weights;  // train() or eval()
  bool noisy_ = false;  // the router's logits get learned noise in training (router.noise_weight), fixed at construction
  bool jittered_ = false;                // the last forward's router read x jittered
  bool noised_ = false;                  // the last forward's logits had noise added
  std::uint64_t step_ = 0;               // what random draws count from; end_step() advances it
  Index first_token_ = 0;                // this rank's first token in the whole batch, for random draws
  std::vector<Index> sequence_offsets_;   // [B+1] from set_sequences(); empty: one sequence
  std::vector<Index> token_ids_;          // [T] from set_token_ids(), for a router that reads them
  Index tokens_ = 0;
  Routing<T> routing_;
  Plan plan_;
  T balance_loss_ = 0;
  typename B::template State<T> balance_state_;
  typename S::template Saved<T> shared_saved_;
  std::vector<typename X::template Saved<T>> expert_saved_ = std::vector<typename X::template Saved<T>>(1);  // one per chunk
  detail::Buffer<T> input_, scores_, rows_, expert_out_;  // [T,H] [T,E] [S,H] [S,H] (backward: d_rows, d_out)
  detail::Buffer<T> selection_;                           // [T,E] what the balancer selects on
  detail::Buffer<T> jittered_input_, jitter_factors_;     // [T,H] [T,H] the router's jittered x, its factors
  detail::Buffer<T> noise_logits_, normals_;              // [T,E] each, with noisy gating: x·W_nᵀ, n
  detail::Buffer<T> clean_logits_, noisy_logits_;         // [T,E] each, for a balancer that reads them: x·Wᵀ, H
  detail::Buffer<T> d_logits_, d_clean_logits_, d_noise_logits_;  // [T,E] each
  std::vector<T> d_weight_;                               // [T,K]
  Workspace<T> workspace_;                                // packing buffers of all the layer's GEMMs
  std::vector<Index> load_;                               // [E] kept choices per expert
  std::vector<T> weight_before_adjust_;                   // [T,K] for the dispatcher's backward
  detail::Buffer<T> remote_rows_, remote_out_;  // [R,H] rows at this rank's experts (backward: d_rows, d_out)
  BatchPlan<T> batch_plan_;
  std::function<void(const RoutingStats&)> observer_;
};

/// A layer of type To with `from`'s parameters, policies' options and balancer state: the same
/// composition in another precision, e.g. a trained float or bf16 layer as an int8 one to serve.
/// docs/concepts.md#precision
template <class To, class From>
To convert_layer(const From& from) {
  static_assert(std::is_same_v<typename To::router_type, typename From::router_type> &&
                    std::is_same_v<typename To::balancer_type, typename From::balancer_type> &&
                    std::is_same_v<typename To::dispatcher_type, typename From::dispatcher_type> &&
                    std::is_same_v<typename To::parallel_type, typename From::parallel_type> &&
                    std::is_same_v<typename To::scalar_type, typename From::scalar_type>,
                "moekit::convert_layer: the layers must differ only in their experts' precision (the same "
                "router, balancer, dispatcher, parallel policy and scalar)");
  To to(from.config(), from.router(), from.balancer(), from.dispatcher(), from.parallel());
  if constexpr (requires { to.expert().options = from.expert().options; }) to.expert().options = from.expert().options;
  if constexpr (requires { to.shared_expert().expert.options = from.shared_expert().expert.options; })
    to.shared_expert().expert.options = from.shared_expert().expert.options;
  to.load(from.checkpoint(), "moekit::convert_layer from " + From::name());
  return to;
}

}  // namespace moekit
