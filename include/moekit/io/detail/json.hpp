#pragma once
// Just enough JSON for a safetensors header: objects, arrays, strings, numbers and the literals,
// strictly by the grammar (RFC 8259), so that any valid header parses and nothing else does: no
// duplicate member names, no unknown escapes, no raw control characters, no malformed numbers.
// Errors carry the byte offset.
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include <moekit/core/error.hpp>

namespace moekit::io::detail {

struct Json {
  enum class Kind { null, boolean, number, string, array, object } kind = Kind::null;
  std::string text;  // string value, or the number as written
  std::vector<Json> items;
  std::vector<std::pair<std::string, Json>> members;  // in file order
};

class JsonParser {
 public:
  /// `reader` and `document` name what failed in messages ("moekit::SafeTensors", "JSON header").
  JsonParser(std::string_view text, std::string_view where, std::string_view reader = "moekit::SafeTensors",
             std::string_view document = "JSON header")
      : text_(text), where_(where), reader_(reader), document_(document) {}

  Json parse() {
    check_utf8();
    Json value = parse_value(0);
    skip_space();
    if (pos_ != text_.size()) fail("unexpected text after the header object");
    return value;
  }

 private:
  [[noreturn]] void fail(std::string_view what) const {
    moekit::fail(reader_, ": '", where_, "' has a malformed ", document_, " at byte ", pos_, ": ", what);
  }
  void skip_space() {
    while (pos_ < text_.size() && (text_[pos_] == ' ' || text_[pos_] == '\n' ||
                                   text_[pos_] == '\r' || text_[pos_] == '\t'))
      ++pos_;
  }
  char peek() {
    skip_space();
    if (pos_ >= text_.size()) fail("unexpected end of header");
    return text_[pos_];
  }
  void expect(char c) {
    if (peek() != c) fail(std::string("expected '") + c + "'");
    ++pos_;
  }

  Json parse_value(int depth) {
    if (depth > 64) fail("nesting deeper than 64");
    Json v;
    const char c = peek();
    if (c == '{') {
      v.kind = Json::Kind::object;
      ++pos_;
      if (peek() == '}') return ++pos_, v;
      for (;;) {
        if (peek() != '"') fail("expected a member name");
        const std::size_t at = pos_;
        std::string key = parse_string();
        for (const auto& member : v.members)
          if (member.first == key) {
            pos_ = at;
            fail("duplicate member '" + key + "'");
          }
        expect(':');
        v.members.emplace_back(std::move(key), parse_value(depth + 1));
        if (peek() == ',') { ++pos_; continue; }
        expect('}');
        return v;
      }
    }
    if (c == '[') {
      v.kind = Json::Kind::array;
      ++pos_;
      if (peek() == ']') return ++pos_, v;
      for (;;) {
        v.items.push_back(parse_value(depth + 1));
        if (peek() == ',') { ++pos_; continue; }
        expect(']');
        return v;
      }
    }
    if (c == '"') {
      v.kind = Json::Kind::string;
      v.text = parse_string();
      return v;
    }
    if (c == '-' || is_digit(c)) {
      v.kind = Json::Kind::number;
      v.text = parse_number();
      return v;
    }
    for (auto [word, kind] : {std::pair{std::string_view("true"), Json::Kind::boolean},
                              std::pair{std::string_view("false"), Json::Kind::boolean},
                              std::pair{std::string_view("null"), Json::Kind::null}}) {
      if (text_.substr(pos_, word.size()) == word) {
        pos_ += word.size();
        v.kind = kind;
        v.text = word;
        return v;
      }
    }
    fail("expected a value");
  }

  static bool is_digit(char c) { return c >= '0' && c <= '9'; }

  /// The header is UTF-8, as JSON text must be: no overlong forms, surrogates or code points past
  /// U+10FFFF.
  void check_utf8() {
    for (pos_ = 0; pos_ < text_.size();) {
      const auto lead = static_cast<unsigned char>(text_[pos_]);
      const int length = lead < 0x80 ? 1 : (lead >> 5) == 0x6 ? 2 : (lead >> 4) == 0xE ? 3 : (lead >> 3) == 0x1E ? 4 : 0;
      if (length == 0 || pos_ + std::size_t(length) > text_.size()) fail("invalid UTF-8");
      unsigned code = length == 1 ? lead : lead & (0x7F >> length);
      for (int i = 1; i < length; ++i) {
        const auto next = static_cast<unsigned char>(text_[pos_ + std::size_t(i)]);
        if ((next >> 6) != 0x2) fail("invalid UTF-8");
        code = (code << 6) | (next & 0x3F);
      }
      const unsigned least[] = {0, 0, 0x80, 0x800, 0x10000};
      if (code < least[length] || code > 0x10FFFF || (code >= 0xD800 && code <= 0xDFFF)) fail("invalid UTF-8");
      pos_ += std::size_t(length);
    }
    pos_ = 0;
  }

