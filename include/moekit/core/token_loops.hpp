#pragma once
// The loops a policy runs over the batch's tokens, on TBB's threads: each token by itself, or
// blocks of tokens whose shares of a sum over tokens are then added in block order. The blocks are
// fixed by the number of tokens, never by the threads, so results are the same bits on any
// number of threads. docs/writing_a_policy.md
#include <algorithm>
#include <cstddef>
#include <vector>

#include <moekit/core/detail/tiles.hpp>
#include <moekit/core/tensor.hpp>

namespace moekit {

/// Tokens a policy's loop over tokens takes at once (the router's scores and choices, a
/// balancer's sums over tokens): each token's work is small, so a block is long enough to be worth
/// a task, and fixed, so that a sum over tokens groups the same way on any number of threads.
inline constexpr Index policy_token_block = 128;

/// Blocks of policy_token_block that cover `tokens`.
inline Index token_blocks(Index tokens) { return (tokens + policy_token_block - 1) / policy_token_block; }

/// body(block, first, count) for each block of policy_token_block tokens, in parallel: the block's
/// number (for its share of a sum, see sum_of_blocks) and its tokens [first, first + count).
template <class Body>
void for_each_token_block(Index tokens, Body body) {
  detail::for_each_block(tokens, policy_token_block,
                         [&](Index first, Index count) { body(first / policy_token_block, first, count); });
}

/// body(t) for each token t of [0, tokens), by blocks of policy_token_block in parallel.
template <class Body>
void for_each_token(Index tokens, Body body) {
  detail::for_each_index(tokens, policy_token_block, body);
}

/// sum[j] = Σ_b partial[b·width + j] over the blocks b in order: each block's share of a sum over
/// tokens, added the same way whichever thread computed it.
template <class Partial, class Sum>
void sum_of_blocks(const std::vector<Partial>& partial, Index blocks, std::vector<Sum>& sum) {
  const std::size_t width = sum.size();
  std::fill(sum.begin(), sum.end(), Sum(0));
  for (std::size_t b = 0; b < static_cast<std::size_t>(blocks); ++b)
    for (std::size_t j = 0; j < width; ++j) sum[j] += static_cast<Sum>(partial[b * width + j]);
}

}  // namespace moekit
