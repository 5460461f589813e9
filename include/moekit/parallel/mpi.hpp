#pragma once
// What the distributed layer needs from MPI, and nothing more: checked raw calls (Boost.MPI has
// no variable-size all-to-all), agreement on errors, the batch group, and the all-to-all of rows
// (flat, or hierarchical: inside a node first, then across nodes). docs/distributed.md
#include <algorithm>
#include <chrono>
#include <climits>
#include <cstring>
#include <exception>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <type_traits>
#include <vector>

#include <mpi.h>

#include <boost/mpi/communicator.hpp>

#include <moekit/core/error.hpp>
#include <moekit/core/group.hpp>
#include <moekit/core/tensor.hpp>

namespace moekit::mpi {

using Communicator = boost::mpi::communicator;

/// How long a rank waits in one collective for the other ranks of its group before it throws a
/// moekit::error naming what it waited for: a rank that failed, exited or called another step
/// would otherwise leave the others waiting for ever. ExpertParallel::Options::timeout sets it.
/// After a timeout the collective is abandoned: end the job.
using Timeout = std::chrono::milliseconds;
inline constexpr Timeout default_timeout = std::chrono::minutes(10);

namespace detail {

/// Raw MPI calls return their errors (Boost.MPI sets MPI_ERRORS_RETURN): each one is checked.
inline void check(int code, const char* call) {
  if (code == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  MPI_Error_string(code, text, &length);
  moekit::fail("moekit: ", call, " failed: ", std::string(text, static_cast<std::size_t>(length)));
}

[[noreturn]] inline void timed_out(Timeout timeout, std::string_view what, std::string_view what_more) {
  moekit::fail("moekit: ", what, what_more, " waited ", std::chrono::duration<double>(timeout).count(),
               " s for the other ranks of its group; expected every rank to reach the same step within "
               "ExpertParallel::Options::timeout (a rank failed, exited, or called another step); the "
               "collective is abandoned, end the job");
}

/// Waits for a non-blocking collective, testing it, until it completes or `timeout` passes, then
/// throws naming `what` followed by `what_more` (joined only then: no string is built per wait).
/// The thread yields between tests, and after the first 100 µs sleeps a little: ranks that share
/// a core (more ranks than cores) get it to make their own progress.
inline void wait(MPI_Request& request, Timeout timeout, std::string_view what, std::string_view what_more = {}) {
  const auto start = std::chrono::steady_clock::now();
  for (;;) {
    int done = 0;
    check(MPI_Test(&request, &done, MPI_STATUS_IGNORE), "MPI_Test");
    if (done) return;
    const auto waited = std::chrono::steady_clock::now() - start;
    if (waited > timeout) timed_out(timeout, what, what_more);
    if (waited < std::chrono::microseconds(100))
      std::this_thread::yield();
    else
      std::this_thread::sleep_for(std::chrono::microseconds(20));
  }
}

template <class T>
MPI_Datatype scalar_type() {
  if constexpr (std::is_same_v<T, float>) return MPI_FLOAT;
  else if constexpr (std::is_same_v<T, double>) return MPI_DOUBLE;
  else {
    static_assert(std::is_same_v<T, Index> && sizeof(Index) == 8, "moekit::mpi: unsupported scalar");
    return MPI_INT64_T;
  }
}

inline int to_int(Index n, const char* what) {
  moekit::require(n >= 0 && n <= INT_MAX, "moekit: ", what, " = ", n,
                  "; expected at most ", INT_MAX, " (MPI counts are int)");
  return static_cast<int>(n);
}

/// A committed datatype of `width` consecutive scalars, so that counts and displacements are in
/// rows and stay far below INT_MAX.
class RowType {
 public:
  RowType() = default;
  RowType(const RowType&) = delete;
  RowType& operator=(const RowType&) = delete;
  ~RowType() { release(); }

  MPI_Datatype get(MPI_Datatype scalar, Index width) {
    if (type_ != MPI_DATATYPE_NULL && scalar == scalar_ && width == width_) return type_;
    release();
    check(MPI_Type_contiguous(to_int(width, "row width"), scalar, &type_), "MPI_Type_contiguous");
    check(MPI_Type_commit(&type_), "MPI_Type_commit");
    scalar_ = scalar;
    width_ = width;
    return type_;
  }

 private:
  void release() {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (type_ != MPI_DATATYPE_NULL && !finalized) MPI_Type_free(&type_);
    type_ = MPI_DATATYPE_NULL;
  }
  MPI_Datatype type_ = MPI_DATATYPE_NULL, scalar_ = MPI_DATATYPE_NULL;
  Index width_ = 0;
};

/// Exclusive prefix sums of row counts, as MPI wants them.
inline void counts_and_displacements(std::span<const Index> rows, std::vector<int>& counts,
                                     std::vector<int>& displacements) {
  counts.resize(rows.size());
  displacements.resize(rows.size());
  Index offset = 0;
  for (std::size_t i = 0; i < rows.size(); ++i) {
    counts[i] = to_int(rows[i], "rows for one rank");
    displacements[i] = to_int(offset, "rows in one exchange");
    offset += rows[i];
  }
}

}  // namespace detail

/// Every rank of `comm` learns whether any failed, and whether all are at the same `step` (a
/// name such as "forward"). If one failed, every rank throws the message of the lowest-numbered
/// rank that failed, prefixed by that rank: no rank is left waiting in a collective the failed
/// one never enters. If the ranks are at different steps, every rank throws naming them.
/// `failure` is empty where this rank succeeded.
inline void agree(const Communicator& comm, const std::string& failure, std::string_view step,
                  Timeout timeout = default_timeout) {
  const int size = comm.size();
  const int code = static_cast<int>(std::hash<std::string_view>{}(step) & 0x3FFFFFFF);
  int mine[3] = {failure.empty() ? size : comm.rank(), code, -code}, least[3] = {0, 0, 0};
  MPI_Request request = MPI_REQUEST_NULL;
  detail::check(MPI_Iallreduce(mine, least, 3, MPI_INT, MPI_MIN, comm, &request), "MPI_Iallreduce");
  detail::wait(request, timeout, step, "'s agreement");
  if (least[1] != -least[2]) {  // not every rank is at this step: say which ranks are where
    constexpr int width = 32;
    char name[width] = {};
    std::memcpy(name, step.data(), std::min<std::size_t>(step.size(), width - 1));
    std::vector<char> names(static_cast<std::size_t>(size) * width);
    detail::check(MPI_Iallgather(name, width, MPI_CHAR, names.data(), width, MPI_CHAR, comm, &request),
                  "MPI_Iallgather");
    detail::wait(request, timeout, step, "'s agreement");
    std::string where;
    for (int r = 0; r < size; ++r) {
      where += r ? ", rank " : "rank ";
      where += std::to_string(r);
      where += " in ";
      where += std::string_view(names.data() + r * width);
    }
    moekit::fail("moekit: the ranks of a layer are at different steps (", where,
                 "); expected every rank to call the layer's steps in the same order");
  }
  if (least[0] == size) return;
  const int first = least[0];
  std::string text = failure;
  int length = static_cast<int>(text.size());
  detail::check(MPI_Ibcast(&length, 1, MPI_INT, first, comm, &request), "MPI_Ibcast");
  detail::wait(request, timeout, step, "'s agreement");
  text.resize(static_cast<std::size_t>(length));
  detail::check(MPI_Ibcast(text.data(), length, MPI_CHAR, first, comm, &request), "MPI_Ibcast");
  detail::wait(request, timeout, step, "'s agreement");
  throw error("rank " + std::to_string(first) + " of " + std::to_string(size) + ": " + text);
}

/// Runs `local` on this rank; if it throws here or on any other rank of `comm`, every rank
/// throws (see agree).
template <class F>
void all_or_none(const Communicator& comm, std::string_view step, Timeout timeout, F&& local) {
  std::string failure;
  try {
    local();
  } catch (const std::exception& e) {
    failure = *e.what() ? e.what() : "an exception with no message";
  }
  agree(comm, failure, step, timeout);
}

/// The batch group over a communicator: each of its ranks holds its own shard of the batch.
class Batch final : public BatchGroup {
 public:
  explicit Batch(Communicator comm, Timeout timeout = default_timeout) : comm_(std::move(comm)), timeout_(timeout) {}

