// What moekit's reader makes of each file named on standard input, one line each, for the fuzz
// test (fuzz_safetensors.py) to hold against its own decoding:
//   ok <metadata and tensors, sorted, names and values in hex, each tensor's bytes hashed>
//   error                     a moekit::error (the message is not compared)
//   foreign <what>            any other exception: a failure of the test
#include <cstdint>
#include <iostream>
#include <span>
#include <string>

#include <moekit/io/safetensors.hpp>

namespace {

std::string hex(std::string_view text) {
  static constexpr char digits[] = "0123456789abcdef";
  std::string out;
  for (const unsigned char c : text) out += {digits[c >> 4], digits[c & 15]};
  return out.empty() ? "-" : out;
}

/// FNV-1a, 64 bits, of a tensor's stored bytes.
std::uint64_t hash(std::span<const char> bytes) {
  std::uint64_t h = 1469598103934665603ull;
  for (const char c : bytes) h = (h ^ static_cast<unsigned char>(c)) * 1099511628211ull;
  return h;
}

std::string describe(const moekit::io::SafeTensors& file) {
  std::string out = "ok";
  for (const auto& [key, value] : file.metadata()) out += " m:" + hex(key) + ":" + hex(value);
  for (const auto& name : file.names()) {  // sorted
    const auto& info = file.info(name);
    const std::uint64_t h = hash(file.bytes(name));
    out += " t:" + hex(name) + ":" + std::string(moekit::io::to_string(info.dtype)) + ":" +
           moekit::shape_string(info.shape) + ":" + std::to_string(h);
  }
  return out;
}

}  // namespace

int main() {
  std::string path;
  while (std::getline(std::cin, path)) {
    try {
      std::cout << describe(moekit::io::SafeTensors::read(path)) << '\n';
    } catch (const moekit::error&) {
      std::cout << "error\n";
    } catch (const std::exception& e) {
      std::cout << "foreign " << e.what() << '\n';
    }
  }
}
