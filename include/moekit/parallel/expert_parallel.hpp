#pragma once
#include <atomic>
#include <chrono>
#include <cstdint>
#include <exception>
#include <memory>
#include <span>
#include <string_view>
#include <thread>
#include <vector>

#include <mpi.h>
#include <tbb/info.h>
#include <tbb/task_arena.h>

#include <moekit/core/concepts.hpp>
#include <moekit/core/error.hpp>
#include <moekit/parallel/grid.hpp>
#include <moekit/parallel/mpi.hpp>

namespace moekit {

/// The experts split over the ranks of an expert-parallel group; each token's rows travel to
/// the rank that owns its expert and back. Optionally each expert's F split over an
/// expert-tensor-parallel group, and a hierarchical all-to-all. docs/distributed.md
///
/// Every rank of the batch group holds its own tokens; the ranks of one expert-tensor-parallel
/// group hold the same tokens. The layer then computes, on every rank, exactly what one process
/// would compute for the whole batch (the concatenation of the shards, in batch-group rank order).
struct ExpertParallel {
  using policy_kind = parallel_kind;
  static constexpr std::string_view name = "ExpertParallel";
  static constexpr bool moves_rows = true;

  /// The communicators one layer uses. Every rank of `layer` must construct the layer.
  struct Groups {
    mpi::Communicator layer;          // every rank of the layer: errors are agreed over it
    mpi::Communicator expert;         // EP: splits the experts; rows travel inside it
    mpi::Communicator expert_tensor;  // ETP: splits each expert's F; its ranks share tokens
    mpi::Communicator expert_data;    // EDP: ranks holding the same expert slices
    mpi::Communicator batch;          // the token shards (EP × EDP): router gradients, balancer sums
  };

  struct Options {
    int ranks_per_node = 0;  // > 0: hierarchical all-to-all over nodes of this many EP ranks
    int chunks = 1;          // > 1: the exchange in chunks, overlapping the experts' compute
    mpi::Timeout timeout = mpi::default_timeout;  // the longest a rank waits for the others in one step
  };

  /// This rank's groups in a Megatron-Core layout: the expert grid's ep, tp (ETP) and dp (EDP);
  /// the batch is the expert grid's ep-dp, the layer its tp-ep-dp (one pipeline stage).
  /// Collective over `world`: every rank calls it.
  static Groups groups(const mpi::Communicator& world, const ParallelLayout& layout) {
    require(layout.expert().world_size() == world.size(), "moekit::ExpertParallel: the layout has ",
            layout.expert().world_size(), " ranks but the communicator ", world.size(),
            "; expected the same");
    const ProcessGrid& grid = layout.expert();
    auto split = [&](std::string_view mask) {
      const auto all = grid.groups(mask);
      for (std::size_t g = 0; g < all.size(); ++g)
        for (std::size_t i = 0; i < all[g].size(); ++i)
          if (all[g][i] == world.rank()) return world.split(static_cast<int>(g), static_cast<int>(i));
      fail("moekit::ExpertParallel: rank ", world.rank(), " is in no '", mask, "' group");
    };
    Groups g;
    g.expert = split("ep");
    g.expert_tensor = split("tp");
    g.expert_data = split("dp");
    g.batch = split("ep-dp");
    g.layer = split("tp-ep-dp");
    return g;
  }

  /// Expert parallel over every rank of `world`: no expert tensor parallel, no data parallel.
  static Groups groups(const mpi::Communicator& world) {
    return groups(world, ParallelLayout(world.size(), {.ep = world.size(), .etp = 1}));
  }

  Options options{};

  /// Expert parallel over MPI_COMM_WORLD, set up when the layer is built.
  ExpertParallel() = default;
  explicit ExpertParallel(Groups groups) : groups_(std::move(groups)), have_groups_(true) {}
  ExpertParallel(Groups groups, Options options)
      : options(options), groups_(std::move(groups)), have_groups_(true) {}
  explicit ExpertParallel(Options options) : options(options) {}

  // ---- what the layer calls -------------------------------------------------------------