  int size() const override { return comm_.size(); }
  int rank() const override { return comm_.rank(); }

  void sum(std::span<double> values) const override {
    const int n = detail::to_int(static_cast<Index>(values.size()), "values to sum");
    scratch_.resize(values.size() * static_cast<std::size_t>(comm_.size()));
    MPI_Request request = MPI_REQUEST_NULL;
    detail::check(MPI_Iallgather(values.data(), n, MPI_DOUBLE, scratch_.data(), n, MPI_DOUBLE, comm_, &request),
                  "MPI_Iallgather");
    detail::wait(request, timeout_, "the batch group's sum");
    std::fill(values.begin(), values.end(), 0.0);
    for (int r = 0; r < comm_.size(); ++r)  // in rank order: the same bits on every rank
      for (std::size_t i = 0; i < values.size(); ++i)
        values[i] += scratch_[static_cast<std::size_t>(r) * values.size() + i];
  }

  void gather(std::span<const double> mine, std::vector<double>& all,
              std::vector<Index>& counts) const override {
    const int size = comm_.size(), n = detail::to_int(static_cast<Index>(mine.size()), "values to gather");
    sizes_.resize(static_cast<std::size_t>(size));
    MPI_Request request = MPI_REQUEST_NULL;
    detail::check(MPI_Iallgather(&n, 1, MPI_INT, sizes_.data(), 1, MPI_INT, comm_, &request), "MPI_Iallgather");
    detail::wait(request, timeout_, "the batch group's gather");
    displacements_.resize(static_cast<std::size_t>(size));
    counts.resize(static_cast<std::size_t>(size));
    Index total = 0;
    for (std::size_t r = 0; r < sizes_.size(); ++r) {
      displacements_[r] = detail::to_int(total, "values gathered");
      counts[r] = sizes_[r];
      total += sizes_[r];
    }
    all.resize(static_cast<std::size_t>(total));
    detail::check(MPI_Iallgatherv(mine.data(), n, MPI_DOUBLE, all.data(), sizes_.data(), displacements_.data(),
                                  MPI_DOUBLE, comm_, &request),
                  "MPI_Iallgatherv");
    detail::wait(request, timeout_, "the batch group's gather");
  }

