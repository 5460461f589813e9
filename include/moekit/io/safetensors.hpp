#pragma once
// The safetensors format: 8-byte little-endian header length, a JSON header naming each
// tensor's dtype, shape and byte range, then the raw little-endian data. Read as strictly as the
// reference implementation: everything a file says is checked before it is believed, and a file
// loads exactly or not at all. Written atomically and durably. docs/errors.md#files
#include <algorithm>
#include <atomic>
#include <bit>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
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

#include <moekit/core/detail/bf16_bits.hpp>
#include <moekit/core/error.hpp>
#include <moekit/core/tensor.hpp>
#include <moekit/io/detail/json.hpp>

namespace moekit::io {

static_assert(std::endian::native == std::endian::little,
              "moekit::io: safetensors data is little-endian; this reader assumes a little-endian host");

/// The format's dtypes. Every one is read (a file may hold tensors moekit does not use);
/// values() converts F32, F64, BF16 and F16, integers() I32 and I64.
enum class DType { f32, f64, i32, i64, bf16, f16, boolean, u8, i8, f8_e5m2, f8_e4m3, i16, u16, u32, u64 };

namespace detail {
struct DTypeRow {
  DType dtype;
  std::string_view name;
  std::size_t bytes;
};
inline constexpr DTypeRow dtypes[] = {
    {DType::f32, "F32", 4},      {DType::f64, "F64", 8},         {DType::i32, "I32", 4},
    {DType::i64, "I64", 8},      {DType::bf16, "BF16", 2},       {DType::f16, "F16", 2},
    {DType::boolean, "BOOL", 1}, {DType::u8, "U8", 1},           {DType::i8, "I8", 1},
    {DType::f8_e5m2, "F8_E5M2", 1}, {DType::f8_e4m3, "F8_E4M3", 1}, {DType::i16, "I16", 2},
    {DType::u16, "U16", 2},      {DType::u32, "U32", 4},         {DType::u64, "U64", 8},
};
constexpr const DTypeRow& row(DType d) { return dtypes[static_cast<std::size_t>(d)]; }

/// bfloat16 (core/detail/bf16_bits.hpp) and IEEE half: the bits to float (exactly), and float to
/// the bits, rounded to nearest even.
using moekit::detail::from_bf16;
using moekit::detail::to_bf16;
inline float from_f16(std::uint16_t bits) {
  const std::uint32_t sign = std::uint32_t{bits & 0x8000u} << 16, exponent = (bits >> 10) & 0x1Fu,
                      mantissa = bits & 0x3FFu;
  if (exponent == 0) {  // zero or subnormal: mantissa · 2^-24
    const float v = static_cast<float>(mantissa) * 0x1p-24f;
    return sign ? -v : v;
  }
  if (exponent == 31) return std::bit_cast<float>(sign | 0x7F800000u | (mantissa << 13));
  return std::bit_cast<float>(sign | ((exponent + 112) << 23) | (mantissa << 13));
}
inline std::uint16_t to_f16(float value) {
  std::uint32_t x = std::bit_cast<std::uint32_t>(value);
  const auto sign = static_cast<std::uint16_t>((x >> 16) & 0x8000u);
  x &= 0x7FFFFFFFu;
  if (x > 0x7F800000u) return sign | 0x7E00u;     // NaN
  if (x >= 0x477FF000u) return sign | 0x7C00u;    // 65520 and above round to infinity
  if (x < 0x38800000u)                            // below 2^-14: a subnormal half, mantissa = v·2^24
    return sign | static_cast<std::uint16_t>(std::nearbyint(std::bit_cast<float>(x) * 0x1p24f));
  std::uint32_t h = (x - 0x38000000u) >> 13;      // rebias the exponent, keep 10 mantissa bits
  const std::uint32_t rest = x & 0x1FFFu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
  return static_cast<std::uint16_t>(sign | h);
}
}  // namespace detail

inline std::string_view to_string(DType d) { return detail::row(d).name; }
inline std::size_t byte_size(DType d) { return detail::row(d).bytes; }

template <class T>
constexpr DType dtype_of = std::same_as<T, float>    ? DType::f32
                           : std::same_as<T, double> ? DType::f64
                           : std::same_as<T, std::int32_t> ? DType::i32
                                                           : DType::i64;

struct TensorInfo {
  DType dtype = DType::f32;
  std::vector<Index> shape;
  std::size_t begin = 0, end = 0;  // byte range in the data section
  bool read = true;                // false: listed by a partial read, its bytes not read

