// hsm::Error, hsm::Errc and default_socket_path(): the free-standing pieces of the public API.
#include <array>
#include <cstdlib>
#include <string>
#include <utility>

#include "hsm/client.hpp"
#include "hsm/jose.hpp"
#include "hsm/protocol/types.hpp"

namespace hsm {
namespace {

// The protocol's codes are the first Errc values, in the protocol's order: one cast converts.
static_assert(static_cast<int>(Errc::kInvalidRequest) ==
              static_cast<int>(protocol::ErrorCode::kInvalidRequest));
static_assert(static_cast<int>(Errc::kInternal) ==
              static_cast<int>(protocol::ErrorCode::kInternal));
static_assert(static_cast<int>(Errc::kConnectionFailed) ==
              static_cast<int>(protocol::ErrorCode::kInternal) + 1);
// The jose codes follow jose::Reason's order.
static_assert(static_cast<int>(Errc::kJoseBadSignature) - static_cast<int>(Errc::kJoseMalformed) ==
              static_cast<int>(jose::Reason::kBadSignature) -
                  static_cast<int>(jose::Reason::kMalformed));

constexpr std::array<std::string_view, 4> kClientSideNames{kConnectionFailed, kTimeout, kCancelled,
                                                           kProtocolError};
static_assert(static_cast<int>(Errc::kProtocolError) - static_cast<int>(Errc::kConnectionFailed) ==
              kClientSideNames.size() - 1);

std::string describe(const std::string& code, const std::string& message,
                     const std::optional<std::string>& ckr) {
  std::string text = code;
  if (!message.empty()) {
    text += ": " + message;
  }
  if (ckr) {
    text += " (" + *ckr + ")";
  }
  return text;
}

}  // namespace

std::string_view to_string(Errc code) noexcept {
  const auto value = static_cast<int>(code);
  if (code <= Errc::kInternal) {
    return protocol::to_string(static_cast<protocol::ErrorCode>(value));
  }
  if (code <= Errc::kProtocolError) {
    return kClientSideNames[static_cast<std::size_t>(value -
                                                     static_cast<int>(Errc::kConnectionFailed))];
  }
  if (code <= Errc::kJoseBadSignature) {
    return jose::reason_code(static_cast<jose::Reason>(value -
                                                       static_cast<int>(Errc::kJoseMalformed) +
                                                       static_cast<int>(jose::Reason::kMalformed)));
  }
  return "unknown";
}

Errc errc_from_string(std::string_view name) noexcept {
  for (int value = 0; value < static_cast<int>(Errc::kUnknown); ++value) {
    if (to_string(static_cast<Errc>(value)) == name) {
      return static_cast<Errc>(value);
    }
  }
  return Errc::kUnknown;
}

Error::Error(std::string code, const std::string& message, std::optional<std::string> ckr)
    : std::runtime_error(describe(code, message, ckr)),
      code_(std::move(code)),
      message_(message),
      ckr_(std::move(ckr)),
      errc_(errc_from_string(code_)) {}

Error::Error(Errc code, const std::string& message, std::optional<std::string> ckr)
    : std::runtime_error(describe(std::string(to_string(code)), message, ckr)),
      code_(to_string(code)),
      message_(message),
      ckr_(std::move(ckr)),
      errc_(code) {}

std::string default_socket_path() {
  // The agent's own default (--socket); HSM_AGENT_SOCKET overrides it for apps and hsmctl.
  constexpr const char* kAgentDefaultSocket = "/run/hsm-agent/agent.sock";
  const char* from_env = std::getenv("HSM_AGENT_SOCKET");  // NOLINT(concurrency-mt-unsafe)
  if (from_env != nullptr && *from_env != '\0') {
    return from_env;
  }
  return kAgentDefaultSocket;
}

}  // namespace hsm