  /// -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?, as written.
  std::string parse_number() {
    const std::size_t begin = pos_;
    auto digits = [&] {
      const std::size_t first = pos_;
      while (pos_ < text_.size() && is_digit(text_[pos_])) ++pos_;
      if (pos_ == first) fail("expected a digit");
    };
    if (text_[pos_] == '-') ++pos_;
    if (pos_ < text_.size() && text_[pos_] == '0')
      ++pos_;
    else
      digits();
    if (pos_ < text_.size() && text_[pos_] == '.') {
      ++pos_;
      digits();
    }
    if (pos_ < text_.size() && (text_[pos_] == 'e' || text_[pos_] == 'E')) {
      ++pos_;
      if (pos_ < text_.size() && (text_[pos_] == '+' || text_[pos_] == '-')) ++pos_;
      digits();
    }
    return std::string(text_.substr(begin, pos_ - begin));
  }

  /// The four hex digits of a \u escape.
  unsigned hex4() {
    if (pos_ + 4 > text_.size()) fail("short \\u escape");
    unsigned code = 0;
    for (int i = 0; i < 4; ++i) {
      const char h = text_[pos_++];
      code <<= 4;
      if (is_digit(h)) code |= unsigned(h - '0');
      else if (h >= 'a' && h <= 'f') code |= unsigned(h - 'a' + 10);
      else if (h >= 'A' && h <= 'F') code |= unsigned(h - 'A' + 10);
      else fail("expected four hex digits after \\u");
    }
    return code;
  }

  static void append_utf8(std::string& out, unsigned code) {
    if (code < 0x80) {
      out += static_cast<char>(code);
    } else if (code < 0x800) {
      out += static_cast<char>(0xC0 | (code >> 6));
      out += static_cast<char>(0x80 | (code & 0x3F));
    } else if (code < 0x10000) {
      out += static_cast<char>(0xE0 | (code >> 12));
      out += static_cast<char>(0x80 | ((code >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (code & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (code >> 18));
      out += static_cast<char>(0x80 | ((code >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((code >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (code & 0x3F));
    }
  }

  std::string parse_string() {
    expect('"');
    std::string out;
    while (pos_ < text_.size() && text_[pos_] != '"') {
      char c = text_[pos_++];
      if (static_cast<unsigned char>(c) < 0x20) fail("a control character inside a string");
      if (c != '\\') {
        out += c;
        continue;
      }
      if (pos_ >= text_.size()) break;
      c = text_[pos_++];
      switch (c) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'n': out += '\n'; break;
        case 't': out += '\t'; break;
        case 'r': out += '\r'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'u': {
          unsigned code = hex4();
          if (code >= 0xDC00 && code <= 0xDFFF) fail("a lone low surrogate in a \\u escape");
          if (code >= 0xD800 && code <= 0xDBFF) {  // a pair: \uD8xx\uDCxx
            if (text_.substr(pos_, 2) != "\\u") fail("a high surrogate without its low one");
            pos_ += 2;
            const unsigned low = hex4();
            if (low < 0xDC00 || low > 0xDFFF) fail("a high surrogate without its low one");
            code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00);
          }
          append_utf8(out, code);
          break;
        }
        default: fail(std::string("an unknown escape \\") + c);
      }
    }
    if (pos_ >= text_.size()) fail("unterminated string");
    ++pos_;
    return out;
  }

  std::string_view text_;
  std::string_view where_, reader_, document_;
  std::size_t pos_ = 0;
};

inline std::string json_quote(std::string_view s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      static constexpr char hex[] = "0123456789abcdef";
      out += "\\u00";
      out += hex[(c >> 4) & 0xF];
      out += hex[c & 0xF];
    } else {
      out += c;
    }
  }
  return out + "\"";
}

}  // namespace moekit::io::detail
