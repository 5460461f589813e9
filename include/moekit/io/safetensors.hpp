#pragma once
// The safetensors format: 8-byte little-endian header length, a JSON header naming each
// tensor's dtype, shape and byte range, then the raw little-endian data. Read as strictly as the
// reference implementation: everything a file says is checked before it is believed, and a file
// loads exactly or not at all. Written atomically and durably. docs/errors.md#files
#include <algorithm>
#include <atomic>
#include <bit>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <span>
#include <string>
#include <system_error>
#include <tuple>
#include <vector>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <moekit/core/error.hpp>
#include <moekit/core/tensor.hpp>
#include <moekit/io/detail/json.hpp>

namespace moekit::io {

static_assert(std::endian::native == std::endian::little,
              "moekit::io: safetensors data is little-endian; this reader assumes a little-endian host");

enum class DType { f32, f64, i32, i64 };

inline std::string_view to_string(DType d) {
  switch (d) {
    case DType::f32: return "F32";
    case DType::f64: return "F64";
    case DType::i32: return "I32";
    case DType::i64: return "I64";
  }
  return "?";
}

inline std::size_t byte_size(DType d) { return d == DType::f32 || d == DType::i32 ? 4 : 8; }

template <class T>
constexpr DType dtype_of = std::same_as<T, float>    ? DType::f32
                           : std::same_as<T, double> ? DType::f64
                           : std::same_as<T, std::int32_t> ? DType::i32
                                                           : DType::i64;

struct TensorInfo {
  DType dtype = DType::f32;
  std::vector<Index> shape;
  std::size_t begin = 0, end = 0;  // byte range in the data section

  Index size() const {
    Index n = 1;
    for (Index d : shape) n *= d;
    return n;
  }
};

/// A whole safetensors file in memory.
class SafeTensors {
 public:
  SafeTensors() = default;

  /// The largest header a file may declare: the reference implementation's limit.
  static constexpr std::uint64_t max_header_bytes = 100'000'000;

