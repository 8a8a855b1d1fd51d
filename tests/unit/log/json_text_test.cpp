// append_json_string: every log and audit line is built with it, so whatever bytes a caller sends
// (a kid, a message naming one) must come out as one valid JSON string literal in valid UTF-8,
// on one line, and valid UTF-8 must come out unchanged.
#include "log/json_text.hpp"

#include <array>
#include <catch2/catch.hpp>
#include <cstdint>
#include <optional>
#include <random>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

using hsm::agent::append_json_string;

namespace {

const std::string kReplacement = "\xEF\xBF\xBD";  // U+FFFD in UTF-8

std::string literal(std::string_view text) {
  std::string out;
  append_json_string(out, text);
  return out;
}

std::string repeat(const std::string& text, int times) {
  std::string out;
  for (int i = 0; i < times; ++i) out += text;
  return out;
}

// Well-formed UTF-8 per the Unicode standard's table 3-7, written as a table of byte ranges so
// that it shares nothing with the code under test.
bool well_formed_utf8(std::string_view s) {
  struct Range {
    std::uint8_t lo, hi;
  };
  struct Row {
    Range lead;
    std::array<Range, 3> next;
    std::size_t continuation_bytes;
  };
  static constexpr std::array<Row, 8> kRows = {{
      {{0xC2, 0xDF}, {{{0x80, 0xBF}, {0, 0}, {0, 0}}}, 1},
      {{0xE0, 0xE0}, {{{0xA0, 0xBF}, {0x80, 0xBF}, {0, 0}}}, 2},
      {{0xE1, 0xEC}, {{{0x80, 0xBF}, {0x80, 0xBF}, {0, 0}}}, 2},
      {{0xED, 0xED}, {{{0x80, 0x9F}, {0x80, 0xBF}, {0, 0}}}, 2},
      {{0xEE, 0xEF}, {{{0x80, 0xBF}, {0x80, 0xBF}, {0, 0}}}, 2},
      {{0xF0, 0xF0}, {{{0x90, 0xBF}, {0x80, 0xBF}, {0x80, 0xBF}}}, 3},
      {{0xF1, 0xF3}, {{{0x80, 0xBF}, {0x80, 0xBF}, {0x80, 0xBF}}}, 3},
      {{0xF4, 0xF4}, {{{0x80, 0x8F}, {0x80, 0xBF}, {0x80, 0xBF}}}, 3},
  }};
  std::size_t i = 0;
  while (i < s.size()) {
    const auto lead = static_cast<std::uint8_t>(s[i]);
    if (lead <= 0x7F) {
      ++i;
      continue;
    }
    const Row* row = nullptr;
    for (const auto& candidate : kRows) {
      if (lead >= candidate.lead.lo && lead <= candidate.lead.hi) row = &candidate;
    }
    if (row == nullptr || i + row->continuation_bytes >= s.size()) return false;
    for (std::size_t k = 0; k < row->continuation_bytes; ++k) {
      const auto byte = static_cast<std::uint8_t>(s[i + 1 + k]);
      if (byte < row->next.at(k).lo || byte > row->next.at(k).hi) return false;
    }
    i += 1 + row->continuation_bytes;
  }
  return true;
}

std::string utf8(char32_t cp) {
  std::string out;
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
  return out;
}

// Decodes one JSON string literal (RFC 8259 section 7) and nothing after it; nullopt when it is
// not one (no quotes, a raw control character, an unescaped quote inside, a bad escape).
std::optional<std::string> decode_literal(std::string_view text) {
  if (text.size() < 2 || text.front() != '"' || text.back() != '"') return std::nullopt;
  std::string out;
  for (std::size_t i = 1; i + 1 < text.size(); ++i) {
    const auto c = static_cast<unsigned char>(text[i]);
    if (c < 0x20 || c == '"') return std::nullopt;
    if (c != '\\') {
      out.push_back(static_cast<char>(c));
      continue;
    }
    if (++i + 1 >= text.size()) return std::nullopt;
    switch (text[i]) {
      case '"':
        out.push_back('"');
        break;
      case '\\':
        out.push_back('\\');
        break;
      case '/':
        out.push_back('/');
        break;
      case 'b':
        out.push_back('\b');
        break;
      case 'f':
        out.push_back('\f');
        break;
      case 'n':
        out.push_back('\n');
        break;
      case 'r':
        out.push_back('\r');
        break;
      case 't':
        out.push_back('\t');
        break;
      case 'u': {
        if (i + 4 >= text.size() - 1) return std::nullopt;  // four digits before the quote
        char32_t cp = 0;
        for (std::size_t k = 1; k <= 4; ++k) {
          const char h = text[i + k];
          cp <<= 4;
          if (h >= '0' && h <= '9') {
            cp |= static_cast<char32_t>(h - '0');
          } else if (h >= 'a' && h <= 'f') {
            cp |= static_cast<char32_t>(h - 'a' + 10);
          } else if (h >= 'A' && h <= 'F') {
            cp |= static_cast<char32_t>(h - 'A' + 10);
          } else {
            return std::nullopt;
          }
        }
        if (cp >= 0xD800 && cp <= 0xDFFF) return std::nullopt;  // never emitted: no pairs needed
        out += utf8(cp);
        i += 4;
        break;
      }
      default:
        return std::nullopt;
    }
  }
  return out;
}

}  // namespace

