#include "control_rules.hpp"

#include <algorithm>
#include <array>
#include <charconv>
#include <limits>
#include <utility>

namespace hsm::fault {
namespace {

struct RvName {
  std::string_view name;
  CK_RV value;
};

// The return values a fault scenario plausibly needs; anything else can be given as a number.
// clang-format off
#define HSM_FAULT_RV(name) RvName{#name, name}
constexpr std::array kRvNames = {
    HSM_FAULT_RV(CKR_OK),
    HSM_FAULT_RV(CKR_CANCEL),
    HSM_FAULT_RV(CKR_HOST_MEMORY),
    HSM_FAULT_RV(CKR_SLOT_ID_INVALID),
    HSM_FAULT_RV(CKR_GENERAL_ERROR),
    HSM_FAULT_RV(CKR_FUNCTION_FAILED),
    HSM_FAULT_RV(CKR_ARGUMENTS_BAD),
    HSM_FAULT_RV(CKR_NO_EVENT),
    HSM_FAULT_RV(CKR_CANT_LOCK),
    HSM_FAULT_RV(CKR_ATTRIBUTE_SENSITIVE),
    HSM_FAULT_RV(CKR_ATTRIBUTE_TYPE_INVALID),
    HSM_FAULT_RV(CKR_ATTRIBUTE_VALUE_INVALID),
    HSM_FAULT_RV(CKR_DATA_INVALID),
    HSM_FAULT_RV(CKR_DATA_LEN_RANGE),
    HSM_FAULT_RV(CKR_DEVICE_ERROR),
    HSM_FAULT_RV(CKR_DEVICE_MEMORY),
    HSM_FAULT_RV(CKR_DEVICE_REMOVED),
    HSM_FAULT_RV(CKR_FUNCTION_CANCELED),
    HSM_FAULT_RV(CKR_FUNCTION_NOT_SUPPORTED),
    HSM_FAULT_RV(CKR_KEY_HANDLE_INVALID),
    HSM_FAULT_RV(CKR_KEY_TYPE_INCONSISTENT),
    HSM_FAULT_RV(CKR_KEY_FUNCTION_NOT_PERMITTED),
    HSM_FAULT_RV(CKR_MECHANISM_INVALID),
    HSM_FAULT_RV(CKR_MECHANISM_PARAM_INVALID),
    HSM_FAULT_RV(CKR_OBJECT_HANDLE_INVALID),
    HSM_FAULT_RV(CKR_OPERATION_ACTIVE),
    HSM_FAULT_RV(CKR_OPERATION_NOT_INITIALIZED),
    HSM_FAULT_RV(CKR_PIN_INCORRECT),
    HSM_FAULT_RV(CKR_PIN_INVALID),
    HSM_FAULT_RV(CKR_PIN_LEN_RANGE),
    HSM_FAULT_RV(CKR_PIN_EXPIRED),
    HSM_FAULT_RV(CKR_PIN_LOCKED),
    HSM_FAULT_RV(CKR_SESSION_CLOSED),
    HSM_FAULT_RV(CKR_SESSION_COUNT),
    HSM_FAULT_RV(CKR_SESSION_HANDLE_INVALID),
    HSM_FAULT_RV(CKR_SESSION_READ_ONLY),
    HSM_FAULT_RV(CKR_SESSION_EXISTS),
    HSM_FAULT_RV(CKR_SIGNATURE_INVALID),
    HSM_FAULT_RV(CKR_SIGNATURE_LEN_RANGE),
    HSM_FAULT_RV(CKR_TEMPLATE_INCOMPLETE),
    HSM_FAULT_RV(CKR_TEMPLATE_INCONSISTENT),
    HSM_FAULT_RV(CKR_TOKEN_NOT_PRESENT),
    HSM_FAULT_RV(CKR_TOKEN_NOT_RECOGNIZED),
    HSM_FAULT_RV(CKR_TOKEN_WRITE_PROTECTED),
    HSM_FAULT_RV(CKR_USER_ALREADY_LOGGED_IN),
    HSM_FAULT_RV(CKR_USER_NOT_LOGGED_IN),
    HSM_FAULT_RV(CKR_USER_PIN_NOT_INITIALIZED),
    HSM_FAULT_RV(CKR_USER_TYPE_INVALID),
    HSM_FAULT_RV(CKR_USER_ANOTHER_ALREADY_LOGGED_IN),
    HSM_FAULT_RV(CKR_BUFFER_TOO_SMALL),
    HSM_FAULT_RV(CKR_RANDOM_NO_RNG),
    HSM_FAULT_RV(CKR_CRYPTOKI_NOT_INITIALIZED),
    HSM_FAULT_RV(CKR_CRYPTOKI_ALREADY_INITIALIZED),
    HSM_FAULT_RV(CKR_MUTEX_BAD),
    HSM_FAULT_RV(CKR_FUNCTION_REJECTED),
};
// clang-format on
#undef HSM_FAULT_RV

constexpr std::string_view kWhitespace = " \t\r\v\f";

std::string_view trim(std::string_view text) noexcept {
  const auto begin = text.find_first_not_of(kWhitespace);
  if (begin == std::string_view::npos) {
    return {};
  }
  const auto end = text.find_last_not_of(kWhitespace);
  return text.substr(begin, end - begin + 1);
}

/// Splits off the next whitespace-separated token of `rest`.
std::string_view next_token(std::string_view& rest) noexcept {
  rest = trim(rest);
  const auto end = std::min(rest.find_first_of(kWhitespace), rest.size());
  const std::string_view token = rest.substr(0, end);
  rest.remove_prefix(end);
  return token;
}

/// An unsigned number in decimal or (with 0x) hex, the whole text and nothing else.
std::optional<std::uint64_t> parse_unsigned(std::string_view text) noexcept {
  int base = 10;
  if (text.size() > 2 && text[0] == '0' && (text[1] == 'x' || text[1] == 'X')) {
    text.remove_prefix(2);
    base = 16;
  }
  if (text.empty()) {
    return std::nullopt;
  }
  std::uint64_t value = 0;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value, base);
  if (ec != std::errc{} || end != text.data() + text.size()) {
    return std::nullopt;
  }
  return value;
}

std::optional<bool> parse_bool(std::string_view text) noexcept {
  if (text == "1" || text == "true" || text == "yes") {
    return true;
  }
  if (text == "0" || text == "false" || text == "no") {
    return false;
  }
  return std::nullopt;
}

/// Fills `rule` from one `key=value` token; returns an error message or an empty string.
std::string apply_setting(RuleSpec& rule, std::string_view key, std::string_view value,
                          bool& saw_delay) {
  if (key == "rv") {
    rule.rv = parse_rv(value);
    if (!rule.rv) {
      return "rv=" + std::string(value) + " is neither a known CKR_ name nor a number";
    }
  } else if (key == "count") {
    if (value == "inf") {
      rule.count.reset();
      return {};
    }
    rule.count = parse_unsigned(value);
    if (!rule.count || *rule.count == 0) {
      return "count must be a positive number or inf";
    }
  } else if (key == "delay_ms" || key == "delay_us") {
    if (saw_delay) {
      return "give only one of delay_ms and delay_us";
    }
    saw_delay = true;
    const auto amount = parse_unsigned(value);
    const std::uint64_t limit_us =
        static_cast<std::uint64_t>(std::chrono::microseconds(kMaxDelay).count());
    const std::uint64_t scale = key == "delay_ms" ? 1000 : 1;
    if (!amount || *amount > limit_us / scale) {
      return std::string(key) + " must be a number of at most " + std::to_string(limit_us / scale);
    }
    rule.delay = std::chrono::microseconds(static_cast<std::int64_t>(*amount * scale));
  } else if (key == "hang") {
    const auto hang = parse_bool(value);
    if (!hang) {
      return "hang must be 1 or 0";
    }
    rule.hang = *hang;
  } else if (key == "session") {
    if (value == "first") {
      rule.session.mode = SessionFilter::Mode::kFirst;
      return {};
    }
    const auto handle = parse_unsigned(value);
    if (!handle || *handle == CK_INVALID_HANDLE ||
        *handle > std::numeric_limits<CK_SESSION_HANDLE>::max()) {
      return "session must be `first` or a non-zero session handle";
    }
    rule.session = {SessionFilter::Mode::kHandle, static_cast<CK_SESSION_HANDLE>(*handle)};
  } else {
    return "unknown setting `" + std::string(key) +
           "` (known: rv, count, delay_ms, delay_us, hang, session)";
  }
  return {};
}

/// Parses one non-empty line (comment already removed) into `rule`; error message or "".
std::string parse_rule(std::string_view text, RuleSpec& rule) {
  std::string_view rest = text;
  const std::string_view function = next_token(rest);
  if (function != "*") {
    rule.function = find_function(function);
    if (!rule.function) {
      return "unknown function `" + std::string(function) + "`";
    }
    if (*rule.function == FunctionId::C_GetFunctionList) {
      return "C_GetFunctionList cannot be faulted";
    }
  }
  std::vector<std::string_view> seen_keys;
  bool saw_delay = false;
  for (std::string_view token = next_token(rest); !token.empty(); token = next_token(rest)) {
    const auto equals = token.find('=');
    if (equals == std::string_view::npos || equals == 0) {
      return "expected key=value, got `" + std::string(token) + "`";
    }
    const std::string_view key = token.substr(0, equals);
    if (std::find(seen_keys.begin(), seen_keys.end(), key) != seen_keys.end()) {
      return "setting `" + std::string(key) + "` given twice";
    }
    seen_keys.push_back(key);
    if (std::string error = apply_setting(rule, key, token.substr(equals + 1), saw_delay);
        !error.empty()) {
      return error;
    }
  }
  if (!rule.rv && rule.delay.count() == 0 && !rule.hang) {
    return "no fault given (need rv=, delay_ms=/delay_us= or hang=1)";
  }
  return {};
}

}  // namespace

