// Strict UTF-8 (RFC 3629), the one check behind kids and the JSON text of logs.
#include "hsm/common/utf8.hpp"

#include <catch2/catch.hpp>
#include <string>

using hsm::common::is_valid_utf8;
using hsm::common::utf8_sequence_length;

TEST_CASE("UTF-8: well-formed sequences of every length", "[utf8]") {
  CHECK(is_valid_utf8(""));
  CHECK(is_valid_utf8("plain ascii"));
  CHECK(is_valid_utf8("h\xc3\xa9llo \xe2\x82\xac \xf0\x9f\x94\x91"));  // é € 🔑
  CHECK(is_valid_utf8("\xf4\x8f\xbf\xbf"));                            // U+10FFFF
  const std::string text = "a\xc3\xa9\xe2\x82\xac\xf0\x9f\x94\x91";
  CHECK(utf8_sequence_length(text, 0) == 1);
  CHECK(utf8_sequence_length(text, 1) == 2);
  CHECK(utf8_sequence_length(text, 3) == 3);
  CHECK(utf8_sequence_length(text, 6) == 4);
}

TEST_CASE("UTF-8: overlong forms, surrogates, out of range and truncation are invalid", "[utf8]") {
  CHECK_FALSE(is_valid_utf8("\xff"));
  CHECK_FALSE(is_valid_utf8("\x80"));              // a lone continuation byte
  CHECK_FALSE(is_valid_utf8("\xc3"));              // truncated
  CHECK_FALSE(is_valid_utf8("\xe2\x82"));          // truncated
  CHECK_FALSE(is_valid_utf8("\xc0\xaf"));          // overlong '/'
  CHECK_FALSE(is_valid_utf8("\xe0\x80\xaf"));      // overlong
  CHECK_FALSE(is_valid_utf8("\xf0\x80\x80\xaf"));  // overlong
  CHECK_FALSE(is_valid_utf8("\xed\xa0\x80"));      // U+D800, a surrogate
  CHECK_FALSE(is_valid_utf8("\xf4\x90\x80\x80"));  // above U+10FFFF
  CHECK_FALSE(is_valid_utf8("ok\xc3("));           // a continuation byte missing
  CHECK(utf8_sequence_length("\xc3\xa9", 1) == 0);
}
