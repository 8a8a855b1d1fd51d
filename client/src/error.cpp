// hsm::Error and default_socket_path(): the two free-standing pieces of the public API.
#include <cstdlib>
#include <string>
#include <utility>

#include "hsm/client.hpp"

namespace hsm {
namespace {

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

Error::Error(std::string code, const std::string& message, std::optional<std::string> ckr)
    : std::runtime_error(describe(code, message, ckr)),
      code_(std::move(code)),
      message_(message),
      ckr_(std::move(ckr)) {}

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