bool RuleSpec::matches(FunctionId id) const noexcept {
  if (function) {
    return *function == id;
  }
  return id != FunctionId::C_GetFunctionList && id != FunctionId::C_Finalize;
}

std::optional<CK_RV> parse_rv(std::string_view text) noexcept {
  for (const RvName& entry : kRvNames) {
    if (entry.name == text) {
      return entry.value;
    }
  }
  const auto number = parse_unsigned(text);
  if (!number || *number > std::numeric_limits<CK_RV>::max()) {
    return std::nullopt;
  }
  return static_cast<CK_RV>(*number);
}

std::optional<std::string_view> rv_name(CK_RV rv) noexcept {
  for (const RvName& entry : kRvNames) {
    if (entry.value == rv) {
      return entry.name;
    }
  }
  return std::nullopt;
}

ParsedControl parse_control_text(std::string_view text) {
  ParsedControl parsed;
  if (text.size() > kMaxControlFileBytes) {
    parsed.errors.push_back("file longer than " + std::to_string(kMaxControlFileBytes) +
                            " bytes; the rest is ignored");
    text = text.substr(0, kMaxControlFileBytes);
  }
  std::size_t line_number = 0;
  while (!text.empty()) {
    ++line_number;
    const auto newline = std::min(text.find('\n'), text.size());
    const std::string_view raw = text.substr(0, newline);
    text.remove_prefix(std::min(newline + 1, text.size()));

    const std::string prefix = "line " + std::to_string(line_number) + ": ";
    if (raw.size() > kMaxLineBytes) {
      parsed.errors.push_back(prefix + "longer than " + std::to_string(kMaxLineBytes) +
                              " bytes; line ignored");
      continue;
    }
    const std::string_view line = trim(raw);
    const std::string_view rule_text = trim(line.substr(0, std::min(line.find('#'), line.size())));
    if (rule_text.empty()) {
      continue;
    }

    RuleSpec rule;
    rule.identity = std::string(line);
    rule.line_number = line_number;
    if (std::string error = parse_rule(rule_text, rule); !error.empty()) {
      parsed.errors.push_back(prefix + error + "; line ignored");
      continue;
    }
    parsed.rules.push_back(std::move(rule));
  }
  return parsed;
}

}  // namespace hsm::fault
