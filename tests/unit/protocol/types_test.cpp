// Wire names of the enumerations and the kid rules.
#include "hsm/protocol/types.hpp"

#include <catch2/catch.hpp>
#include <set>
#include <string>

#include "hsm/protocol/codec.hpp"

using namespace hsm::protocol;

TEST_CASE("every error code has a unique wire name that parses back", "[types]") {
  const auto& codes = all_error_codes();
  REQUIRE(codes.size() == 15);
  std::set<std::string_view> names;
  for (const ErrorCode code : codes) {
    const std::string_view name = to_string(code);
    INFO(name);
    CHECK(name != "?");
    CHECK(names.insert(name).second);
    CHECK(parse_error_code(name) == code);
  }
  CHECK(to_string(ErrorCode::kInvalidParams) == "invalid_params");
  CHECK(to_string(ErrorCode::kHsmUnavailable) == "hsm_unavailable");
  CHECK(to_string(ErrorCode::kDeadlineExceeded) == "deadline_exceeded");
  CHECK(to_string(ErrorCode::kAuditUnavailable) == "audit_unavailable");
  CHECK(names.count("already_exists") == 1);
  CHECK_FALSE(parse_error_code("Invalid_Params").has_value());
  CHECK_FALSE(parse_error_code("").has_value());
  CHECK_FALSE(parse_error_code("timeout").has_value());
}

TEST_CASE("every method has a unique wire name that parses back", "[types]") {
  const auto& methods = all_methods();
  REQUIRE(methods.size() == 11);
  std::set<std::string_view> names;
  for (const Method method : methods) {
    const std::string_view name = to_string(method);
    INFO(name);
    CHECK(name != "?");
    CHECK(names.insert(name).second);
    CHECK(parse_method(name) == method);
  }
  const std::set<std::string_view> expected = {
      "capabilities",   "health",    "generate_key", "import_key", "sign",      "verify",
      "get_public_key", "list_keys", "delete_key",   "get_jwks",   "sign_batch"};
  CHECK(names == expected);
  CHECK_FALSE(parse_method("Sign").has_value());
  CHECK_FALSE(parse_method("sign ").has_value());
}

TEST_CASE("signature formats and frame error reasons have wire names", "[types]") {
  CHECK(to_string(SignatureFormat::kRaw) == "raw");
  CHECK(to_string(SignatureFormat::kDer) == "der");
  CHECK(parse_signature_format("raw") == SignatureFormat::kRaw);
  CHECK(parse_signature_format("der") == SignatureFormat::kDer);
  CHECK_FALSE(parse_signature_format("DER").has_value());
  CHECK_FALSE(parse_signature_format("pem").has_value());
  CHECK(to_string(FrameErrorReason::kMalformed) == "malformed");
  CHECK(to_string(FrameErrorReason::kTooLarge) == "too_large");
  CHECK(to_string(FrameErrorReason::kLimitExceeded) == "limit_exceeded");
}

TEST_CASE("kid_problem accepts UTF-8 of 1 to 255 bytes without NUL", "[types][kid]") {
  CHECK_FALSE(kid_problem("a").has_value());
  CHECK_FALSE(kid_problem("signing-key/2024.01").has_value());
  CHECK_FALSE(kid_problem(std::string(255, 'k')).has_value());
  CHECK_FALSE(kid_problem("cl\xC3\xA9").has_value());        // é, 2 bytes
  CHECK_FALSE(kid_problem("\xE2\x82\xAC").has_value());      // €, 3 bytes
  CHECK_FALSE(kid_problem("\xF0\x9F\x94\x91").has_value());  // U+1F511, 4 bytes
  CHECK_FALSE(kid_problem("\xF4\x8F\xBF\xBF").has_value());  // U+10FFFF

  CHECK(kid_problem("").value_or("") == "must not be empty");
  CHECK_THAT(kid_problem(std::string(256, 'k')).value_or(""), Catch::Contains("255"));
  CHECK_THAT(kid_problem(std::string("a\0b", 3)).value_or(""), Catch::Contains("NUL"));
  const char* const invalid_utf8[] = {
      "\xC3",              // truncated sequence
      "\x80",              // lone continuation byte
      "\xC0\xAF",          // overlong '/'
      "\xE0\x80\xAF",      // overlong, 3 bytes
      "\xED\xA0\x80",      // UTF-16 surrogate U+D800
      "\xF4\x90\x80\x80",  // above U+10FFFF
      "\xFF",              // never valid
      "ab\xE2\x82",        // truncated at the end
  };
  for (const char* kid : invalid_utf8) {
    INFO(kid);
    CHECK_THAT(kid_problem(kid).value_or(""), Catch::Contains("UTF-8"));
  }
}