  /// Checks the shape against the groups (on every rank, agreeing) and prepares the exchange.
  void validate(const LayerShape& shape) {
    int initialized = 0;
    MPI_Initialized(&initialized);
    require(initialized, "moekit::ExpertParallel: MPI is not initialized; expected a "
            "boost::mpi::environment (or MPI_Init) before the layer is built");
    if (!have_groups_) groups_ = groups(mpi::Communicator());  // MPI_COMM_WORLD
    have_groups_ = true;
    const int ep = groups_.expert.size(), etp = groups_.expert_tensor.size();
    require(options.timeout.count() > 0, "moekit::ExpertParallel: timeout = ", options.timeout.count(),
            " ms; expected more than 0");
    mpi::all_or_none(groups_.layer, "construction", options.timeout, [&] {
      require(shape.experts % ep == 0, "moekit::ExpertParallel: experts = ", shape.experts,
              " over ", ep, " expert-parallel ranks; expected a multiple of ", ep);
      require(shape.ffn % etp == 0, "moekit::ExpertParallel: ffn = ", shape.ffn, " over ", etp,
              " expert-tensor-parallel ranks; expected a multiple of ", etp);
      require(groups_.layer.size() == ep * etp * groups_.expert_data.size() &&
                          groups_.batch.size() == ep * groups_.expert_data.size(),
              "moekit::ExpertParallel: groups of sizes layer ", groups_.layer.size(), ", ep ", ep,
              ", etp ", etp, ", edp ", groups_.expert_data.size(), ", batch ", groups_.batch.size(),
              "; expected layer = ep·etp·edp and batch = ep·edp");
    });
    // Every rank must build the same layer: a mismatch would hang the first exchange.
    constexpr int n = 5;
    const Index mine[n] = {shape.hidden, shape.ffn, shape.experts, shape.top_k, shape.shared_ffn};
    std::vector<Index> all(n * static_cast<std::size_t>(groups_.layer.size()));
    MPI_Request request = MPI_REQUEST_NULL;
    mpi::detail::check(MPI_Iallgather(mine, n, MPI_INT64_T, all.data(), n, MPI_INT64_T, groups_.layer, &request),
                       "MPI_Iallgather");
    mpi::detail::wait(request, options.timeout, "construction's comparison of the layer's shape");
    for (int r = 0; r < groups_.layer.size(); ++r) {
      const Index* theirs = all.data() + n * r;
      require(std::equal(mine, mine + n, theirs), "moekit::ExpertParallel: rank ", r,
              " builds a layer of H=", theirs[0], " F=", theirs[1], " E=", theirs[2], " K=", theirs[3],
              " F_s=", theirs[4], ", rank ", groups_.layer.rank(), " one of H=", mine[0], " F=", mine[1],
              " E=", mine[2], " K=", mine[3], " F_s=", mine[4], "; expected the same layer on every rank");
    }
    mpi::all_or_none(groups_.layer, "construction", options.timeout, [&] {
      require(options.chunks >= 1 && (options.chunks == 1 || options.ranks_per_node == 0),
              "moekit::ExpertParallel: chunks = ", options.chunks, " with ranks_per_node = ",
              options.ranks_per_node, "; expected chunks >= 1, and 1 with a hierarchical exchange");
    });
    if (options.chunks > 1) {
      int level = MPI_THREAD_SINGLE;
      MPI_Query_thread(&level);
      require(level >= MPI_THREAD_FUNNELED, "moekit::ExpertParallel: chunks = ", options.chunks,
              " with MPI initialised at thread level ", level, "; expected MPI_THREAD_FUNNELED or more "
              "(boost::mpi::environment(argc, argv, boost::mpi::threading::funneled)): the experts "
              "compute on TBB threads while this thread drives MPI");
    }
    if (options.chunks > 1 && !arena_)  // every core but this thread's, which drives MPI
      arena_ = std::make_shared<tbb::task_arena>(std::max(1, tbb::info::default_concurrency() - 1), 0);
    batch_ = std::make_shared<mpi::Batch>(groups_.batch, options.timeout);
    exchange_ = std::make_shared<mpi::RowExchange>(groups_.expert, options.ranks_per_node, options.timeout);
    experts_ = shape.experts;
  }

