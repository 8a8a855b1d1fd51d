// A request that cannot be served for a reason the caller should see (unknown kid, kid taken,
// alg the key cannot do, ...): carries the protocol error code. PKCS#11 failures are
// pkcs11::Pkcs11Error instead; KeyService maps both to protocol errors in one place.
#pragma once

#include <stdexcept>
#include <string>

#include "hsm/protocol/types.hpp"

namespace hsm::agent::keys {

class RequestError : public std::runtime_error {
 public:
  RequestError(protocol::ErrorCode code, const std::string& message)
      : std::runtime_error(message), code_(code) {}
  [[nodiscard]] protocol::ErrorCode code() const noexcept { return code_; }

 private:
  protocol::ErrorCode code_;
};

}  // namespace hsm::agent::keys
