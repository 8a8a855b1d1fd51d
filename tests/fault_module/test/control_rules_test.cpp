// The control-file parser, directly (no module, no token).
#include "control_rules.hpp"

#include <catch2/catch.hpp>
#include <string>

using hsm::fault::FunctionId;
using hsm::fault::parse_control_text;
using hsm::fault::parse_rv;
using hsm::fault::rv_name;
using hsm::fault::SessionFilter;

TEST_CASE("a rule line sets every field it names and the rest keep their defaults",
          "[control_rules]") {
  const auto parsed = parse_control_text(
      "C_Sign rv=CKR_DEVICE_ERROR count=5 delay_us=250 hang=1 session=first  # all of it\n");
  REQUIRE(parsed.errors.empty());
  REQUIRE(parsed.rules.size() == 1);
  const auto& rule = parsed.rules[0];
  CHECK(rule.function == FunctionId::C_Sign);
  CHECK(rule.rv == CKR_DEVICE_ERROR);
  CHECK(rule.count == 5u);
  CHECK(rule.delay == std::chrono::microseconds(250));
  CHECK(rule.hang);
  CHECK(rule.session.mode == SessionFilter::Mode::kFirst);
  CHECK(rule.identity ==
        "C_Sign rv=CKR_DEVICE_ERROR count=5 delay_us=250 hang=1 session=first  # all of it");
  CHECK(rule.line_number == 1);

  const auto plain = parse_control_text("C_Login rv=CKR_PIN_INCORRECT");
  REQUIRE(plain.rules.size() == 1);
  CHECK_FALSE(plain.rules[0].count.has_value());  // until the line is removed
  CHECK(plain.rules[0].delay.count() == 0);
  CHECK_FALSE(plain.rules[0].hang);
  CHECK(plain.rules[0].session.mode == SessionFilter::Mode::kAny);
}

TEST_CASE("comments, blank lines and surrounding spaces are skipped", "[control_rules]") {
  const auto parsed = parse_control_text(
      "# a comment\n\n   \t\n  C_Sign delay_ms=2   \r\n# C_Login rv=CKR_PIN_INCORRECT\n"
      "C_Verify rv=0x30 count=inf");
  REQUIRE(parsed.errors.empty());
  REQUIRE(parsed.rules.size() == 2);
  CHECK(parsed.rules[0].function == FunctionId::C_Sign);
  CHECK(parsed.rules[0].delay == std::chrono::milliseconds(2));
  CHECK(parsed.rules[0].identity == "C_Sign delay_ms=2");
  CHECK(parsed.rules[0].line_number == 4);
  CHECK(parsed.rules[1].rv == CKR_DEVICE_ERROR);
  CHECK_FALSE(parsed.rules[1].count.has_value());
  CHECK(parse_control_text("").rules.empty());
}

TEST_CASE("`*` matches every function but C_GetFunctionList and C_Finalize", "[control_rules]") {
  const auto parsed = parse_control_text("* rv=CKR_DEVICE_REMOVED");
  REQUIRE(parsed.rules.size() == 1);
  const auto& rule = parsed.rules[0];
  CHECK_FALSE(rule.function.has_value());
  CHECK(rule.matches(FunctionId::C_Sign));
  CHECK(rule.matches(FunctionId::C_Initialize));
  CHECK(rule.matches(FunctionId::C_GetSlotList));
  CHECK_FALSE(rule.matches(FunctionId::C_Finalize));
  CHECK_FALSE(rule.matches(FunctionId::C_GetFunctionList));

  const auto finalize = parse_control_text("C_Finalize rv=CKR_DEVICE_ERROR");
  REQUIRE(finalize.rules.size() == 1);
  CHECK(finalize.rules[0].matches(FunctionId::C_Finalize));
  CHECK_FALSE(finalize.rules[0].matches(FunctionId::C_Sign));
}

TEST_CASE("session= takes `first` or a handle", "[control_rules]") {
  const auto parsed = parse_control_text("C_Sign rv=CKR_SESSION_CLOSED session=0x1f");
  REQUIRE(parsed.rules.size() == 1);
  CHECK(parsed.rules[0].session.mode == SessionFilter::Mode::kHandle);
  CHECK(parsed.rules[0].session.handle == 0x1f);
}