  ExpertRange local_experts(const LayerShape& shape) const {
    const Index count = shape.experts / groups_.expert.size();
    return {count * groups_.expert.rank(), count};
  }
  ExpertRange local_ffn(const LayerShape& shape) const {
    const Index count = shape.ffn / groups_.expert_tensor.size();
    return {count * groups_.expert_tensor.rank(), count};
  }

  const BatchGroup& batch() const { return *batch_; }
  const Groups& communicators() const { return groups_; }

  /// Runs `local` at the start of `step`; if it throws on any rank of the layer, every rank
  /// throws its message, and if the ranks are at different steps, every rank throws naming them.
  template <class F>
  void all_or_none(std::string_view step, F&& local) const {
    mpi::all_or_none(groups_.layer, step, options.timeout, std::forward<F>(local));
  }

  /// Every rank's hashes of its router and expert values, compared where they must agree: the
  /// router over the whole layer, an expert's slice among the ranks that hold the same slice (the
  /// expert-data-parallel group). Every rank sees every hash, so all throw alike.
  void check_replicas(std::uint64_t router_hash, std::uint64_t expert_hash, std::string_view step) const {
    const std::uint64_t mine[4] = {router_hash, expert_hash, std::uint64_t(groups_.expert.rank()),
                                   std::uint64_t(groups_.expert_tensor.rank())};
    const int size = groups_.layer.size();
    std::vector<std::uint64_t> all(4 * static_cast<std::size_t>(size));
    MPI_Request request = MPI_REQUEST_NULL;
    mpi::detail::check(MPI_Iallgather(mine, 4, MPI_UINT64_T, all.data(), 4, MPI_UINT64_T, groups_.layer, &request),
                       "MPI_Iallgather");
    mpi::detail::wait(request, options.timeout, step, "'s comparison of replicated parameters");
    for (int r = 0; r < size; ++r) {
      const std::uint64_t* theirs = &all[4 * static_cast<std::size_t>(r)];
      require(theirs[0] == all[0], "moekit::ExpertParallel: after ", step, ", rank ", r,
              " holds a router.weight or shared expert different from rank 0's; expected the same on every rank of the layer "
              "(build every rank with the same seed, and load files of the same layer)");
      for (int q = 0; q < r; ++q) {
        const std::uint64_t* other = &all[4 * static_cast<std::size_t>(q)];
        require(!(other[2] == theirs[2] && other[3] == theirs[3]) || other[1] == theirs[1],
                "moekit::ExpertParallel: after ", step, ", ranks ", q, " and ", r,
                " hold the same experts' slice with different values; expected the same on every rank that "
                "holds it (build every rank with the same seed, and load files of the same layer)");
      }
    }
  }

  /// Agrees the layout of the next exchanges from the rows this rank has for each expert
  /// ([E], in expert order): how many rows each rank receives for each of its experts. With
  /// `chunks` = d, each (rank, expert) count is split into d parts, and the rows a rank
  /// receives are laid out chunk by chunk, each chunk a set of expert blocks.
  void route(std::span<const Index> rows_per_expert) {
    const int ep = groups_.expert.size();
    const auto local = local_count(), ranks = static_cast<std::size_t>(ep), d = chunk_count();
    sent_.assign(rows_per_expert.begin(), rows_per_expert.end());
    received_.resize(rows_per_expert.size());
    MPI_Request request = MPI_REQUEST_NULL;
    mpi::detail::check(MPI_Ialltoall(rows_per_expert.data(), static_cast<int>(local), MPI_INT64_T,
                                     received_.data(), static_cast<int>(local), MPI_INT64_T, groups_.expert, &request),
                       "MPI_Ialltoall");
    mpi::detail::wait(request, options.timeout, "the routing of rows to the experts' ranks");
    send_rows_.assign(ranks, 0);
    recv_rows_.assign(ranks, 0);
    for (std::size_t q = 0; q < ranks; ++q)
      for (std::size_t l = 0; l < local; ++l) {
        send_rows_[q] += sent_[q * local + l];
        recv_rows_[q] += received_[q * local + l];
      }
    // Chunk c's part of n rows: [n·c/d, n·(c+1)/d); sender and receiver split the same n alike.
    chunk_first_.assign(d + 1, 0);
    chunk_offsets_.assign(d * (local + 1), 0);
    before_.assign(d * ranks * local, 0);
    for (std::size_t c = 0; c < d; ++c) {
      Index* offsets = &chunk_offsets_[c * (local + 1)];
      for (std::size_t l = 0; l < local; ++l) {
        Index in_block = 0;
        for (std::size_t q = 0; q < ranks; ++q) {
          before_[(c * ranks + q) * local + l] = in_block;
          in_block += part(received_[q * local + l], c);
        }
        offsets[l + 1] = offsets[l] + in_block;
      }
      chunk_first_[c + 1] = chunk_first_[c] + offsets[local];
    }
    ++route_count_;
  }

