// base64url without padding (RFC 7515), strict on decode: one text per byte string.
#include "hsm/common/base64url.hpp"

#include <catch2/catch.hpp>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

using hsm::common::base64url_decode;
using hsm::common::base64url_encode;
using Bytes = std::vector<std::uint8_t>;

TEST_CASE("base64url: RFC 4648 vectors in the URL alphabet without padding", "[base64url]") {
  const std::vector<std::pair<std::string, std::string>> vectors{
      {"", ""},           {"f", "Zg"},          {"fo", "Zm8"},         {"foo", "Zm9v"},
      {"foob", "Zm9vYg"}, {"fooba", "Zm9vYmE"}, {"foobar", "Zm9vYmFy"}};
  for (const auto& [plain, encoded] : vectors) {
    const Bytes bytes(plain.begin(), plain.end());
    CHECK(base64url_encode(bytes) == encoded);
    CHECK(base64url_decode(encoded) == bytes);
  }
  CHECK(base64url_encode(Bytes{0xFB, 0xFF}) == "-_8");
  CHECK(base64url_encode(Bytes{0x03, 0xE0, 0x3F}) == "A-A_");
  CHECK(base64url_decode("-_-_") == Bytes{0xfb, 0xff, 0xbf});
}

TEST_CASE("base64url: padding, foreign characters, bad lengths and stray bits are refused",
          "[base64url]") {
  CHECK_THROWS_AS(base64url_decode("Zm8="), std::invalid_argument);   // padding
  CHECK_THROWS_AS(base64url_decode("Zm9v+"), std::invalid_argument);  // '+' is base64, not url
  CHECK_THROWS_AS(base64url_decode("Zm 8"), std::invalid_argument);   // whitespace
  CHECK_THROWS_AS(base64url_decode("Z"), std::invalid_argument);      // 1 more than 4k
  CHECK_THROWS_AS(base64url_decode("Zh"), std::invalid_argument);     // "Zg" with a stray bit
}