  static SafeTensors read(const std::filesystem::path& path) {
    std::error_code error;
    const auto status = std::filesystem::status(path, error);
    detail_fail_if(!std::filesystem::exists(status), path.string(), "cannot be opened (",
                   error ? error.message() : "no such file", "); expected a readable safetensors file");
    detail_fail_if(!std::filesystem::is_regular_file(status), path.string(),
                   "is not a regular file; expected a safetensors file");
    const auto size = std::filesystem::file_size(path, error);
    std::ifstream in(path, std::ios::binary);
    detail_fail_if(error || !in, path.string(), "cannot be opened; expected a readable safetensors file");
    std::vector<char> bytes(static_cast<std::size_t>(size));
    in.read(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    detail_fail_if(static_cast<std::uintmax_t>(in.gcount()) != size, path.string(), "could not be read whole (",
                   in.gcount(), " of ", size, " bytes)");
    return parse(bytes, path.string());
  }

  /// Parses the bytes of a file; `where` names it in messages.
  static SafeTensors parse(std::span<const char> bytes, const std::string& where) {
    SafeTensors file;
    file.where_ = where;
    detail_fail_if(bytes.size() < 8, where, "is ", bytes.size(),
                   " bytes; expected at least 8 (the header length)");
    std::uint64_t header_size = 0;
    std::memcpy(&header_size, bytes.data(), 8);
    detail_fail_if(header_size > bytes.size() - 8, where, "declares a ", header_size,
                   "-byte header but has only ", bytes.size() - 8, " bytes after the length");
    detail_fail_if(header_size > max_header_bytes, where, "declares a ", header_size,
                   "-byte header; expected at most ", max_header_bytes);
    const std::string_view header(bytes.data() + 8, static_cast<std::size_t>(header_size));
    const std::size_t data_size = bytes.size() - 8 - static_cast<std::size_t>(header_size);
    const detail::Json root = detail::JsonParser(header, where).parse();
    detail_fail_if(root.kind != detail::Json::Kind::object, where,
                   "has a header that is not a JSON object");
    for (const auto& [name, value] : root.members) {
      if (name == "__metadata__") {
        file.read_metadata(value);
        continue;
      }
      file.tensors_[name] = file.read_info(name, value, data_size);
    }
    file.check_coverage(data_size);
    file.data_.assign(bytes.begin() + 8 + static_cast<std::ptrdiff_t>(header_size), bytes.end());
    return file;
  }

  /// Writes the file so that a reader of `path` sees the old file or the new one, never half of
  /// either, and the new one survives a power loss once this returns: to a temporary file of a
  /// name no other writer uses, in the same folder, synced, renamed over the target, and the
  /// folder synced. The new file keeps the permissions of the one it replaces; a symbolic link
  /// is written through, to its target. On failure the temporary file is removed and the error
  /// says why.
  void write(const std::filesystem::path& path) const {
    const std::string header = header_text();
    const std::uint64_t header_size = header.size();
    const std::filesystem::path target = link_target(path);
    std::filesystem::path folder = target.parent_path();
    if (folder.empty()) folder = ".";

    static std::atomic<unsigned> counter{0};
    std::filesystem::path temporary;
    int fd = -1;
    for (int attempt = 0; fd < 0; ++attempt) {
      temporary = target;
      temporary += ".tmp." + std::to_string(::getpid()) + "." + std::to_string(counter++) + "." +
                   std::to_string(std::random_device{}());
      fd = ::open(temporary.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);  // the umask applies
      if (fd < 0 && (errno != EEXIST || attempt == 100))
        fail_saving(path, "cannot create a temporary file in '" + folder.string() + "'", errno);
    }
    auto give_up = [&](const std::string& what, int code) {
      ::close(fd);
      ::unlink(temporary.c_str());
      fail_saving(path, what, code);
    };
    struct stat old {};
    if (::stat(target.c_str(), &old) == 0 && S_ISREG(old.st_mode) && ::fchmod(fd, old.st_mode & 07777) != 0)
      give_up("cannot give the new file the old one's permissions", errno);
    const auto* length = reinterpret_cast<const char*>(&header_size);
    for (const std::span<const char> part : {std::span<const char>(length, 8), std::span<const char>(header),
                                             std::span<const char>(data_)}) {
      for (std::size_t done = 0; done < part.size();) {
        const ssize_t n = ::write(fd, part.data() + done, part.size() - done);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) give_up("could not be written completely", n < 0 ? errno : EIO);
        done += static_cast<std::size_t>(n);
      }
    }
    if (::fsync(fd) != 0) give_up("could not be synced to disk", errno);
    if (::close(fd) != 0) {
      const int code = errno;
      ::unlink(temporary.c_str());
      fail_saving(path, "could not be written completely", code);
    }
    if (::rename(temporary.c_str(), target.c_str()) != 0) {
      const int code = errno;
      ::unlink(temporary.c_str());
      fail_saving(path, "cannot replace '" + target.string() + "'", code);
    }
    if (const int dir = ::open(folder.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC); dir >= 0) {
      const bool synced = ::fsync(dir) == 0;
      const int code = errno;
      ::close(dir);
      if (!synced) fail_saving(path, "was written, but its folder could not be synced to disk", code);
    }
  }

