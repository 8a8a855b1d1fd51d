// The usual integration setting: a fresh SoftHSMv2 token, the real hsm-agent on it, and a
// client connected through the socket.
#pragma once

#include <hsm/client.hpp>

#include <memory>

#include "fixtures/agent_process.hpp"
#include "fixtures/openssl_check.hpp"
#include "fixtures/raw_connection.hpp"
#include "fixtures/softhsm_token.hpp"

namespace hsm::test {

struct RunningAgent {
  explicit RunningAgent(AgentOptions options = {})
      : agent(token, std::move(options)), client(agent.socket_path()) {}

  SoftHsmToken token;
  AgentProcess agent;
  hsm::Client client;

  [[nodiscard]] RawConnection connect() const { return RawConnection(agent.socket_path()); }
};

}  // namespace hsm::test
