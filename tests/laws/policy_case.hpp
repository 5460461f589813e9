#pragma once
// What the law suites are instantiated with: a policy type, default-constructed, or a case that
// makes one with its options, and may name itself:
//
//   struct DeepSeekRouter {
//     static constexpr std::string_view label = "DeepSeekRouter";
//     static TopK<8> make() { return {{.score = ScoreFn::sigmoid, .scale = 2.5}}; }
//   };
#include <gtest/gtest.h>

#include <string>

#include <tbb/global_control.h>

#include <moekit/core/concepts.hpp>

namespace moekit::laws {

/// The policy a case stands for.
template <class Case>
auto make_policy() {
  if constexpr (requires { Case::make(); })
    return Case::make();
  else
    return Case{};
}

template <class Case>
using policy_of = decltype(make_policy<Case>());

/// Names each instantiation by its case's name, or its policy's ("TopK"), and its position.
struct CaseName {
  template <class Case>
  static std::string GetName(int i) {
    if constexpr (requires { Case::label; })
      return std::string(Case::label) + std::to_string(i);
    else
      return std::string(policy_of<Case>::name) + std::to_string(i);
  }
};

/// f() run on at most `threads` of TBB's threads.
template <class F>
auto on_threads(int threads, F f) {
  tbb::global_control limit(tbb::global_control::max_allowed_parallelism, static_cast<std::size_t>(threads));
  return f();
}

}  // namespace moekit::laws
