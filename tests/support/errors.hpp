#pragma once
// What a bad call says: the message of the moekit::error it throws.
#include <string>

#include <moekit/core/error.hpp>

namespace moekit::test {

/// Runs f and returns the message of the moekit::error it throws, or "(no error)" (which then
/// fails the comparison with the expected message).
std::string message_of(auto f) {
  try {
    f();
  } catch (const error& e) {
    return e.what();
  }
  return "(no error)";
}

}  // namespace moekit::test
