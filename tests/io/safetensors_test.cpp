// Safetensors: round trips, the fixtures' headers, and malformed files refused by name.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>

#include <moekit/moekit.hpp>

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

std::string message_of_parse(const std::vector<char>& bytes) {
  try {
    io::SafeTensors::parse(bytes, "test.safetensors");
  } catch (const error& e) {
    return e.what();
  }
  return "(no error)";
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
  EXPECT_EQ(message_of_parse(file_bytes(R"({"x":{"dtype":"BF16","shape":[1],"data_offsets":[0,2]}})", 2)),
            "moekit::SafeTensors: 'test.safetensors' tensor 'x' has dtype 'BF16'; expected F32, F64, I32 or I64");
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

}  // namespace
}  // namespace moekit::test
