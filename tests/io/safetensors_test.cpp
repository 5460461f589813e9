// Safetensors: round trips, the fixtures' headers, and malformed files refused by name.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <atomic>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <thread>
#include <vector>

#include <unistd.h>

#include <moekit/moekit.hpp>

#include "../support/errors.hpp"

namespace moekit::test {
namespace {

const std::filesystem::path fixtures = MOEKIT_FIXTURES_DIR;

std::vector<char> file_bytes(const std::string& header, std::size_t data_bytes) {
  std::vector<char> bytes(8 + header.size() + data_bytes, 0);
  const std::uint64_t n = header.size();
  std::memcpy(bytes.data(), &n, 8);
  std::memcpy(bytes.data() + 8, header.data(), header.size());
  return bytes;
}

/// The bytes `file` writes.
std::vector<char> bytes_of(const io::SafeTensors& file) {
  const auto path = std::filesystem::temp_directory_path() / ("moekit_bytes_" + std::to_string(::getpid()));
  file.write(path);
  std::ifstream in(path, std::ios::binary);
  std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::filesystem::remove(path);
  return bytes;
}

std::string message_of_parse(const std::vector<char>& bytes) {
  return message_of([&] { io::SafeTensors::parse(bytes, "test.safetensors"); });
}

TEST(SafeTensors, ReadsTheFixtureLayout) {
  const auto file = io::SafeTensors::read(fixtures / "mixtral.safetensors");
  EXPECT_EQ(file.metadata("family", ""), "mixtral");
  EXPECT_EQ(file.info("experts.gate").shape, (std::vector<Index>{8, 48, 32}));
  EXPECT_EQ(file.info("topk.index").dtype, io::DType::i64);
  EXPECT_EQ(file.values<double>("x").size(), 24u * 32u);
  for (auto e : file.integers("topk.index")) EXPECT_TRUE(e >= 0 && e < 8);
}

TEST(SafeTensors, RoundTripsValuesMetadataAndNames) {
  io::SafeTensors file;
  file.metadata()["note"] = "quotes \" and \\ survive";
  const std::vector<float> a{1.5f, -2.0f, 3.25f, 0.0f, 7.0f, 8.0f};
  const std::vector<std::int64_t> b{4, 5};
  file.add<float>("layer.a", {2, 3}, a);
  file.add<std::int64_t>("b", {2}, b);
  const auto path = std::filesystem::temp_directory_path() / "moekit_roundtrip.safetensors";
  file.write(path);
  const auto back = io::SafeTensors::read(path);
  EXPECT_EQ(back.metadata("note", ""), "quotes \" and \\ survive");
  EXPECT_EQ(back.values<float>("layer.a"), a);
  EXPECT_EQ(back.values<double>("layer.a")[2], 3.25);
  EXPECT_EQ(back.integers("b"), b);
  EXPECT_FALSE(std::filesystem::exists(path.string() + ".tmp"));
  std::filesystem::remove(path);
}

TEST(SafeTensors, LayerSavesAndLoadsItsParameters) {
  const auto path = std::filesystem::temp_directory_path() / "moekit_layer.safetensors";
  MoELayer<TopK<2>, double> a({.hidden = 5, .ffn = 3, .experts = 4, .seed = 1});
  a.save(path);
  MoELayer<TopK<2>, double> b({.hidden = 5, .ffn = 3, .experts = 4, .seed = 2});
  b.load(path);
  for (std::size_t p = 0; p < a.parameters().size(); ++p)
    EXPECT_TRUE(std::ranges::equal(a.parameters()[p].values(), b.parameters()[p].values()));
  MoELayer<TopK<2>, float> c({.hidden = 5, .ffn = 3, .experts = 4});
  c.load(path);  // F64 file into a float layer
  EXPECT_EQ(c.parameters()[1].values()[0], static_cast<float>(a.parameters()[1].values()[0]));
  EXPECT_EQ(io::SafeTensors::read(path).metadata("experts", ""), "4");
  std::filesystem::remove(path);
}

TEST(SafeTensors, RefusesMalformedFilesByName) {
  EXPECT_EQ(message_of_parse({'a', 'b'}),
            "moekit::SafeTensors: 'test.safetensors' is 2 bytes; expected at least 8 (the header length)");
  auto huge = file_bytes("{}", 0);
  huge[3] = 1;
  EXPECT_NE(message_of_parse(huge).find("declares a 16777218-byte header"), std::string::npos);
  EXPECT_NE(message_of_parse(file_bytes("{\"x\": ", 0)).find("malformed JSON header"), std::string::npos);
  EXPECT_NE(message_of_parse(file_bytes("[1,2]", 0)).find("not a JSON object"), std::string::npos);
  EXPECT_EQ(message_of_parse(file_bytes(R"({"x":{"dtype":"Q4","shape":[1],"data_offsets":[0,2]}})", 2)),
            "moekit::SafeTensors: 'test.safetensors' tensor 'x' has dtype 'Q4'; expected one of the format's: F64, "
            "F32, F16, BF16, F8_E5M2, F8_E4M3, I64, I32, I16, I8, U64, U32, U16, U8, BOOL");
  EXPECT_EQ(message_of_parse(file_bytes(R"({"x":{"dtype":"F64","shape":[2],"data_offsets":[0,8]}})", 8)),
            "moekit::SafeTensors: 'test.safetensors' tensor 'x' has 8 bytes; expected 16 for F64 [2]");
  EXPECT_NE(message_of_parse(file_bytes(R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 4))
                .find("expected a range inside the 4 data bytes"),
            std::string::npos);
  EXPECT_NE(message_of_parse(file_bytes(R"({"x":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8))
                .find("expected a non-negative integer"),
            std::string::npos);
  EXPECT_NE(message_of_parse(file_bytes(R"({"x":{"dtype":"F32","shape":[2]}})", 8)).find("has no 'data_offsets'"),
            std::string::npos);
  EXPECT_NE(message_of_parse(file_bytes(R"({"__metadata__":{"a":1}})", 0)).find("'a' that is not a string"),
            std::string::npos);
  EXPECT_THROW(io::SafeTensors::read("/nonexistent/file.safetensors"), error);
}

/// The bytes of a small file the library writes: two tensors and metadata.
std::vector<char> library_file() {
  io::SafeTensors file;
  file.metadata()["format"] = "moekit";
  const std::vector<float> a{1.5f, -2.0f, 3.25f, 0.0f, 7.0f, 8.0f};
  const std::vector<double> b{4.0, 5.0};
  file.add<float>("a", {2, 3}, a);
  file.add<double>("b", {2}, b);
  const auto path = std::filesystem::temp_directory_path() / "moekit_library_file.safetensors";
  file.write(path);
  std::ifstream in(path, std::ios::binary);
  std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::filesystem::remove(path);
  return bytes;
}

std::uint64_t header_length(const std::vector<char>& bytes) {
  std::uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  return n;
}

void set_header_length(std::vector<char>& bytes, std::uint64_t n) { std::memcpy(bytes.data(), &n, 8); }

// A header length short of the real one (into its trailing spaces), or a byte inserted into the
// header, shifts every tensor by a few bytes; the tensors then no longer cover the data section.
// BF16 and F16 read exactly into float and double, and are written rounded to nearest even;
// tensors of other dtypes are read (a model's file holds them) but give no values.
TEST(SafeTensors, ConvertsHalfPrecisionAndReadsEveryDtype) {
  const auto file = io::SafeTensors::read(std::filesystem::path(MOEKIT_CORPUS_DIR) / "half_and_bytes.safetensors");
  EXPECT_EQ(file.values<double>("w_bf16"), (std::vector<double>{1, -1, 2, 0x1p-133, INFINITY, 0}));
  EXPECT_EQ(file.values<float>("w_f16"), (std::vector<float>{1, 0x1p-24f, -65504}));
  EXPECT_EQ(file.info("blocks_u8").dtype, io::DType::u8);
  EXPECT_EQ(file.bytes("blocks_u8").size(), 4u);
  EXPECT_EQ(message_of([&] { file.values<float>("blocks_u8"); }),
            "moekit::SafeTensors: '" + (std::filesystem::path(MOEKIT_CORPUS_DIR) / "half_and_bytes.safetensors").string() +
                "' tensor 'blocks_u8' has dtype U8; expected F32, F64, BF16 or F16");

  // Rounding: to nearest, ties to even, overflow to infinity, subnormals kept.
  const std::vector<double> in{1.0 + 0x1p-8, 1.0 + 0x1p-8 + 0x1p-20, 1.0 + 3 * 0x1p-8, 65519.0, 65520.0, 0x1p-25 * 3, -0.0};
  io::SafeTensors out;
  out.add_as("b", {7}, std::span<const double>(in), io::DType::bf16);
  out.add_as("h", {7}, std::span<const double>(in), io::DType::f16);
  const auto back = io::SafeTensors::parse(bytes_of(out), "rounded");
  EXPECT_EQ(back.values<double>("b"), (std::vector<double>{1.0, 1.0 + 0x1p-7, 1.0 + 4 * 0x1p-8, 65536.0, 65536.0,
                                                            0x1p-25 * 3, -0.0}));
  EXPECT_EQ(back.values<double>("h"), (std::vector<double>{1.0 + 0x1p-8, 1.0 + 0x1p-8, 1.0 + 3 * 0x1p-8, 65504.0,
                                                            INFINITY, 0x1p-23, -0.0}));
}

// A partial read takes the bytes of the tensors asked for and lists the others without values.
TEST(SafeTensors, APartialReadReadsOnlyTheTensorsAskedFor) {
  io::SafeTensors file;
  const std::vector<float> a{1, 2, 3}, b{4, 5};
  file.add("a", {3}, std::span<const float>(a));
  file.add("b", {2}, std::span<const float>(b));
  const auto path = std::filesystem::temp_directory_path() / ("moekit_partial_" + std::to_string(::getpid()));
  file.write(path);
  const auto part = io::SafeTensors::read(path, [](std::string_view name) { return name == "b"; });
  EXPECT_EQ(part.names(), (std::vector<std::string>{"a", "b"}));
  EXPECT_EQ(part.values<float>("b"), b);
  EXPECT_EQ(part.info("a").shape, std::vector<Index>{3});
  EXPECT_EQ(message_of([&] { part.values<float>("a"); }),
            "moekit::SafeTensors: '" + path.string() +
                "' tensor 'a' was not read (a partial read reads only the tensors asked for)");
  EXPECT_NE(message_of([&] { part.write(path); }).find("cannot be written"), std::string::npos);
  EXPECT_EQ(io::SafeTensors::read(path).values<float>("a"), a);  // the file is as it was
  std::filesystem::remove(path);
}

TEST(SafeTensors, RefusesAShiftedDataSection) {
  auto bytes = library_file();
  ASSERT_EQ(bytes[8 + header_length(bytes) - 1], ' ') << "the written header ends in padding";
  auto short_header = bytes;
  set_header_length(short_header, header_length(bytes) - 1);
  EXPECT_NE(message_of_parse(short_header).find("after the last tensor"), std::string::npos)
      << message_of_parse(short_header);
  auto inserted = bytes;
  inserted.insert(inserted.begin() + 9, ' ');  // after the opening brace: the JSON still parses
  EXPECT_NE(message_of_parse(inserted).find("after the last tensor"), std::string::npos) << message_of_parse(inserted);
}

TEST(SafeTensors, RefusesRangesThatOverlapLeaveGapsOrLeaveBytesOver) {
  EXPECT_NE(message_of_parse(file_bytes(R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                                        R"("y":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})",
                                        4))
                .find("has data_offsets [0,4]; expected it to begin at byte 4"),
            std::string::npos);
  EXPECT_NE(message_of_parse(file_bytes(R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8))
                .find("tensor 'x' has data_offsets [4,8]; expected it to begin at byte 0"),
            std::string::npos);
  EXPECT_NE(message_of_parse(file_bytes(R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", 6))
                .find("2 bytes after the last tensor"),
            std::string::npos);
}

TEST(SafeTensors, RefusesDuplicateNamesAndFields) {
  EXPECT_NE(message_of_parse(file_bytes(R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                                        R"("x":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                                        8))
                .find("duplicate member 'x'"),
            std::string::npos);
  EXPECT_NE(message_of_parse(file_bytes(R"({"x":{"dtype":"F32","dtype":"F64","shape":[1],"data_offsets":[0,4]}})", 4))
                .find("duplicate member 'dtype'"),
            std::string::npos);
}

TEST(SafeTensors, RefusesShapesWhoseSizeOverflows) {
  const auto wraps_to_one = file_bytes(R"({"x":{"dtype":"F32","shape":[274177,67280421310721],"data_offsets":[0,4]}})", 4);
  EXPECT_NE(message_of_parse(wraps_to_one).find("tensor 'x' has shape [274177,67280421310721], whose size overflows"),
            std::string::npos)
      << message_of_parse(wraps_to_one);
  EXPECT_NE(message_of_parse(file_bytes(R"({"x":{"dtype":"F64","shape":[2147483648,2147483648],"data_offsets":[0,0]}})", 0))
                .find("whose size overflows"),
            std::string::npos);
}

TEST(SafeTensors, RefusesBadEscapesAndControlCharactersAsItsOwnError) {
  EXPECT_NE(message_of_parse(file_bytes(R"({"\uZZZZ":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", 4))
                .find("malformed JSON header"),
            std::string::npos);
  EXPECT_NE(message_of_parse(file_bytes(R"({"\q":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", 4))
                .find("malformed JSON header"),
            std::string::npos);
  EXPECT_NE(message_of_parse(file_bytes("{\"a\tb\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4))
                .find("malformed JSON header"),
            std::string::npos);
}

TEST(SafeTensors, RefusesWhatIsNotARegularFile) {
  const auto folder = std::filesystem::temp_directory_path() / "moekit_a_folder.safetensors";
  std::filesystem::create_directories(folder);
  try {
    io::SafeTensors::read(folder);
    ADD_FAILURE() << "a folder was read";
  } catch (const error& e) {
    EXPECT_NE(std::string(e.what()).find("is not a regular file"), std::string::npos) << e.what();
  }
  std::filesystem::remove(folder);
  if (std::filesystem::exists("/dev/zero")) {
    EXPECT_THROW(io::SafeTensors::read("/dev/zero"), error);  // would read for ever
  }
}

/// Every file in `folder`, by name.
std::vector<std::string> files_in(const std::filesystem::path& folder) {
  std::vector<std::string> names;
  for (const auto& entry : std::filesystem::directory_iterator(folder)) names.push_back(entry.path().filename());
  std::sort(names.begin(), names.end());
  return names;
}

std::filesystem::path fresh_folder(const std::string& name) {
  const auto folder = std::filesystem::temp_directory_path() / name;
  std::filesystem::remove_all(folder);
  std::filesystem::create_directories(folder);
  return folder;
}

TEST(SafeTensors, AFailedSaveSaysWhyAndLeavesNothingBehind) {
  const auto folder = fresh_folder("moekit_failed_save");
  std::filesystem::create_directories(folder / "target.safetensors");  // a folder where the file would go
  io::SafeTensors file;
  file.add<float>("a", {1}, std::vector<float>{1.0f});
  try {
    file.write(folder / "target.safetensors");
    ADD_FAILURE() << "saved over a folder";
  } catch (const error& e) {
    EXPECT_NE(std::string(e.what()).find("Is a directory"), std::string::npos) << e.what();
  }
  EXPECT_EQ(files_in(folder), std::vector<std::string>{"target.safetensors"});
  try {
    file.write(folder / "no_such_folder" / "x.safetensors");
    ADD_FAILURE() << "saved into a missing folder";
  } catch (const error& e) {
    EXPECT_NE(std::string(e.what()).find("No such file or directory"), std::string::npos) << e.what();
  }
  std::filesystem::remove_all(folder);
}

TEST(SafeTensors, SavesToOnePathFromManyThreadsAtOnce) {
  const auto folder = fresh_folder("moekit_concurrent_save");
  const auto path = folder / "shared.safetensors";
  std::atomic<int> failures{0};
  std::vector<std::thread> savers;
  for (int s = 0; s < 4; ++s)
    savers.emplace_back([&, s] {
      io::SafeTensors file;
      file.add<float>("a", {1}, std::vector<float>{float(s)});
      for (int i = 0; i < 25; ++i) {
        try {
          file.write(path);
        } catch (const error&) {
          ++failures;
        }
      }
    });
  for (auto& saver : savers) saver.join();
  EXPECT_EQ(failures, 0);
  EXPECT_EQ(files_in(folder), std::vector<std::string>{"shared.safetensors"});
  const float a = io::SafeTensors::read(path).values<float>("a").front();
  EXPECT_TRUE(a == 0.0f || a == 1.0f || a == 2.0f || a == 3.0f);
  std::filesystem::remove_all(folder);
}

TEST(SafeTensors, SavingKeepsTheTargetsPermissionsAndWritesThroughASymlink) {
  namespace fs = std::filesystem;
  const auto folder = fresh_folder("moekit_save_target");
  io::SafeTensors file;
  file.add<float>("a", {1}, std::vector<float>{2.0f});
  const auto read_only = folder / "read_only.safetensors";
  file.write(read_only);
  fs::permissions(read_only, fs::perms::owner_read | fs::perms::group_read);
  file.write(read_only);
  EXPECT_EQ(fs::status(read_only).permissions() & fs::perms::all, fs::perms::owner_read | fs::perms::group_read);

  const auto target = folder / "real.safetensors", link = folder / "link.safetensors";
  file.write(target);
  fs::create_symlink("real.safetensors", link);
  io::SafeTensors other;
  other.add<float>("a", {1}, std::vector<float>{5.0f});
  other.write(link);
  EXPECT_TRUE(fs::is_symlink(link)) << "the link was replaced by a file";
  EXPECT_EQ(io::SafeTensors::read(target).values<float>("a").front(), 5.0f);
  fs::permissions(read_only, fs::perms::owner_all);
  fs::remove_all(folder);
}

}  // namespace
}  // namespace moekit::test
