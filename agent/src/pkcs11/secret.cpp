#include "pkcs11/secret.hpp"

#include <fcntl.h>
#include <openssl/crypto.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <stdexcept>
#include <utility>

namespace hsm::agent {
namespace {

// A PIN file is a few bytes; anything large is a mistake (a wrong path), not a PIN.
constexpr std::size_t kMaxSecretFileBytes = 4096;

void lock_memory(std::vector<unsigned char>& bytes) noexcept {
  // Best effort: keep the secret out of swap where the OS allows it (RLIMIT_MEMLOCK may not).
  if (bytes.capacity() != 0) (void)::mlock(bytes.data(), bytes.capacity());
}

void unlock_memory(std::vector<unsigned char>& bytes) noexcept {
  if (bytes.capacity() != 0) (void)::munlock(bytes.data(), bytes.capacity());
}

}  // namespace

SecretString::SecretString(std::string_view value) : bytes_(value.begin(), value.end()) {
  lock_memory(bytes_);
}

SecretString::SecretString(SecretString&& other) noexcept : bytes_(std::move(other.bytes_)) {
  // The vector's buffer moved with it (and stays locked); the source is left empty.
  other.bytes_.clear();
}

SecretString& SecretString::operator=(SecretString&& other) noexcept {
  if (this != &other) {
    wipe();
    bytes_ = std::move(other.bytes_);
    other.bytes_.clear();
  }
  return *this;
}

SecretString::~SecretString() {
  wipe();
}

void SecretString::wipe() noexcept {
  if (bytes_.capacity() != 0) {
    OPENSSL_cleanse(bytes_.data(), bytes_.capacity());
    unlock_memory(bytes_);
  }
  bytes_.clear();
  bytes_.shrink_to_fit();
}

SecretString SecretString::from_file(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw std::runtime_error("cannot open secret file " + path);
  // Read straight into a locked buffer with read(2): no stream or std::string copy of the bytes.
  SecretString secret;
  secret.bytes_.resize(kMaxSecretFileBytes + 1);
  lock_memory(secret.bytes_);
  std::size_t filled = 0;
  while (filled < secret.bytes_.size()) {
    const ssize_t n = ::read(fd, secret.bytes_.data() + filled, secret.bytes_.size() - filled);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      ::close(fd);
      throw std::runtime_error("cannot read secret file " + path);
    }
    if (n == 0) break;
    filled += static_cast<std::size_t>(n);
  }
  ::close(fd);
  if (filled > kMaxSecretFileBytes) {
    throw std::runtime_error("secret file " + path + " is larger than " +
                             std::to_string(kMaxSecretFileBytes) + " bytes");
  }
  // Drop one trailing newline ("\n" or "\r\n"), as Kubernetes Secrets and editors add.
  if (filled > 0 && secret.bytes_[filled - 1] == '\n') {
    --filled;
    if (filled > 0 && secret.bytes_[filled - 1] == '\r') --filled;
  }
  // Shrinking never reallocates, so the wiped tail stays inside the locked buffer.
  OPENSSL_cleanse(secret.bytes_.data() + filled, secret.bytes_.size() - filled);
  secret.bytes_.resize(filled);
  return secret;
}

}  // namespace hsm::agent
