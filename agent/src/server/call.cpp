#include "server/call.hpp"

#include <openssl/sha.h>

#include <array>
#include <span>
#include <variant>

namespace hsm::agent {
namespace {

const std::string* kid_of(const protocol::Request& request) {
  return std::visit(
      [](const auto& params) -> const std::string* {
        if constexpr (requires { params.kid; }) {
          return &params.kid;
        } else {
          return nullptr;
        }
      },
      request.params);
}

std::array<std::uint8_t, 32> sha256_of(const protocol::SignInput& input) {
  const std::span<const std::uint8_t> bytes = protocol::input_bytes(input);
  std::array<std::uint8_t, 32> digest{};
  SHA256(bytes.data(), bytes.size(), digest.data());
  return digest;
}

}  // namespace

std::optional<protocol::ErrorCode> code_of(const Outcome& outcome) {
  if (const auto* error = std::get_if<protocol::Error>(&outcome)) return error->code;
  return std::nullopt;
}

std::size_t signatures_asked(const protocol::Request& request) {
  if (const auto* batch = std::get_if<protocol::SignBatchParams>(&request.params)) {
    return batch->items.size();
  }
  return 1;
}

AuditRecord audit_record(const protocol::Request& request, const Caller& caller,
                         const Outcome& outcome) {
  AuditRecord record;
  record.method = request.method;
  record.caller = caller;
  record.code = code_of(outcome);
  if (const auto* kid = kid_of(request)) record.kid = *kid;
  if (const auto* result = std::get_if<protocol::Result>(&outcome)) {
    std::visit(
        [&record](const auto& value) {
          if constexpr (requires { value.alg; }) record.alg = value.alg;
        },
        *result);
  }
  if (const auto* sign = std::get_if<protocol::SignParams>(&request.params)) {
    record.input_sha256 = sha256_of(sign->input);
  }
  if (const auto* batch = std::get_if<protocol::SignBatchParams>(&request.params)) {
    const protocol::SignBatchResult* answered = nullptr;
    if (const auto* result = std::get_if<protocol::Result>(&outcome)) {
      answered = std::get_if<protocol::SignBatchResult>(result);
    }
    record.items.reserve(batch->items.size());
    for (std::size_t i = 0; i < batch->items.size(); ++i) {
      AuditBatchItem item{batch->items[i].kid, record.code, sha256_of(batch->items[i].input)};
      if (answered && i < answered->results.size()) {
        if (const auto* error = std::get_if<protocol::Error>(&answered->results[i])) {
          item.code = error->code;
        }
      }
      record.items.push_back(std::move(item));
    }
  }
  return record;
}

}  // namespace hsm::agent