TEST_CASE("the test's own UTF-8 check agrees with the standard's examples", "[log][json]") {
  CHECK(well_formed_utf8(""));
  CHECK(well_formed_utf8("plain"));
  CHECK(well_formed_utf8("\xC3\xA9\xE2\x82\xAC\xF0\x9F\x98\x80"));
  CHECK_FALSE(well_formed_utf8("\xC0\x80"));
  CHECK_FALSE(well_formed_utf8("\xED\xA0\x80"));
  CHECK_FALSE(well_formed_utf8("\xF4\x90\x80\x80"));
  CHECK_FALSE(well_formed_utf8("\xE2\x82"));
  CHECK(decode_literal(R"("a\"b\\c\u0001")") == std::optional<std::string>("a\"b\\c\x01"));
  CHECK_FALSE(decode_literal(R"("a"b")"));
}

TEST_CASE("append_json_string appends one quoted literal after what is there", "[log][json]") {
  std::string out = R"({"msg":)";
  append_json_string(out, "hello world");
  CHECK(out == R"({"msg":"hello world")");
  CHECK(literal("") == R"("")");
}

TEST_CASE("quotes, backslashes and control characters are escaped", "[log][json]") {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"\"", R"("\"")"},
      {"\\", R"("\\")"},
      {"\n", R"("\n")"},
      {"\r", R"("\r")"},
      {"\t", R"("\t")"},
      {std::string(1, '\0'), R"("\u0000")"},
      {"\x01", R"("\u0001")"},
      {"\b", R"("\u0008")"},
      {"\f", R"("\u000c")"},
      {"\x1b[31m", R"("\u001b[31m")"},  // a terminal escape cannot colour the operator's screen
      {"\x1f", R"("\u001f")"},
      {"\x7f", R"("\u007f")"},
      {"/ ~", R"("/ ~")"},
      {"line one\nline two\r\n", R"("line one\nline two\r\n")"},
      {R"(kid" ,"result":"ok)", R"("kid\" ,\"result\":\"ok")"},  // no field injection
  };
  for (const auto& [input, expected] : cases) {
    INFO("input bytes: " << input.size());
    CHECK(literal(input) == expected);
  }
}

TEST_CASE("valid UTF-8 passes through unchanged", "[log][json]") {
  for (const char32_t cp :
       {U'\u0080', U'\u00E9', U'\u07FF', U'\u0800', U'\u20AC', U'\uD7FF', U'\uE000', U'\uFFFD',
        U'\uFFFF', U'\U00010000', U'\U0001F600', U'\U0010FFFF'}) {
    const std::string encoded = utf8(cp);
    INFO("code point " << static_cast<std::uint32_t>(cp));
    CHECK(literal(encoded) == "\"" + encoded + "\"");
  }
  CHECK(literal("caf\xC3\xA9 \xE2\x82\xAC 5") == "\"caf\xC3\xA9 \xE2\x82\xAC 5\"");
}