TEST_CASE("bad lines are reported with their line number and skipped while good ones stay",
          "[control_rules]") {
  const char* const bad_lines[] = {
      "C_Sing rv=CKR_DEVICE_ERROR",               // unknown function
      "C_GetFunctionList rv=CKR_DEVICE_ERROR",    // never faulted
      "C_Sign rv=CKR_NOT_A_THING",                // unknown rv
      "C_Sign rv=0xZZ",                           // bad number
      "C_Sign rv=CKR_DEVICE_ERROR count=0",       // count must be positive
      "C_Sign rv=CKR_DEVICE_ERROR count=-1",      // not a number
      "C_Sign rv=CKR_DEVICE_ERROR colour=red",    // unknown key
      "C_Sign rv=CKR_DEVICE_ERROR rv=CKR_OK",     // duplicate key
      "C_Sign delay_ms=1 delay_us=5",             // two delays
      "C_Sign delay_ms=99999999999",              // beyond kMaxDelay
      "C_Sign hang=maybe",                        // bad bool
      "C_Sign rv=CKR_DEVICE_ERROR session=0",     // invalid handle
      "C_Sign rv=CKR_DEVICE_ERROR session=last",  // bad session
      "C_Sign count=3",                           // no fault
      "C_Sign hang=0",                            // no fault either
      "C_Sign CKR_DEVICE_ERROR",                  // not key=value
      "C_Sign =CKR_DEVICE_ERROR",                 // empty key
  };
  for (const char* bad : bad_lines) {
    INFO(bad);
    const auto parsed =
        parse_control_text(std::string("C_Login rv=CKR_PIN_INCORRECT\n") + bad + "\n");
    REQUIRE(parsed.errors.size() == 1);
    CHECK(parsed.errors[0].rfind("line 2: ", 0) == 0);
    REQUIRE(parsed.rules.size() == 1);
    CHECK(parsed.rules[0].function == FunctionId::C_Login);
  }
}

TEST_CASE("oversized input is bounded", "[control_rules]") {
  const std::string long_line = "C_Sign rv=CKR_DEVICE_ERROR # " + std::string(2000, 'x');
  const auto parsed = parse_control_text(long_line + "\nC_Login rv=CKR_PIN_INCORRECT\n");
  REQUIRE(parsed.errors.size() == 1);
  CHECK(parsed.rules.size() == 1);

  std::string huge;
  while (huge.size() <= hsm::fault::kMaxControlFileBytes) {
    huge += "C_Sign delay_us=1\n";
  }
  const auto cut = parse_control_text(huge);
  CHECK_FALSE(cut.errors.empty());
  CHECK(cut.rules.size() <= hsm::fault::kMaxControlFileBytes / 18);
}

TEST_CASE("return values are accepted by CKR_ name, hex or decimal", "[control_rules]") {
  CHECK(parse_rv("CKR_DEVICE_ERROR") == CKR_DEVICE_ERROR);
  CHECK(parse_rv("CKR_SESSION_HANDLE_INVALID") == CKR_SESSION_HANDLE_INVALID);
  CHECK(parse_rv("CKR_PIN_INCORRECT") == CKR_PIN_INCORRECT);
  CHECK(parse_rv("0x30") == CKR_DEVICE_ERROR);
  CHECK(parse_rv("0XB3") == CKR_SESSION_HANDLE_INVALID);
  CHECK(parse_rv("48") == CKR_DEVICE_ERROR);
  CHECK(parse_rv("0x80000001") == 0x80000001UL);  // vendor-defined
  CHECK_FALSE(parse_rv("").has_value());
  CHECK_FALSE(parse_rv("0x").has_value());
  CHECK_FALSE(parse_rv("ckr_device_error").has_value());
  CHECK_FALSE(parse_rv("30h").has_value());
  CHECK(rv_name(CKR_DEVICE_REMOVED) == std::string_view("CKR_DEVICE_REMOVED"));
  CHECK_FALSE(rv_name(0x80000001UL).has_value());
}
