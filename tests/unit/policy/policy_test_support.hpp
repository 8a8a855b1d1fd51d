// Helpers shared by the policy tests: requests of each shape, callers, and a private temporary
// directory for policy files.
#pragma once

#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "fixtures/temp_dir.hpp"
#include "hsm/protocol/types.hpp"
#include "policy/caller.hpp"

namespace hsm::agent::test {

inline Caller caller(uid_t uid, gid_t gid) {
  return Caller{4242, uid, gid};
}

inline protocol::Request request(protocol::Method method) {
  protocol::Request r;
  r.msgid = 7;
  r.method = method;
  r.params = protocol::EmptyParams{};
  return r;
}

inline protocol::SignParams sign_params(const std::string& kid) {
  protocol::SignParams params;
  params.kid = kid;
  params.input = hsm::protocol::Data{protocol::Bytes{'h', 'i'}};
  return params;
}

/// A request of `method` naming `kid`, with the parameter shape the decoder gives that method.
inline protocol::Request request(protocol::Method method, const std::string& kid) {
  using protocol::Method;
  protocol::Request r = request(method);
  switch (method) {
    case Method::kSign:
      r.params = sign_params(kid);
      break;
    case Method::kVerify: {
      protocol::VerifyParams params;
      params.kid = kid;
      params.input = hsm::protocol::Data{protocol::Bytes{'h', 'i'}};
      params.signature = protocol::Bytes(64, 1);
      r.params = params;
      break;
    }
    case Method::kGenerateKey:
      r.params = protocol::GenerateKeyParams{kid, std::string("ES256"), std::nullopt};
      break;
    case Method::kSignBatch:
      r.params = protocol::SignBatchParams{{sign_params(kid)}};
      break;
    default:
      r.params = protocol::KidParams{kid};
      break;
  }
  return r;
}

inline protocol::Request sign_batch(const std::vector<std::string>& kids) {
  protocol::Request r = request(protocol::Method::kSignBatch);
  protocol::SignBatchParams params;
  for (const auto& kid : kids) params.items.push_back(sign_params(kid));
  r.params = params;
  return r;
}

using hsm::test::TempDir;  // tests/fixtures/temp_dir.hpp

}  // namespace hsm::agent::test