  const Communicator& communicator() const { return comm_; }

 private:
  Communicator comm_;
  Timeout timeout_;
  mutable std::vector<double> scratch_;
  mutable std::vector<int> sizes_, displacements_;
};

/// The all-to-all of rows over one communicator: `send` holds the rows for rank 0, then those
/// for rank 1, ...; `recv` gets the rows from rank 0, then from rank 1, ... Counts are in rows.
///
/// With `ranks_per_node` = G (0 < G < size, dividing it), ranks n·G … n·G+G−1 form node n and
/// the exchange is hierarchical (DeepSpeed-MoE, Tutel 2D): rows first travel inside the node to
/// the local rank that has the destination's local index, then across nodes among the ranks of
/// one local index. Each rank sends G−1 + N−1 messages instead of G·N − 1; the result is the
/// flat exchange's, bit for bit.
class RowExchange {
 public:
  explicit RowExchange(Communicator comm, int ranks_per_node = 0, Timeout timeout = default_timeout)
      : comm_(std::move(comm)), timeout_(timeout) {
    const int size = comm_.size();
    moekit::require(ranks_per_node >= 0 && (ranks_per_node == 0 || size % ranks_per_node == 0),
                    "moekit::ExpertParallel: ranks_per_node = ", ranks_per_node, " with ",
                    size, " expert-parallel ranks; expected 0 (flat) or a divisor of ", size);
    if (ranks_per_node > 0 && ranks_per_node < size) {
      local_size_ = ranks_per_node;
      node_ = comm_.split(comm_.rank() / local_size_, comm_.rank() % local_size_);
      cross_ = comm_.split(comm_.rank() % local_size_, comm_.rank() / local_size_);
    }
  }

  const Communicator& communicator() const { return comm_; }
  bool hierarchical() const { return local_size_ > 0; }