  Index size() const { return element_count(shape); }
};

/// A whole safetensors file in memory.
class SafeTensors {
 public:
  SafeTensors() = default;

  /// The largest header a file may declare: the reference implementation's limit.
  static constexpr std::uint64_t max_header_bytes = 100'000'000;

  static SafeTensors read(const std::filesystem::path& path) {
    std::uintmax_t size = 0;
    std::ifstream in = open(path, size);
    std::vector<char> bytes(static_cast<std::size_t>(size));
    in.read(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    detail_fail_if(static_cast<std::uintmax_t>(in.gcount()) != size, path.string(), "could not be read whole (",
                   in.gcount(), " of ", size, " bytes)");
    return parse(bytes, path.string());
  }

  /// Parses the bytes of a file; `where` names it in messages.
  static SafeTensors parse(std::span<const char> bytes, const std::string& where) {
    std::size_t data_begin = 0;
    SafeTensors file = parse_header(bytes, bytes.size(), where, data_begin);
    file.data_.assign(bytes.begin() + static_cast<std::ptrdiff_t>(data_begin), bytes.end());
    return file;
  }

  /// The tensors of `path` for which `wanted(name)` is true, and no byte of the others: the
  /// header is read and checked whole (every entry, the data section's coverage), then each
  /// wanted tensor's bytes. The others are listed (names(), info()) but hold no values.
  template <class Wanted>
  static SafeTensors read(const std::filesystem::path& path, Wanted wanted) {
    std::uintmax_t size = 0;
    std::ifstream in = open(path, size);
    auto read_at = [&](std::uint64_t offset, std::uint64_t count, char* out) {
      in.seekg(static_cast<std::streamoff>(offset));
      in.read(out, static_cast<std::streamsize>(count));
      detail_fail_if(!in || static_cast<std::uint64_t>(in.gcount()) != count, path.string(),
                     "could not be read (", count, " bytes at byte ", offset, " of ", size, ")");
    };
    std::vector<char> head(static_cast<std::size_t>(std::min<std::uintmax_t>(size, 8)));
    read_at(0, head.size(), head.data());
    if (head.size() == 8) {  // the header too, if the length is believable (parse_header checks it)
      std::uint64_t header_size = 0;
      std::memcpy(&header_size, head.data(), 8);
      if (header_size <= size - 8 && header_size <= max_header_bytes) {
        head.resize(8 + static_cast<std::size_t>(header_size));
        read_at(8, header_size, head.data() + 8);
      }
    }
    std::size_t data_begin = 0;
    SafeTensors file = parse_header(head, static_cast<std::size_t>(size), path.string(), data_begin);
    for (auto& [name, t] : file.tensors_) {
      t.read = wanted(std::string_view(name));
      if (!t.read) continue;
      const std::size_t at = file.data_.size();
      file.data_.resize(at + (t.end - t.begin));
      read_at(data_begin + t.begin, t.end - t.begin, file.data_.data() + at);
      t.end = at + (t.end - t.begin);
      t.begin = at;
    }
    return file;
  }

  /// Writes the file so that a reader of `path` sees the old file or the new one, never half of
  /// either, and the new one survives a power loss once this returns: to a temporary file of a
  /// name no other writer uses, in the same folder, synced, renamed over the target, and the
  /// folder synced. The new file keeps the permissions of the one it replaces; a symbolic link
  /// is written through, to its target. On failure the temporary file is removed and the error
  /// says why.
  void write(const std::filesystem::path& path) const {
    for (const auto& [name, t] : tensors_)
      detail_fail_if(!t.read, where_, "cannot be written to '", path.string(), "': tensor '", name,
                     "' was not read (a partial read holds only the tensors asked for)");
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

  /// The tensor's values as T; F32, F64, BF16 and F16 convert into either scalar (BF16 and F16
  /// exactly).
  template <Scalar T>
  std::vector<T> values(std::string_view name) const {
    const TensorInfo& t = readable(name);
    switch (t.dtype) {
      case DType::f32: return convert<float, T>(t);
      case DType::f64: return convert<double, T>(t);
      case DType::bf16: return convert<std::uint16_t, T>(t, detail::from_bf16);
      case DType::f16: return convert<std::uint16_t, T>(t, detail::from_f16);
      default:
        detail_fail_if(true, where_, "tensor '", name, "' has dtype ", to_string(t.dtype),
                       "; expected F32, F64, BF16 or F16");
    }
    return {};
  }

  /// The tensor's bytes as stored (little-endian), whatever its dtype.
  std::span<const char> bytes(std::string_view name) const {
    const TensorInfo& t = readable(name);
    return std::span<const char>(data_).subspan(t.begin, t.end - t.begin);
  }

  /// The tensor's values as 64-bit integers; I32 and I64 convert.
  std::vector<std::int64_t> integers(std::string_view name) const {
    const TensorInfo& t = readable(name);
    detail_fail_if(t.dtype != DType::i32 && t.dtype != DType::i64, where_, "tensor '", name,
                   "' has dtype ", to_string(t.dtype), "; expected I32 or I64");
    return t.dtype == DType::i32 ? convert<std::int32_t, std::int64_t>(t)
                                 : convert<std::int64_t, std::int64_t>(t);
  }

  /// Adds `values` stored as dtype: F32, F64, BF16 or F16 (rounded to nearest even).
  template <Scalar T>
  void add_as(const std::string& name, std::vector<Index> shape, std::span<const T> values, DType dtype) {
    switch (dtype) {
      case DType::f32: return add(name, std::move(shape), std::span<const float>(std::vector<float>(values.begin(), values.end())));
      case DType::f64: return add(name, std::move(shape), std::span<const double>(std::vector<double>(values.begin(), values.end())));
      case DType::bf16:
      case DType::f16: {
        std::vector<std::uint16_t> bits(values.size());
        for (std::size_t i = 0; i < bits.size(); ++i) {
          const auto v = static_cast<float>(values[i]);
          bits[i] = dtype == DType::bf16 ? detail::to_bf16(v) : detail::to_f16(v);
        }
        return add_raw(name, std::move(shape), dtype, std::as_bytes(std::span<const std::uint16_t>(bits)));
      }
      default:
        detail_fail_if(true, where_, "tensor '", name, "' asked to be stored as ", to_string(dtype),
                       "; expected F32, F64, BF16 or F16");
    }
  }

  template <class T>
  void add(const std::string& name, std::vector<Index> shape, std::span<const T> values) {
    add_raw(name, std::move(shape), dtype_of<T>, std::as_bytes(values));
  }

  /// Adds a tensor's stored bytes as they are.
  void add_raw(const std::string& name, std::vector<Index> shape, DType dtype, std::span<const std::byte> bytes) {
    TensorInfo t{dtype, std::move(shape), data_.size(), data_.size() + bytes.size()};
    detail_fail_if(t.size() * static_cast<Index>(byte_size(dtype)) != static_cast<Index>(bytes.size()), where_,
                   "tensor '", name, "' has ", bytes.size(), " bytes for ", to_string(dtype), " ",
                   shape_string(t.shape));
    detail_fail_if(contains(name), where_, "already has a tensor '", name, "'");
    const auto* raw = reinterpret_cast<const char*>(bytes.data());
    data_.insert(data_.end(), raw, raw + bytes.size());
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
    const auto* row = std::ranges::find_if(detail::dtypes, [&](const auto& r) { return r.name == dtype.text; });
    detail_fail_if(dtype.kind != Kind::string || row == std::end(detail::dtypes), where_, "tensor '", name,
                   "' has dtype '", dtype.text, "'; expected one of the format's: F64, F32, F16, BF16, "
                   "F8_E5M2, F8_E4M3, I64, I32, I16, I8, U64, U32, U16, U8, BOOL");
    t.dtype = row->dtype;
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

  /// The header of a file of `file_size` bytes whose first bytes are `start` (the length and at
  /// least the header), checked whole; `data_begin` gets where the data section starts.
  static SafeTensors parse_header(std::span<const char> start, std::size_t file_size, const std::string& where,
                                  std::size_t& data_begin) {
    SafeTensors file;
    file.where_ = where;
    detail_fail_if(file_size < 8, where, "is ", file_size, " bytes; expected at least 8 (the header length)");
    std::uint64_t header_size = 0;
    std::memcpy(&header_size, start.data(), 8);
    detail_fail_if(header_size > file_size - 8, where, "declares a ", header_size,
                   "-byte header but has only ", file_size - 8, " bytes after the length");
    detail_fail_if(header_size > max_header_bytes, where, "declares a ", header_size,
                   "-byte header; expected at most ", max_header_bytes);
    const std::string_view header(start.data() + 8, static_cast<std::size_t>(header_size));
    const std::size_t data_size = file_size - 8 - static_cast<std::size_t>(header_size);
    const detail::Json root = detail::JsonParser(header, where).parse();
    detail_fail_if(root.kind != detail::Json::Kind::object, where, "has a header that is not a JSON object");
    for (const auto& [name, value] : root.members) {
      if (name == "__metadata__") {
        file.read_metadata(value);
        continue;
      }
      file.tensors_[name] = file.read_info(name, value, data_size);
    }
    file.check_coverage(data_size);
    data_begin = 8 + static_cast<std::size_t>(header_size);
    return file;
  }

  /// `path` opened for reading, and its size; anything but a readable regular file is refused.
  static std::ifstream open(const std::filesystem::path& path, std::uintmax_t& size) {
    std::error_code error;
    const auto status = std::filesystem::status(path, error);
    detail_fail_if(!std::filesystem::exists(status), path.string(), "cannot be opened (",
                   error ? error.message() : "no such file", "); expected a readable safetensors file");
    detail_fail_if(!std::filesystem::is_regular_file(status), path.string(),
                   "is not a regular file; expected a safetensors file");
    size = std::filesystem::file_size(path, error);
    std::ifstream in(path, std::ios::binary);
    detail_fail_if(error || !in, path.string(), "cannot be opened; expected a readable safetensors file");
    return in;
  }

  /// The tensor's entry, if its bytes were read.
  const TensorInfo& readable(std::string_view name) const {
    const TensorInfo& t = info(name);
    detail_fail_if(!t.read, where_, "tensor '", name, "' was not read (a partial read reads only the tensors asked for)");
    return t;
  }

  template <class From, class To, class Decode = std::identity>
  std::vector<To> convert(const TensorInfo& t, Decode decode = {}) const {
    std::vector<To> out(static_cast<std::size_t>(t.size()));
    for (std::size_t i = 0; i < out.size(); ++i) {
      From v;
      std::memcpy(&v, data_.data() + t.begin + i * sizeof(From), sizeof(From));
      out[i] = static_cast<To>(decode(v));
    }
    return out;
  }

  std::string where_ = "(in memory)";
  std::map<std::string, TensorInfo, std::less<>> tensors_;
  std::map<std::string, std::string> metadata_;
  std::vector<char> data_;
};

}  // namespace moekit::io
