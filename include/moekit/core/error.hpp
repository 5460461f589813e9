#pragma once
// moekit::error and the checks that raise it. Every message names the value it got and what was
// expected, in the form "moekit::<Thing>: <given>; <expected>; <fix>" (docs/errors.md lists them).
#include <sstream>
#include <stdexcept>
#include <string>

namespace moekit {

/// The one exception moekit throws for bad input or an impossible configuration.
class error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// Throws moekit::error with the parts written one after another: the checks of the library and
/// of policies written for it. "moekit::FirstK: K = 9; expected K <= 8".
template <class... Parts>
[[noreturn]] void fail(const Parts&... parts) {
  std::ostringstream message;
  (message << ... << parts);
  throw error(message.str());
}

/// Throws moekit::error unless `ok`, naming the value and what was expected (fail's parts). The
/// parts are only formatted on failure.
template <class... Parts>
void require(bool ok, const Parts&... parts) {
  if (!ok) fail(parts...);
}

}  // namespace moekit