  template <Scalar T>
  void operator()(const T* send, std::span<const Index> send_rows, T* recv,
                  std::span<const Index> recv_rows, Index width) {
    const MPI_Datatype row = row_type_.get(detail::scalar_type<T>(), width);
    if (!hierarchical()) {
      alltoallv(comm_, send, send_rows, recv, recv_rows, row);
      return;
    }
    const std::size_t local = static_cast<std::size_t>(local_size_),
                      nodes = static_cast<std::size_t>(comm_.size() / local_size_),
                      world = local * nodes, me = static_cast<std::size_t>(node_.rank());
    const std::size_t row_bytes = static_cast<std::size_t>(width) * sizeof(T);
    // M[s·W + p]: rows local rank s of this node sends to rank p.
    matrix_.resize(local * world);
    MPI_Request request = MPI_REQUEST_NULL;
    detail::check(MPI_Iallgather(send_rows.data(), static_cast<int>(world), MPI_INT64_T, matrix_.data(),
                                 static_cast<int>(world), MPI_INT64_T, node_, &request),
                  "MPI_Iallgather");
    detail::wait(request, timeout_, "the exchange of rows");
    auto M = [&](std::size_t s, std::size_t p) { return matrix_[s * world + p]; };
    std::vector<Index> offset(world + 1, 0);
    for (std::size_t p = 0; p < world; ++p) offset[p + 1] = offset[p] + send_rows[p];

    // Step 1, inside the node: to local rank t the rows for ranks (n', t), ordered by n'.
    stage1_rows_.assign(local, 0);
    from_local_.assign(local, 0);
    for (std::size_t t = 0; t < local; ++t)
      for (std::size_t n = 0; n < nodes; ++n) {
        stage1_rows_[t] += send_rows[n * local + t];
        from_local_[t] += M(t, n * local + me);
      }
    char* a = staging_a_.data<char>(total(stage1_rows_) * row_bytes);
    for (std::size_t t = 0, at = 0; t < local; ++t)
      for (std::size_t n = 0; n < nodes; ++n) {
        const std::size_t p = n * local + t, size = static_cast<std::size_t>(send_rows[p]) * row_bytes;
        if (size) std::memcpy(a + at, reinterpret_cast<const char*>(send) + static_cast<std::size_t>(offset[p]) * row_bytes, size);
        at += size;
      }
    char* b = staging_b_.data<char>(total(from_local_) * row_bytes);
    alltoallv(node_, a, stage1_rows_, b, from_local_, row);

    // Step 2, across nodes: to node n' the rows of every local source s for (n', me), by s.
    stage2_rows_.assign(nodes, 0);
    from_node_.assign(nodes, 0);
    for (std::size_t n = 0; n < nodes; ++n)
      for (std::size_t s = 0; s < local; ++s) {
        stage2_rows_[n] += M(s, n * local + me);
        from_node_[n] += recv_rows[n * local + s];
      }
    char* c = staging_c_.data<char>(total(stage2_rows_) * row_bytes);
    std::vector<std::size_t>& source_start = source_start_;
    source_start.assign(local, 0);
    for (std::size_t s = 1; s < local; ++s)
      source_start[s] = source_start[s - 1] + static_cast<std::size_t>(from_local_[s - 1]) * row_bytes;
    for (std::size_t n = 0, at = 0; n < nodes; ++n)
      for (std::size_t s = 0; s < local; ++s) {
        std::size_t within = 0;  // source s's block holds its chunks in node order
        for (std::size_t m = 0; m < n; ++m) within += static_cast<std::size_t>(M(s, m * local + me)) * row_bytes;
        const std::size_t size = static_cast<std::size_t>(M(s, n * local + me)) * row_bytes;
        if (size) std::memcpy(c + at, b + source_start[s] + within, size);
        at += size;
      }
    // What node n'' sends is its local ranks' rows for me in local order: source order already.
    alltoallv(cross_, c, stage2_rows_, reinterpret_cast<char*>(recv), from_node_, row);
  }

 private:
  template <class Data>
  void alltoallv(const Communicator& comm, const Data* send, std::span<const Index> send_rows, Data* recv,
                 std::span<const Index> recv_rows, MPI_Datatype row) {
    detail::counts_and_displacements(send_rows, send_counts_, send_displacements_);
    detail::counts_and_displacements(recv_rows, recv_counts_, recv_displacements_);
    MPI_Request request = MPI_REQUEST_NULL;
    detail::check(MPI_Ialltoallv(send, send_counts_.data(), send_displacements_.data(), row, recv,
                                 recv_counts_.data(), recv_displacements_.data(), row, comm, &request),
                  "MPI_Ialltoallv");
    detail::wait(request, timeout_, "the exchange of rows");
  }
  static Index total(const std::vector<Index>& v) {
    Index n = 0;
    for (Index x : v) n += x;
    return n;
  }

  Communicator comm_, node_, cross_;
  Timeout timeout_;
  int local_size_ = 0;
  detail::RowType row_type_;
  std::vector<int> send_counts_, send_displacements_, recv_counts_, recv_displacements_;
  std::vector<Index> matrix_, stage1_rows_, from_local_, stage2_rows_, from_node_;
  std::vector<std::size_t> source_start_;
  moekit::detail::Scratch staging_a_, staging_b_, staging_c_;
};

}  // namespace moekit::mpi