  std::map<std::string, std::string>& metadata() { return metadata_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  /// The metadata value for `key`, or `fallback` when there is none.
  std::string metadata(const std::string& key, const std::string& fallback) const {
    const auto it = metadata_.find(key);
    return it == metadata_.end() ? fallback : it->second;
  }

  bool contains(std::string_view name) const { return tensors_.find(name) != tensors_.end(); }

  std::vector<std::string> names() const {
    std::vector<std::string> out;
    for (const auto& entry : tensors_) out.push_back(entry.first);
    return out;
  }

  const TensorInfo& info(std::string_view name) const {
    const auto it = tensors_.find(name);
    detail_fail_if(it == tensors_.end(), where_, "has no tensor '", name, "'");
    return it->second;
  }

  /// The tensor's values as T; F32 and F64 convert into either scalar.
  template <Scalar T>
  std::vector<T> values(std::string_view name) const {
    const TensorInfo& t = info(name);
    detail_fail_if(t.dtype != DType::f32 && t.dtype != DType::f64, where_, "tensor '", name,
                   "' has dtype ", to_string(t.dtype), "; expected F32 or F64");
    return t.dtype == DType::f32 ? convert<float, T>(t) : convert<double, T>(t);
  }

  /// The tensor's values as 64-bit integers; I32 and I64 convert.
  std::vector<std::int64_t> integers(std::string_view name) const {
    const TensorInfo& t = info(name);
    detail_fail_if(t.dtype != DType::i32 && t.dtype != DType::i64, where_, "tensor '", name,
                   "' has dtype ", to_string(t.dtype), "; expected I32 or I64");
    return t.dtype == DType::i32 ? convert<std::int32_t, std::int64_t>(t)
                                 : convert<std::int64_t, std::int64_t>(t);
  }

  template <class T>
  void add(const std::string& name, std::vector<Index> shape, std::span<const T> values) {
    TensorInfo t{dtype_of<T>, std::move(shape), data_.size(), data_.size() + values.size_bytes()};
    detail_fail_if(t.size() != static_cast<Index>(values.size()), where_, "tensor '", name,
                   "' has ", values.size(), " values for shape ", shape_string(t.shape));
    detail_fail_if(contains(name), where_, "already has a tensor '", name, "'");
    const auto* raw = reinterpret_cast<const char*>(values.data());
    data_.insert(data_.end(), raw, raw + values.size_bytes());
    tensors_[name] = std::move(t);
  }

 private:
  template <class... Parts>
  static void detail_fail_if(bool bad, std::string_view where, const Parts&... parts) {
    if (bad) moekit::fail("moekit::SafeTensors: '", where, "' ", parts...);
  }

  [[noreturn]] static void fail_saving(const std::filesystem::path& path, const std::string& what, int code) {
    moekit::fail("moekit::SafeTensors: saving '", path.string(), "': ", what, " (", std::strerror(code),
                 "); nothing was changed at '", path.string(), "'");
  }

  /// Where writing `path` goes: through symbolic links to the file they name.
  static std::filesystem::path link_target(std::filesystem::path path) {
    std::error_code error;
    for (int hops = 0; hops < 40 && std::filesystem::is_symlink(std::filesystem::symlink_status(path, error)); ++hops) {
      const auto next = std::filesystem::read_symlink(path, error);
      if (error) break;
      path = next.is_absolute() ? next : path.parent_path() / next;
    }
    return path;
  }

  std::string header_text() const {
    std::string header = "{";
    if (!metadata_.empty()) {
      header += "\"__metadata__\":{";
      for (const auto& [k, v] : metadata_) {
        if (header.back() != '{') header += ',';
        header += detail::json_quote(k);
        header += ':';
        header += detail::json_quote(v);
      }
      header += "}";
    }
    for (const auto& [name, info] : tensors_) {
      if (header.size() > 1) header += ",";
      header += detail::json_quote(name) + ":{\"dtype\":\"" + std::string(to_string(info.dtype)) +
                "\",\"shape\":" + shape_string(info.shape) + ",\"data_offsets\":[" +
                std::to_string(info.begin) + "," + std::to_string(info.end) + "]}";
    }
    header += "}";
    header.append((8 - header.size() % 8) % 8, ' ');
    return header;
  }

  /// The tensors' byte ranges, in order, cover the data section exactly: no overlap, no gap, no
  /// bytes after the last (a shifted header shows here).
  void check_coverage(std::size_t data_size) const {
    std::vector<std::tuple<std::size_t, std::size_t, std::string_view>> ranges;
    for (const auto& [name, t] : tensors_) ranges.emplace_back(t.begin, t.end, name);
    std::sort(ranges.begin(), ranges.end());
    std::size_t covered = 0;
    for (const auto& [begin, end, name] : ranges) {
      detail_fail_if(begin != covered, where_, "tensor '", name, "' has data_offsets [", begin, ",", end,
                     "]; expected it to begin at byte ", covered,
                     " (the tensors cover the data section in order, with no gap or overlap)");
      covered = end;
    }
    detail_fail_if(covered != data_size, where_, "has ", data_size - covered,
                   " bytes after the last tensor; expected the tensors to cover the data section exactly "
                   "(a header length that is off shifts every tensor)");
  }

  void read_metadata(const detail::Json& value) {
    detail_fail_if(value.kind != detail::Json::Kind::object, where_,
                   "has __metadata__ that is not an object of strings");
    for (const auto& [k, v] : value.members) {
      detail_fail_if(v.kind != detail::Json::Kind::string, where_, "has __metadata__ entry '", k,
                     "' that is not a string");
      metadata_[k] = v.text;
    }
  }

  TensorInfo read_info(const std::string& name, const detail::Json& value,
                       std::size_t data_size) const {
    using Kind = detail::Json::Kind;
    auto member = [&](std::string_view key) -> const detail::Json& {
      for (const auto& [k, v] : value.members)
        if (k == key) return v;
      moekit::fail("moekit::SafeTensors: '", where_, "' tensor '", name, "' has no '",
                   key, "'; expected dtype, shape and data_offsets");
    };
    auto integer = [&](const detail::Json& v, std::string_view what) {
      detail_fail_if(v.kind != Kind::number || v.text.empty() ||
                         v.text.find_first_not_of("0123456789") != std::string::npos ||
                         v.text.size() > 18 || (v.text.size() > 1 && v.text[0] == '0'),
                     where_, "tensor '", name, "' has ", what, " '", v.text,
                     "'; expected a non-negative integer");
      return static_cast<std::size_t>(std::stoull(v.text));
    };
    detail_fail_if(value.kind != Kind::object, where_, "entry '", name, "' is not an object");
    TensorInfo t;
    const auto& dtype = member("dtype");
    const std::string d = dtype.text;
    if (d == "F32") t.dtype = DType::f32;
    else if (d == "F64") t.dtype = DType::f64;
    else if (d == "I32") t.dtype = DType::i32;
    else if (d == "I64") t.dtype = DType::i64;
    else
      moekit::fail("moekit::SafeTensors: '", where_, "' tensor '", name, "' has dtype '",
                   d, "'; expected F32, F64, I32 or I64");
    const auto& shape = member("shape");
    detail_fail_if(shape.kind != Kind::array, where_, "tensor '", name, "' has a shape that is not an array");
    for (const auto& dim : shape.items) t.shape.push_back(static_cast<Index>(integer(dim, "a dimension")));
    const auto& offsets = member("data_offsets");
    detail_fail_if(offsets.kind != Kind::array || offsets.items.size() != 2, where_, "tensor '",
                   name, "' has data_offsets that are not [begin, end]");
    t.begin = integer(offsets.items[0], "offset");
    t.end = integer(offsets.items[1], "offset");
    detail_fail_if(t.begin > t.end || t.end > data_size, where_, "tensor '", name,
                   "' has data_offsets [", t.begin, ",", t.end, "]; expected a range inside the ",
                   data_size, " data bytes");
    std::uint64_t elements = 1, expected = 0;
    for (const Index d : t.shape)
      detail_fail_if(__builtin_mul_overflow(elements, static_cast<std::uint64_t>(d), &elements), where_, "tensor '",
                     name, "' has shape ", shape_string(t.shape), ", whose size overflows; expected a size below 2^63");
    detail_fail_if(__builtin_mul_overflow(elements, byte_size(t.dtype), &expected) || expected > (std::uint64_t{1} << 62),
                   where_, "tensor '", name, "' has shape ", shape_string(t.shape),
                   ", whose size overflows; expected a size below 2^63");
    detail_fail_if(t.end - t.begin != expected, where_, "tensor '", name, "' has ",
                   t.end - t.begin, " bytes; expected ", expected, " for ", to_string(t.dtype),
                   " ", shape_string(t.shape));
    return t;
  }

  template <class From, class To>
  std::vector<To> convert(const TensorInfo& t) const {
    std::vector<To> out(static_cast<std::size_t>(t.size()));
    for (std::size_t i = 0; i < out.size(); ++i) {
      From v;
      std::memcpy(&v, data_.data() + t.begin + i * sizeof(From), sizeof(From));
      out[i] = static_cast<To>(v);
    }
    return out;
  }

  std::string where_ = "(in memory)";
  std::map<std::string, TensorInfo, std::less<>> tensors_;
  std::map<std::string, std::string> metadata_;
  std::vector<char> data_;
};

}  // namespace moekit::io