TEST_CASE("bytes that are not valid UTF-8 become U+FFFD, one per byte", "[log][json]") {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"\x80", kReplacement},  // lone continuation
      {"\xBF", kReplacement},
      {"\xC0\x80", repeat(kReplacement, 2)},          // overlong NUL
      {"\xC1\xBF", repeat(kReplacement, 2)},          // overlong
      {"\xE0\x80\x80", repeat(kReplacement, 3)},      // overlong 3-byte
      {"\xF0\x80\x80\x80", repeat(kReplacement, 4)},  // overlong 4-byte
      {"\xED\xA0\x80", repeat(kReplacement, 3)},      // UTF-16 surrogate
      {"\xED\xBF\xBF", repeat(kReplacement, 3)},
      {"\xF4\x90\x80\x80", repeat(kReplacement, 4)},  // above U+10FFFF
      {"\xF5\x80\x80\x80", repeat(kReplacement, 4)},
      {"\xF8\x88\x80\x80\x80", repeat(kReplacement, 5)},  // 5-byte form
      {"\xFE", kReplacement},
      {"\xFF", kReplacement},
      {"\xE2\x82", repeat(kReplacement, 2)},  // truncated at the end
      {"a\xE2\x82"
       "b",
       "a" + repeat(kReplacement, 2) + "b"},  // truncated in the middle
      {"\xC3\"", kReplacement + "\\\""},      // a bad lead never eats a quote
      {"\xC3\\", kReplacement + "\\\\"},
      {"\xE2\n", kReplacement + "\\n"},
      {"ok\xC3\xA9\xC3", "ok\xC3\xA9" + kReplacement},
  };
  for (const auto& [input, expected] : cases) {
    INFO("input bytes: " << input.size());
    CHECK(literal(input) == "\"" + expected + "\"");
  }
}

TEST_CASE("any bytes give one valid literal in valid UTF-8 on one line", "[log][json]") {
  std::mt19937 random(20240611);  // fixed seed: the same inputs every run
  // Biased towards the interesting bytes: controls, quote, backslash, UTF-8 leads and tails.
  const std::string interesting = std::string("\x00\x01\x1f\x7f\"\\\n\r\t /a", 12) +
                                  "\x80\xBF\xC0\xC1\xC2\xDF\xE0\xED\xEF\xF0\xF4\xF5\xFF";
  std::uniform_int_distribution<int> length(0, 48);
  std::uniform_int_distribution<int> coin(0, 1);
  std::uniform_int_distribution<int> any_byte(0, 255);
  std::uniform_int_distribution<std::size_t> pick(0, interesting.size() - 1);
  for (int round = 0; round < 3000; ++round) {
    std::string input;
    const int n = length(random);
    for (int i = 0; i < n; ++i) {
      input.push_back(coin(random) != 0 ? interesting[pick(random)]
                                        : static_cast<char>(any_byte(random)));
    }
    const std::string out = literal(input);
    INFO("round " << round);
    REQUIRE(well_formed_utf8(out));
    for (const char c : out) {
      REQUIRE(static_cast<unsigned char>(c) >= 0x20);
      REQUIRE(c != '\x7f');
    }
    const auto decoded = decode_literal(out);
    REQUIRE(decoded.has_value());
    REQUIRE(well_formed_utf8(*decoded));
    if (well_formed_utf8(input)) REQUIRE(*decoded == input);
  }
}

TEST_CASE("every code point round-trips through a JSON decoder", "[log][json]") {
  std::mt19937 random(7);
  std::uniform_int_distribution<std::uint32_t> plane(0, 0x10FFFF);
  std::uniform_int_distribution<std::uint32_t> low(0, 0x9F);  // controls, ASCII, C1
  for (int round = 0; round < 2000; ++round) {
    std::string input;
    for (int i = 0; i < 8; ++i) {
      std::uint32_t cp = (i % 2 == 0) ? low(random) : plane(random);
      if (cp >= 0xD800 && cp <= 0xDFFF) cp -= 0x800;  // surrogates are not characters
      input += utf8(static_cast<char32_t>(cp));
    }
    const auto decoded = decode_literal(literal(input));
    INFO("round " << round);
    REQUIRE(decoded.has_value());
    CHECK(*decoded == input);
  }
}