  /// Rows this rank's experts receive in all, and the chunks the exchange is split into.
  Index expert_rows() const { return chunk_first_.empty() ? 0 : chunk_first_.back(); }
  int chunks() const { return static_cast<int>(chunk_count()); }

  /// Moves `rows` (this rank's plan, expert order) to the experts' ranks into `expert_rows`,
  /// calls compute(chunk, first_row, offsets) for each chunk — the chunk's rows are
  /// expert_rows[first_row, first_row + offsets[L]), in blocks per local expert at `offsets` —
  /// which must fill the same rows of `expert_out`, and brings those rows back into `out`, in
  /// the plan's order. Over ETP ranks the partial results are summed.
  ///
  /// With one chunk the exchanges are blocking. With more, this thread drives MPI (non-blocking
  /// all-to-alls, tested in a loop) while each chunk's compute runs in a TBB arena as soon as its
  /// rows have arrived, one chunk at a time: the arrival of chunk c+1 and the return of chunk
  /// c−1 overlap the compute of chunk c.
  template <Scalar T, class Compute>
  void through_experts(ConstMatrixRef<T> rows, MatrixRef<T> expert_rows, MatrixRef<T> expert_out,
                       MatrixRef<T> out, Compute&& compute) {
    if (chunk_count() == 1 || groups_.expert.size() == 1) {
      to_experts<T>(rows, expert_rows);
      for (std::size_t c = 0; c < chunk_count(); ++c) compute(static_cast<int>(c), chunk_first_[c], offsets_of(c));
      to_tokens<T>(expert_out, out);
      return;
    }
    const std::size_t d = chunk_count();
    const Chunks& types = chunk_types<T>(rows.cols());
    std::vector<MPI_Request> arrive(d, MPI_REQUEST_NULL), leave(d, MPI_REQUEST_NULL);
    for (std::size_t c = 0; c < d; ++c)
      mpi::detail::check(MPI_Ialltoallw(rows.data(), ones_.data(), zeros_.data(), types.plan_side[c].data(),
                                        expert_rows.data(), ones_.data(), zeros_.data(), types.expert_side[c].data(),
                                        groups_.expert, &arrive[c]),
                         "MPI_Ialltoallw");
    std::atomic<std::size_t> computed{0};  // chunks run one at a time, so a count says which
    std::exception_ptr failure;
    std::size_t started = 0, posted = 0, returned = 0;
    const auto deadline = std::chrono::steady_clock::now() + options.timeout;
    while (returned < d) {
      // Past the deadline with no chunk computing (none holds this frame's references): give up.
      if (started == computed.load(std::memory_order_acquire) && std::chrono::steady_clock::now() > deadline)
        mpi::detail::timed_out(options.timeout, "the chunked exchange of rows", {});
      const std::size_t finished = computed.load(std::memory_order_acquire);
      for (; posted < finished; ++posted)  // a computed chunk goes home at once
        mpi::detail::check(MPI_Ialltoallw(expert_out.data(), ones_.data(), zeros_.data(), types.expert_side[posted].data(),
                                          out.data(), ones_.data(), zeros_.data(), types.plan_side[posted].data(),
                                          groups_.expert, &leave[posted]),
                           "MPI_Ialltoallw");
      if (started < d && finished == started) {  // the arena is idle: the next chunk, once it is here
        int arrived = 0;
        mpi::detail::check(MPI_Test(&arrive[started], &arrived, MPI_STATUS_IGNORE), "MPI_Test");
        if (arrived) {
          const std::size_t c = started++;
          arena_->enqueue([&, c] {
            try {
              compute(static_cast<int>(c), chunk_first_[c], offsets_of(c));
            } catch (...) {
              failure = std::current_exception();  // the exchanges still complete on every rank
            }
            computed.store(c + 1, std::memory_order_release);
          });
        }
      }
      returned = 0;
      for (std::size_t c = 0; c < posted; ++c) {
        int done = 1;
        if (leave[c] != MPI_REQUEST_NULL)
          mpi::detail::check(MPI_Test(&leave[c], &done, MPI_STATUS_IGNORE), "MPI_Test");
        returned += static_cast<std::size_t>(done);
      }
      std::this_thread::yield();  // a core shared with the compute should go to the compute
    }
    if (failure) std::rethrow_exception(failure);
    sum_partials<T>(out);
  }

