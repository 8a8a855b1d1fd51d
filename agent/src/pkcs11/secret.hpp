// Secrets (the PIN) live in a buffer that is locked in memory where the OS allows it and wiped
// with OPENSSL_cleanse when it is destroyed or moved from. Never converted to std::string.
#pragma once

#include <cstddef>
#include <span>
#include <string_view>
#include <vector>

namespace hsm::agent {

class SecretString {
 public:
  SecretString() = default;
  explicit SecretString(std::string_view value);
  SecretString(const SecretString&) = delete;
  SecretString& operator=(const SecretString&) = delete;
  SecretString(SecretString&& other) noexcept;
  SecretString& operator=(SecretString&& other) noexcept;
  ~SecretString();

  [[nodiscard]] bool empty() const noexcept { return bytes_.empty(); }
  [[nodiscard]] std::size_t size() const noexcept { return bytes_.size(); }
  /// The bytes, for handing to C_Login. Do not copy them elsewhere.
  [[nodiscard]] std::span<const unsigned char> bytes() const noexcept { return bytes_; }

  /// Reads a secret from a file, dropping one trailing newline (as Kubernetes Secrets often
  /// carry). Throws std::runtime_error naming the path (never the content).
  static SecretString from_file(const std::string& path);

 private:
  void wipe() noexcept;
  std::vector<unsigned char> bytes_;
};

}  // namespace hsm::agent
