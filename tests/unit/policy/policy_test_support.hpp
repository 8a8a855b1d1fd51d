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

/// A private temporary directory, removed with everything in it.
class TempDir {
 public:
  TempDir() {
    std::string pattern = (std::filesystem::temp_directory_path() / "policy-test-XXXXXX").string();
    if (::mkdtemp(pattern.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
    path_ = pattern;
  }
  ~TempDir() {
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  /// Writes `text` to `name` in the directory, mode 0644; returns its path.
  [[nodiscard]] std::string write(const std::string& name, const std::string& text) const {
    const auto path = path_ / name;
    {
      std::ofstream out(path, std::ios::binary | std::ios::trunc);
      out << text;
      if (!out) throw std::runtime_error("cannot write " + path.string());
    }
    ::chmod(path.c_str(), 0644);
    return path.string();
  }
  [[nodiscard]] const std::filesystem::path& path() const noexcept { return path_; }

 private:
  std::filesystem::path path_;
};

}  // namespace hsm::agent::test