  /// Blocking: rows → the experts' chunk-major blocks.
  template <Scalar T>
  void to_experts(ConstMatrixRef<T> rows, MatrixRef<T> expert_rows) {
    if (groups_.expert.size() == 1) {  // every expert is here, in the same order
      expert_rows = rows;
      return;
    }
    if (exchange_->hierarchical()) {  // one chunk, source-major, then regrouped
      auto staging = staging_.template matrix<T>(expert_rows.rows(), expert_rows.cols());
      (*exchange_)(rows.data(), send_rows_, staging.data(), recv_rows_, rows.cols());
      regroup<T>(staging, expert_rows, true);
      return;
    }
    const Chunks& types = chunk_types<T>(rows.cols());
    for (std::size_t c = 0; c < chunk_count(); ++c)
      alltoallw(rows.data(), types.plan_side[c], expert_rows.data(), types.expert_side[c]);
  }

  /// Blocking: the experts' rows → back into the plan's order; partial results summed over ETP.
  template <Scalar T>
  void to_tokens(ConstMatrixRef<T> expert_rows, MatrixRef<T> rows) {
    if (groups_.expert.size() == 1) {
      rows = expert_rows;
    } else if (exchange_->hierarchical()) {
      auto staging = staging_.template matrix<T>(expert_rows.rows(), expert_rows.cols());
      regroup<T>(expert_rows, staging, false);
      (*exchange_)(staging.data(), recv_rows_, rows.data(), send_rows_, rows.cols());
    } else {
      const Chunks& types = chunk_types<T>(rows.cols());
      for (std::size_t c = 0; c < chunk_count(); ++c)
        alltoallw(expert_rows.data(), types.expert_side[c], rows.data(), types.plan_side[c]);
    }
    sum_partials<T>(rows);
  }

  /// Gradients of J = (1/D)·Σ_r J_r, D = the batch group's size: the router's (and every other
  /// replicated parameter's) averaged over the batch group; the experts' summed over the
  /// expert-data-parallel group and divided by D (DeepSpeed's convention: their scale does not
  /// depend on the EP size).
  template <Scalar T>
  void reduce_gradients(std::span<Tensor<T>> replicated, std::span<Tensor<T>> experts) const {
    const T scale = T(1) / T(groups_.batch.size());
    auto reduce = [&](Tensor<T>& g, const mpi::Communicator& comm) {
      auto values = g.values();
      if (comm.size() > 1)
        sum_in_place(values.data(), static_cast<Index>(values.size()), comm, "the reduction of gradients");
      for (T& v : values) v *= scale;
    };
    for (auto& g : replicated) reduce(g, groups_.batch);
    for (auto& g : experts) reduce(g, groups_.expert_data);
  }

