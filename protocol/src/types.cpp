// Wire names of the protocol's enumerations: one table per enumeration, read in both directions.
#include "hsm/protocol/types.hpp"

#include <array>
#include <utility>

#include "hsm/protocol/codec.hpp"

namespace hsm::protocol {
namespace {

// Each table lists every enumerator once, in declaration order, so that to_string() can index it
// directly; the static_asserts below keep that promise checked at compile time.
constexpr std::array kErrorCodeNames = {
    std::pair{ErrorCode::kInvalidRequest, std::string_view{"invalid_request"}},
    std::pair{ErrorCode::kUnknownMethod, std::string_view{"unknown_method"}},
    std::pair{ErrorCode::kInvalidParams, std::string_view{"invalid_params"}},
    std::pair{ErrorCode::kNotFound, std::string_view{"not_found"}},
    std::pair{ErrorCode::kAlreadyExists, std::string_view{"already_exists"}},
    std::pair{ErrorCode::kUnsupportedAlg, std::string_view{"unsupported_alg"}},
    std::pair{ErrorCode::kNotSupported, std::string_view{"not_supported"}},
    std::pair{ErrorCode::kPermissionDenied, std::string_view{"permission_denied"}},
    std::pair{ErrorCode::kHsmUnavailable, std::string_view{"hsm_unavailable"}},
    std::pair{ErrorCode::kHsmError, std::string_view{"hsm_error"}},
    std::pair{ErrorCode::kOverloaded, std::string_view{"overloaded"}},
    std::pair{ErrorCode::kShuttingDown, std::string_view{"shutting_down"}},
    std::pair{ErrorCode::kDeadlineExceeded, std::string_view{"deadline_exceeded"}},
    std::pair{ErrorCode::kAuditUnavailable, std::string_view{"audit_unavailable"}},
    std::pair{ErrorCode::kInternal, std::string_view{"internal"}},
};

constexpr std::array kMethodNames = {
    std::pair{Method::kCapabilities, std::string_view{"capabilities"}},
    std::pair{Method::kHealth, std::string_view{"health"}},
    std::pair{Method::kGenerateKey, std::string_view{"generate_key"}},
    std::pair{Method::kImportKey, std::string_view{"import_key"}},
    std::pair{Method::kSign, std::string_view{"sign"}},
    std::pair{Method::kVerify, std::string_view{"verify"}},
    std::pair{Method::kGetPublicKey, std::string_view{"get_public_key"}},
    std::pair{Method::kListKeys, std::string_view{"list_keys"}},
    std::pair{Method::kDeleteKey, std::string_view{"delete_key"}},
    std::pair{Method::kGetJwks, std::string_view{"get_jwks"}},
    std::pair{Method::kSignBatch, std::string_view{"sign_batch"}},
};

constexpr std::array kSignatureFormatNames = {
    std::pair{SignatureFormat::kRaw, std::string_view{"raw"}},
    std::pair{SignatureFormat::kDer, std::string_view{"der"}},
};

constexpr std::array kFrameErrorReasonNames = {
    std::pair{FrameErrorReason::kMalformed, std::string_view{"malformed"}},
    std::pair{FrameErrorReason::kTooLarge, std::string_view{"too_large"}},
    std::pair{FrameErrorReason::kLimitExceeded, std::string_view{"limit_exceeded"}},
};

template <typename Table>
constexpr bool in_declaration_order(const Table& table) {
  for (std::size_t i = 0; i < table.size(); ++i) {
    if (static_cast<std::size_t>(table[i].first) != i) {
      return false;
    }
  }
  return true;
}
static_assert(in_declaration_order(kErrorCodeNames));
static_assert(kErrorCodeNames.back().first == ErrorCode::kInternal, "a code is missing");
static_assert(in_declaration_order(kMethodNames));
static_assert(kMethodNames.back().first == Method::kSignBatch, "a method is missing");
static_assert(in_declaration_order(kSignatureFormatNames));
static_assert(in_declaration_order(kFrameErrorReasonNames));

template <typename Table, typename Enum>
constexpr std::string_view name_of(const Table& table, Enum value) noexcept {
  const auto index = static_cast<std::size_t>(value);
  return index < table.size() ? table[index].second : std::string_view{"?"};
}

template <typename Table>
constexpr auto value_of(const Table& table, std::string_view name) noexcept
    -> std::optional<typename Table::value_type::first_type> {
  for (const auto& [value, wire_name] : table) {
    if (wire_name == name) {
      return value;
    }
  }
  return std::nullopt;
}

template <typename Table>
std::vector<typename Table::value_type::first_type> all_of(const Table& table) {
  std::vector<typename Table::value_type::first_type> values;
  values.reserve(table.size());
  for (const auto& entry : table) {
    values.push_back(entry.first);
  }
  return values;
}

}  // namespace

std::string_view to_string(ErrorCode code) noexcept {
  return name_of(kErrorCodeNames, code);
}

std::optional<ErrorCode> parse_error_code(std::string_view name) noexcept {
  return value_of(kErrorCodeNames, name);
}

const std::vector<ErrorCode>& all_error_codes() {
  static const std::vector<ErrorCode> codes = all_of(kErrorCodeNames);
  return codes;
}

std::string_view to_string(Method method) noexcept {
  return name_of(kMethodNames, method);
}

std::optional<Method> parse_method(std::string_view name) noexcept {
  return value_of(kMethodNames, name);
}

const std::vector<Method>& all_methods() {
  static const std::vector<Method> methods = all_of(kMethodNames);
  return methods;
}

std::string_view to_string(SignatureFormat format) noexcept {
  return name_of(kSignatureFormatNames, format);
}

std::optional<SignatureFormat> parse_signature_format(std::string_view name) noexcept {
  return value_of(kSignatureFormatNames, name);
}

std::string_view to_string(FrameErrorReason reason) noexcept {
  return name_of(kFrameErrorReasonNames, reason);
}

}  // namespace hsm::protocol
