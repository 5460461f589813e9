#pragma once
#include <cstdint>
#include <memory>
#include <span>
#include <string_view>
#include <vector>

#include <mpi.h>

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
  };

  /// This rank's groups in a Megatron-Core layout: the expert grid's ep, tp (ETP) and dp (EDP);
  /// the batch is the expert grid's ep-dp, the layer its tp-ep-dp (one pipeline stage).
  /// Collective over `world`: every rank calls it.
  static Groups groups(const mpi::Communicator& world, const ParallelLayout& layout) {
    detail::require(layout.expert().world_size() == world.size(), "moekit::ExpertParallel: the layout has ",
                    layout.expert().world_size(), " ranks but the communicator ", world.size(),
                    "; expected the same");
    const ProcessGrid& grid = layout.expert();
    auto split = [&](std::string_view mask) {
      const auto all = grid.groups(mask);
      for (std::size_t g = 0; g < all.size(); ++g)
        for (std::size_t i = 0; i < all[g].size(); ++i)
          if (all[g][i] == world.rank()) return world.split(static_cast<int>(g), static_cast<int>(i));
      detail::fail("moekit::ExpertParallel: rank ", world.rank(), " is in no '", mask, "' group");
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
    detail::require(initialized, "moekit::ExpertParallel: MPI is not initialized; expected a "
                    "boost::mpi::environment (or MPI_Init) before the layer is built");
    if (!have_groups_) groups_ = groups(mpi::Communicator());  // MPI_COMM_WORLD
    have_groups_ = true;
    const int ep = groups_.expert.size(), etp = groups_.expert_tensor.size();
    mpi::all_or_none(groups_.layer, [&] {
      detail::require(shape.experts % ep == 0, "moekit::ExpertParallel: experts = ", shape.experts,
                      " over ", ep, " expert-parallel ranks; expected a multiple of ", ep);
      detail::require(shape.ffn % etp == 0, "moekit::ExpertParallel: ffn = ", shape.ffn, " over ", etp,
                      " expert-tensor-parallel ranks; expected a multiple of ", etp);
      detail::require(groups_.layer.size() == ep * etp * groups_.expert_data.size() &&
                          groups_.batch.size() == ep * groups_.expert_data.size(),
                      "moekit::ExpertParallel: groups of sizes layer ", groups_.layer.size(), ", ep ", ep,
                      ", etp ", etp, ", edp ", groups_.expert_data.size(), ", batch ", groups_.batch.size(),
                      "; expected layer = ep·etp·edp and batch = ep·edp");
    });
    // Every rank must build the same layer: a mismatch would hang the first exchange.
    const Index mine[4] = {shape.hidden, shape.ffn, shape.experts, shape.top_k};
    std::vector<Index> all(4 * static_cast<std::size_t>(groups_.layer.size()));
    mpi::detail::check(MPI_Allgather(mine, 4, MPI_INT64_T, all.data(), 4, MPI_INT64_T, groups_.layer),
                       "MPI_Allgather");
    for (int r = 0; r < groups_.layer.size(); ++r) {
      const Index* theirs = all.data() + 4 * r;
      detail::require(std::equal(mine, mine + 4, theirs), "moekit::ExpertParallel: rank ", r,
                      " builds a layer of H=", theirs[0], " F=", theirs[1], " E=", theirs[2], " K=", theirs[3],
                      ", rank ", groups_.layer.rank(), " one of H=", mine[0], " F=", mine[1], " E=", mine[2],
                      " K=", mine[3], "; expected the same layer on every rank");
    }
    batch_ = std::make_shared<mpi::Batch>(groups_.batch);
    exchange_ = std::make_shared<mpi::RowExchange>(groups_.expert, options.ranks_per_node);
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

  /// Runs `local`; if it throws on any rank of the layer, every rank throws its message.
  template <class F>
  void all_or_none(F&& local) const {
    mpi::all_or_none(groups_.layer, std::forward<F>(local));
  }

  /// Agrees the layout of the next exchanges from the rows this rank has for each expert
  /// ([E], in expert order): how many rows each rank receives for each of its experts.
  void route(std::span<const Index> rows_per_expert) {
    const int ep = groups_.expert.size();
    const auto local = static_cast<std::size_t>(experts_ / ep), ranks = static_cast<std::size_t>(ep);
    received_.resize(rows_per_expert.size());
    mpi::detail::check(MPI_Alltoall(rows_per_expert.data(), static_cast<int>(local), MPI_INT64_T,
                                    received_.data(), static_cast<int>(local), MPI_INT64_T, groups_.expert),
                       "MPI_Alltoall");
    send_rows_.assign(ranks, 0);
    recv_rows_.assign(ranks, 0);
    offsets_.assign(local + 1, 0);
    for (std::size_t q = 0; q < ranks; ++q)
      for (std::size_t l = 0; l < local; ++l) {
        send_rows_[q] += rows_per_expert[q * local + l];
        recv_rows_[q] += received_[q * local + l];
        offsets_[l + 1] += received_[q * local + l];
      }
    for (std::size_t l = 0; l < local; ++l) offsets_[l + 1] += offsets_[l];
    ++route_count_;
    before_.assign(received_.size(), 0);
    for (std::size_t q = 1; q < ranks; ++q)
      for (std::size_t l = 0; l < local; ++l)
        before_[q * local + l] = before_[(q - 1) * local + l] + received_[(q - 1) * local + l];
  }

  /// Rows this rank's experts received, and where each local expert's block starts ([L+1]).
  Index expert_rows() const { return offsets_.empty() ? 0 : offsets_.back(); }
  std::span<const Index> expert_offsets() const { return offsets_; }

  /// Rows in expert order (this rank's plan) → the owners' blocks, grouped by local expert.
  /// Flat: one MPI_Alltoallw whose receive types place each source's rows straight into the
  /// expert blocks, so no row is copied twice. Hierarchical: source-major, then regrouped.
  template <Scalar T>
  void to_experts(ConstMatrixRef<T> rows, MatrixRef<T> expert_rows) {
    if (groups_.expert.size() == 1) {  // every expert is here, in the same order
      expert_rows = rows;
      return;
    }
    if (!exchange_->hierarchical()) {
      const BlockTypes& blocks = block_types<T>(rows.cols());
      mpi::detail::check(MPI_Alltoallw(rows.data(), contiguous_counts_.data(), contiguous_bytes_.data(),
                                       blocks.rows.data(), expert_rows.data(), ones_.data(), zeros_.data(),
                                       blocks.placed.data(), groups_.expert),
                         "MPI_Alltoallw");
      return;
    }
    auto staging = staging_.matrix<T>(expert_rows.rows(), expert_rows.cols());
    (*exchange_)(rows.data(), send_rows_, staging.data(), recv_rows_, rows.cols());
    regroup<T>(staging, expert_rows, true);
  }

  /// The experts' output rows → back to the ranks whose tokens they are, in their plan's order;
  /// over expert tensor parallel ranks, the partial sums are added up.
  template <Scalar T>
  void to_tokens(ConstMatrixRef<T> expert_rows, MatrixRef<T> rows) {
    if (groups_.expert.size() == 1) {
      rows = expert_rows;
    } else if (!exchange_->hierarchical()) {
      const BlockTypes& blocks = block_types<T>(rows.cols());
      mpi::detail::check(MPI_Alltoallw(expert_rows.data(), ones_.data(), zeros_.data(), blocks.placed.data(),
                                       rows.data(), contiguous_counts_.data(), contiguous_bytes_.data(),
                                       blocks.rows.data(), groups_.expert),
                         "MPI_Alltoallw");
    } else {
      auto staging = staging_.matrix<T>(expert_rows.rows(), expert_rows.cols());
      regroup<T>(expert_rows, staging, false);
      (*exchange_)(staging.data(), recv_rows_, rows.data(), send_rows_, rows.cols());
    }
    if (groups_.expert_tensor.size() > 1)
      mpi::detail::check(MPI_Allreduce(MPI_IN_PLACE, rows.data(), mpi::detail::to_int(rows.size(), "values"),
                                       mpi::detail::scalar_type<T>(), MPI_SUM, groups_.expert_tensor),
                         "MPI_Allreduce");
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
        mpi::detail::check(MPI_Allreduce(MPI_IN_PLACE, values.data(),
                                         mpi::detail::to_int(static_cast<Index>(values.size()), "gradient values"),
                                         mpi::detail::scalar_type<T>(), MPI_SUM, comm),
                           "MPI_Allreduce");
      for (T& v : values) v *= scale;
    };
    for (auto& g : replicated) reduce(g, groups_.batch);
    for (auto& g : experts) reduce(g, groups_.expert_data);
  }

 private:
  /// Source-major [q][l] ↔ expert-major [l][q] blocks of rows.
  template <Scalar T>
  void regroup(ConstMatrixRef<T> from, MatrixRef<T> to, bool to_expert_major) const {
    const auto local = local_count(), ranks = static_cast<std::size_t>(groups_.expert.size());
    Index source_start = 0;
    for (std::size_t q = 0; q < ranks; ++q) {
      Index within = 0;
      for (std::size_t l = 0; l < local; ++l) {
        const Index n = received_[q * local + l];
        const Index s = source_start + within, e = offsets_[l] + before_[q * local + l];
        if (n > 0) {
          if (to_expert_major) to.middleRows(e, n) = from.middleRows(s, n);
          else to.middleRows(s, n) = from.middleRows(e, n);
        }
        within += n;
      }
      source_start += recv_rows_[q];
    }
  }
  std::size_t local_count() const { return static_cast<std::size_t>(experts_ / groups_.expert.size()); }

  /// The datatypes of one route: per peer, `rows` (a row, sent `contiguous_counts_` times) and
  /// `placed` (where that peer's rows lie among this rank's expert blocks).
  struct BlockTypes {
    std::vector<MPI_Datatype> rows, placed;
    BlockTypes() = default;
    BlockTypes(const BlockTypes&) = delete;
    BlockTypes& operator=(const BlockTypes&) = delete;
    ~BlockTypes() {
      int finalized = 0;
      MPI_Finalized(&finalized);
      if (finalized) return;
      if (!rows.empty()) MPI_Type_free(&rows.front());  // one row type, shared by every peer
      for (auto& t : placed) MPI_Type_free(&t);
    }
  };

  template <Scalar T>
  const BlockTypes& block_types(Index width) {
    const MPI_Datatype scalar = mpi::detail::scalar_type<T>();
    if (blocks_ && blocks_route_ == route_count_ && blocks_scalar_ == scalar && blocks_width_ == width)
      return *blocks_;
    const std::size_t local = local_count(), ranks = static_cast<std::size_t>(groups_.expert.size());
    const auto row_bytes = static_cast<MPI_Aint>(width) * static_cast<MPI_Aint>(sizeof(T));
    auto blocks = std::make_shared<BlockTypes>();
    MPI_Datatype row = MPI_DATATYPE_NULL;
    mpi::detail::check(MPI_Type_contiguous(mpi::detail::to_int(width, "row width"), scalar, &row), "MPI_Type_contiguous");
    mpi::detail::check(MPI_Type_commit(&row), "MPI_Type_commit");
    blocks->rows.assign(ranks, row);
    std::vector<int> lengths(local);
    std::vector<MPI_Aint> starts(local);
    contiguous_counts_.resize(ranks);
    contiguous_bytes_.resize(ranks);
    ones_.assign(ranks, 1);
    zeros_.assign(ranks, 0);
    Index sent = 0;
    for (std::size_t q = 0; q < ranks; ++q) {
      for (std::size_t l = 0; l < local; ++l) {
        lengths[l] = mpi::detail::to_int(received_[q * local + l], "rows from one rank");
        starts[l] = static_cast<MPI_Aint>(offsets_[l] + before_[q * local + l]) * row_bytes;
      }
      MPI_Datatype placed = MPI_DATATYPE_NULL;
      mpi::detail::check(MPI_Type_create_hindexed(static_cast<int>(local), lengths.data(), starts.data(), row, &placed),
                         "MPI_Type_create_hindexed");
      mpi::detail::check(MPI_Type_commit(&placed), "MPI_Type_commit");
      blocks->placed.push_back(placed);
      contiguous_counts_[q] = mpi::detail::to_int(send_rows_[q], "rows for one rank");
      contiguous_bytes_[q] = mpi::detail::to_int(sent * width * static_cast<Index>(sizeof(T)), "bytes sent in one exchange");
      sent += send_rows_[q];
    }
    blocks_ = std::move(blocks);
    blocks_route_ = route_count_;
    blocks_scalar_ = scalar;
    blocks_width_ = width;
    return *blocks_;
  }

  /// Untyped scratch rows, aligned for any scalar.
  struct Staging {
    template <Scalar T>
    MatrixMap<T> matrix(Index rows, Index cols) {
      storage.resize(static_cast<std::size_t>(rows * cols) * sizeof(T) / sizeof(double) + 1);
      return {reinterpret_cast<T*>(storage.data()), rows, cols};
    }
    std::vector<double> storage;
  };

  Groups groups_;
  bool have_groups_ = false;
  std::shared_ptr<mpi::Batch> batch_;
  std::shared_ptr<mpi::RowExchange> exchange_;
  Index experts_ = 0;
  std::vector<Index> received_;    // [EP·L] rows from rank q for local expert l
  std::vector<Index> before_;      // [EP·L] rows from ranks before q for local expert l
  std::vector<Index> send_rows_, recv_rows_, offsets_;
  std::uint64_t route_count_ = 0;  // routes so far: the block types follow the latest
  std::shared_ptr<const BlockTypes> blocks_;
  std::uint64_t blocks_route_ = 0;
  MPI_Datatype blocks_scalar_ = MPI_DATATYPE_NULL;
  Index blocks_width_ = 0;
  std::vector<int> contiguous_counts_, contiguous_bytes_, ones_, zeros_;
  Staging staging_;  // the hierarchical exchange's source-major rows
};

}  // namespace moekit