 private:
  static Index part(Index n, std::size_t c, std::size_t d) {
    return n * static_cast<Index>(c + 1) / static_cast<Index>(d) - n * static_cast<Index>(c) / static_cast<Index>(d);
  }
  Index part(Index n, std::size_t c) const { return part(n, c, chunk_count()); }
  /// With one EP rank nothing travels, so there is nothing to overlap.
  std::size_t chunk_count() const {
    return groups_.expert.size() == 1 ? 1 : static_cast<std::size_t>(std::max(1, options.chunks));
  }
  std::size_t local_count() const { return static_cast<std::size_t>(experts_ / groups_.expert.size()); }
  std::span<const Index> offsets_of(std::size_t c) const {
    return std::span<const Index>(chunk_offsets_).subspan(c * (local_count() + 1), local_count() + 1);
  }

  template <Scalar T>
  void sum_partials(MatrixRef<T> rows) const {
    if (groups_.expert_tensor.size() > 1)
      sum_in_place(rows.data(), rows.size(), groups_.expert_tensor, "the sum of expert-tensor-parallel partials");
  }

  /// values[0, n) summed over comm, in place, waiting at most options.timeout.
  template <Scalar T>
  void sum_in_place(T* values, Index n, const mpi::Communicator& comm, std::string_view what) const {
    MPI_Request request = MPI_REQUEST_NULL;
    mpi::detail::check(MPI_Iallreduce(MPI_IN_PLACE, values, mpi::detail::to_int(n, "values"),
                                      mpi::detail::scalar_type<T>(), MPI_SUM, comm, &request),
                       "MPI_Iallreduce");
    mpi::detail::wait(request, options.timeout, what);
  }

  /// One blocking all-to-all of rows between the plan and the experts' blocks, by datatypes.
  void alltoallw(const void* send, const std::vector<MPI_Datatype>& send_types, void* recv,
                 const std::vector<MPI_Datatype>& recv_types) {
    MPI_Request request = MPI_REQUEST_NULL;
    mpi::detail::check(MPI_Ialltoallw(send, ones_.data(), zeros_.data(), send_types.data(), recv, ones_.data(),
                                      zeros_.data(), recv_types.data(), groups_.expert, &request),
                       "MPI_Ialltoallw");
    mpi::detail::wait(request, options.timeout, "the exchange of rows");
  }

  /// Source-major [q][l] ↔ expert-major [l][q] blocks of rows (hierarchical; one chunk).
  template <Scalar T>
  void regroup(ConstMatrixRef<T> from, MatrixRef<T> to, bool to_expert_major) const {
    const auto local = local_count(), ranks = static_cast<std::size_t>(groups_.expert.size());
    const auto offsets = offsets_of(0);
    Index source_start = 0;
    for (std::size_t q = 0; q < ranks; ++q) {
      Index within = 0;
      for (std::size_t l = 0; l < local; ++l) {
        const Index n = received_[q * local + l];
        const Index s = source_start + within, e = offsets[l] + before_[q * local + l];
        if (n > 0) {
          if (to_expert_major) to.middleRows(e, n) = from.middleRows(s, n);
          else to.middleRows(s, n) = from.middleRows(e, n);
        }
        within += n;
      }
      source_start += recv_rows_[q];
    }
  }

  /// The datatypes of one route, per chunk and peer: where that peer's rows of the chunk lie in
  /// this rank's plan (plan_side) and among its expert blocks (expert_side). Every row moves
  /// once, straight from where it is to where it is used.
  struct Chunks {
    MPI_Datatype row = MPI_DATATYPE_NULL;
    std::vector<std::vector<MPI_Datatype>> plan_side, expert_side;  // [chunk][peer]
    Chunks() = default;
    Chunks(const Chunks&) = delete;
    Chunks& operator=(const Chunks&) = delete;
    ~Chunks() {
      int finalized = 0;
      MPI_Finalized(&finalized);
      if (finalized) return;
      for (auto* side : {&plan_side, &expert_side})
        for (auto& per_peer : *side)
          for (auto& t : per_peer) MPI_Type_free(&t);
      if (row != MPI_DATATYPE_NULL) MPI_Type_free(&row);
    }
  };

