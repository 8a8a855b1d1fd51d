#include "pkcs11/token.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <array>

#include "pkcs11/error.hpp"
#include "pkcs11/module.hpp"

namespace hsm::agent::pkcs11 {
namespace {

constexpr CK_BBOOL kTokenPresent = CK_TRUE;

/// How a refused PIN is worded: the condition, and what the operator must do about it. Every
/// CKR of ErrorClass::kPin (error.cpp, classify) has a row.
struct PinRefusal {
  CK_RV rv;
  std::string_view condition;
  std::string_view remedy;
};

constexpr std::string_view kGiveRightPin = "give the agent the right PIN and restart it";
constexpr std::array kPinRefusals = {
    PinRefusal{CKR_PIN_INCORRECT, "wrong PIN", kGiveRightPin},
    PinRefusal{CKR_PIN_INVALID, "wrong PIN", kGiveRightPin},
    PinRefusal{CKR_PIN_LEN_RANGE, "wrong PIN", kGiveRightPin},
    PinRefusal{CKR_PIN_LOCKED, "locked user PIN",
               "the token's security officer must unlock it (set a new user PIN); then give the "
               "agent that PIN and restart it"},
    PinRefusal{CKR_PIN_EXPIRED, "expired user PIN",
               "set a new user PIN on the token, give the agent that PIN and restart it"},
    PinRefusal{CKR_USER_PIN_NOT_INITIALIZED, "no user PIN set",
               "the token's security officer must set a user PIN; then give the agent that PIN "
               "and restart it"},
};

std::string describe_pin_refusal(const std::string& token_label, CK_RV rv) {
  const auto found = std::ranges::find(kPinRefusals, rv, &PinRefusal::rv);
  const PinRefusal refusal =
      found != kPinRefusals.end() ? *found : PinRefusal{rv, "PIN refused", kGiveRightPin};
  return std::string{refusal.condition} + " for token '" + token_label +
         "': " + std::string{ckr_name(rv)} + " (not retried); " + std::string{refusal.remedy};
}

std::vector<CK_SLOT_ID> slots_with_token(const Module& module) {
  // The list can change between the size query and the fetch (a token plugged in): ask again.
  for (;;) {
    CK_ULONG count = 0;
    module.call<Function::kGetSlotList>(kTokenPresent, nullptr, &count);
    std::vector<CK_SLOT_ID> slots(count);
    if (count == 0) return slots;
    const CK_RV rv = module.call_accepting<Function::kGetSlotList>(
        {CKR_BUFFER_TOO_SMALL}, kTokenPresent, slots.data(), &count);
    if (rv == CKR_OK) {
      slots.resize(count);
      return slots;
    }
  }
}

CK_TOKEN_INFO token_info(const Module& module, CK_SLOT_ID slot) {
  CK_TOKEN_INFO info{};
  module.call<Function::kGetTokenInfo>(slot, &info);
  return info;
}

std::string token_label(const CK_TOKEN_INFO& info) {
  return trim_field(info.label, sizeof(info.label));
}

// "'a' (slot 0x1), 'b' (slot 0x2)": what was found, for an error message.
std::string describe_tokens(const Module& module, const std::vector<CK_SLOT_ID>& slots) {
  std::string out;
  for (std::size_t i = 0; i < slots.size(); ++i) {
    if (!out.empty()) out += ", ";
    out += "#" + std::to_string(i) + " ";
    try {
      out += "'" + token_label(token_info(module, slots[i])) + "'";
    } catch (const Pkcs11Error& e) {
      out += "(unreadable: " + std::string{e.ckr()} + ")";
    }
  }
  return out.empty() ? std::string{"none"} : out;
}

std::string trim(std::string_view text) {
  constexpr std::string_view kBlanks = " \t\r\n";
  const auto first = text.find_first_not_of(kBlanks);
  if (first == std::string_view::npos) return {};
  const auto last = text.find_last_not_of(kBlanks);
  return std::string{text.substr(first, last - first + 1)};
}

}  // namespace

PinRejectedError::PinRejectedError(const std::string& token_label, CK_RV rv)
    : StartupError(describe_pin_refusal(token_label, rv)), rv_(rv) {}

std::string_view PinRejectedError::ckr() const noexcept {
  return ckr_name(rv_);
}

std::string trim_field(const unsigned char* field, std::size_t size) {
  std::string_view text(reinterpret_cast<const char*>(field), size);
  // Some tokens NUL-terminate instead of blank-padding.
  if (const auto nul = text.find('\0'); nul != std::string_view::npos) text = text.substr(0, nul);
  return trim(text);
}

CK_SLOT_ID find_slot(const Module& module, const TokenSelector& selector) {
  const std::vector<CK_SLOT_ID> slots = slots_with_token(module);
  if (selector.label) {
    const std::string wanted = trim(*selector.label);
    if (wanted.empty()) throw StartupError("the token label is empty");
    for (const CK_SLOT_ID slot : slots) {
      if (token_label(token_info(module, slot)) == wanted) return slot;
    }
    throw StartupError("no token with label '" + wanted + "' in " + module.path() +
                       " (tokens present: " + describe_tokens(module, slots) + ")");
  }
  if (selector.slot_index) {
    if (*selector.slot_index >= slots.size()) {
      throw StartupError("slot index " + std::to_string(*selector.slot_index) +
                         " out of range: " + std::to_string(slots.size()) +
                         " slot(s) with a token in " + module.path() +
                         " (tokens present: " + describe_tokens(module, slots) + ")");
    }
    return slots[*selector.slot_index];
  }
  throw StartupError("no token selected: give a token label or a slot index");
}

bool needs_serialized_object_changes(const protocol::TokenDescription& token) {
  return token.model == "SoftHSM v2";
}

Token::Token(const Module& module, const TokenSelector& selector, const SecretString& pin,
             bool read_only)
    : module_(module),
      slot_(find_slot(module, selector)),
      read_only_(read_only),
      anchor_(module, slot_, !read_only) {
  const CK_TOKEN_INFO token = info();
  description_.label = token_label(token);
  description_.manufacturer = trim_field(token.manufacturerID, sizeof(token.manufacturerID));
  description_.model = trim_field(token.model, sizeof(token.model));
  description_.serial = trim_field(token.serialNumber, sizeof(token.serialNumber));
  login(pin);
}

Token::~Token() {
  logout();
}

void Token::login(const SecretString& pin) {
  auto& logins = module_.stats().logins_total;
  try {
    const CK_RV rv = anchor_.login(CKU_USER, pin.bytes(), {CKR_USER_ALREADY_LOGGED_IN});
    logged_in_ = true;
    // Already logged in (another application of this process holds the login) is a success:
    // the alerts count every other result as a failed login.
    if (rv == CKR_USER_ALREADY_LOGGED_IN) {
      spdlog::info("token '{}': already logged in", description_.label);
    }
    logins.Add({{"result", "ok"}}).Increment();
  } catch (const Pkcs11Error& e) {
    // The CKR name is a bounded label value (ckr_name maps anything unknown to one of two names).
    logins.Add({{"result", std::string{e.ckr()}}}).Increment();
    if (e.error_class() == ErrorClass::kPin) throw PinRejectedError(description_.label, e.rv());
    throw StartupError("cannot log in to token '" + description_.label +
                       "': " + describe_rv(e.rv()));
  }
}

void Token::logout() noexcept {
  if (!logged_in_) return;
  logged_in_ = false;
  try {
    (void)anchor_.logout({CKR_USER_NOT_LOGGED_IN});
  } catch (const Pkcs11Error& e) {
    // Logging out of a token that is down fails; that fault was reported where it was seen.
    if (e.error_class() == ErrorClass::kToken) {
      spdlog::debug("logging out of token '{}': {}", description_.label, e.what());
    } else {
      spdlog::warn("logging out of token '{}': {}", description_.label, e.what());
    }
  } catch (const std::exception& e) {
    spdlog::warn("logging out of token '{}': {}", description_.label, e.what());
  }
}

CK_TOKEN_INFO Token::info() const {
  return token_info(module_, slot_);
}

CK_SESSION_INFO Token::anchor_session_info() const {
  return anchor_.info();
}

bool Token::has_user_login(const CK_SESSION_INFO& info) noexcept {
  return info.state == CKS_RO_USER_FUNCTIONS || info.state == CKS_RW_USER_FUNCTIONS;
}

std::vector<CK_MECHANISM_TYPE> Token::mechanisms() const {
  for (;;) {
    CK_ULONG count = 0;
    module_.call<Function::kGetMechanismList>(slot_, nullptr, &count);
    std::vector<CK_MECHANISM_TYPE> list(count);
    if (count == 0) return list;
    const CK_RV rv = module_.call_accepting<Function::kGetMechanismList>(
        {CKR_BUFFER_TOO_SMALL}, slot_, list.data(), &count);
    if (rv == CKR_OK) {
      list.resize(count);
      return list;
    }
  }
}

std::optional<CK_MECHANISM_INFO> Token::mechanism_info(CK_MECHANISM_TYPE type) const {
  CK_MECHANISM_INFO info{};
  const CK_RV rv = module_.call_accepting<Function::kGetMechanismInfo>({CKR_MECHANISM_INVALID},
                                                                       slot_, type, &info);
  if (rv != CKR_OK) return std::nullopt;
  return info;
}

Session Token::open_session() const {
  return Session(module_, slot_, !read_only_);
}

}  // namespace hsm::agent::pkcs11