  template <Scalar T>
  const Chunks& chunk_types(Index width) {
    const MPI_Datatype scalar = mpi::detail::scalar_type<T>();
    if (types_ && types_route_ == route_count_ && types_scalar_ == scalar && types_width_ == width) return *types_;
    const std::size_t local = local_count(), ranks = static_cast<std::size_t>(groups_.expert.size()),
                      d = chunk_count();
    const auto row_bytes = static_cast<MPI_Aint>(width) * static_cast<MPI_Aint>(sizeof(T));
    auto types = std::make_shared<Chunks>();
    mpi::detail::check(MPI_Type_contiguous(mpi::detail::to_int(width, "row width"), scalar, &types->row),
                       "MPI_Type_contiguous");
    mpi::detail::check(MPI_Type_commit(&types->row), "MPI_Type_commit");
    auto blocks = [&](const std::vector<int>& lengths, const std::vector<MPI_Aint>& starts) {
      MPI_Datatype t = MPI_DATATYPE_NULL;
      mpi::detail::check(MPI_Type_create_hindexed(static_cast<int>(local), lengths.data(), starts.data(), types->row, &t),
                         "MPI_Type_create_hindexed");
      mpi::detail::check(MPI_Type_commit(&t), "MPI_Type_commit");
      return t;
    };
    std::vector<Index> plan_start(sent_.size() + 1, 0);  // the plan's block of each global expert
    for (std::size_t e = 0; e < sent_.size(); ++e) plan_start[e + 1] = plan_start[e] + sent_[e];
    std::vector<int> lengths(local);
    std::vector<MPI_Aint> starts(local);
    types->plan_side.resize(d);
    types->expert_side.resize(d);
    for (std::size_t c = 0; c < d; ++c) {
      const auto offsets = offsets_of(c);
      for (std::size_t q = 0; q < ranks; ++q) {
        for (std::size_t l = 0; l < local; ++l) {  // to peer q: part c of each of its experts' blocks
          const std::size_t e = q * local + l;
          lengths[l] = mpi::detail::to_int(part(sent_[e], c), "rows for one expert");
          starts[l] = static_cast<MPI_Aint>(plan_start[e] + sent_[e] * static_cast<Index>(c) / static_cast<Index>(d)) * row_bytes;
        }
        types->plan_side[c].push_back(blocks(lengths, starts));
        for (std::size_t l = 0; l < local; ++l) {  // from peer q: into chunk c's block of expert l
          lengths[l] = mpi::detail::to_int(part(received_[q * local + l], c), "rows from one rank");
          starts[l] = static_cast<MPI_Aint>(chunk_first_[c] + offsets[l] + before_[(c * ranks + q) * local + l]) * row_bytes;
        }
        types->expert_side[c].push_back(blocks(lengths, starts));
      }
    }
    ones_.assign(ranks, 1);
    zeros_.assign(ranks, 0);
    types_ = std::move(types);
    types_route_ = route_count_;
    types_scalar_ = scalar;
    types_width_ = width;
    return *types_;
  }

  Groups groups_;
  bool have_groups_ = false;
  std::shared_ptr<mpi::Batch> batch_;
  std::shared_ptr<mpi::RowExchange> exchange_;
  Index experts_ = 0;
  std::vector<Index> sent_;        // [E] rows this rank has for each expert
  std::vector<Index> received_;    // [EP·L] rows from rank q for local expert l
  std::vector<Index> before_;      // [d·EP·L] in chunk c's block of expert l, rows from ranks before q
  std::vector<Index> send_rows_, recv_rows_;
  std::vector<Index> chunk_first_, chunk_offsets_;  // [d+1] first row of each chunk; [d·(L+1)] its blocks
  std::uint64_t route_count_ = 0;  // routes so far: the datatypes follow the latest
  std::shared_ptr<const Chunks> types_;
  std::uint64_t types_route_ = 0;
  MPI_Datatype types_scalar_ = MPI_DATATYPE_NULL;
  Index types_width_ = 0;
  std::vector<int> ones_, zeros_;
  std::shared_ptr<tbb::task_arena> arena_;  // where chunks compute while this thread drives MPI
  detail::Scratch staging_;  // the hierarchical exchange's source-major rows
};

static_assert(RowMovingParallel<ExpertParallel>);
static_assert(ParallelChecksReplicas<ExpertParallel>);

}  // namespace moekit
