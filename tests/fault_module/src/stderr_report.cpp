#include "stderr_report.hpp"

#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <system_error>

namespace hsm::fault {

std::string errno_text(int error) {
  return std::generic_category().message(error);
}

void report(std::string_view message) noexcept {
  static constexpr std::string_view kPrefix = "hsm_fault_pkcs11: ";
  // A fixed buffer: reporting must work when allocation is what failed. Long messages are cut.
  std::array<char, 1024> line{};
  const std::size_t body = std::min(message.size(), line.size() - kPrefix.size() - 1);
  std::memcpy(line.data(), kPrefix.data(), kPrefix.size());
  std::memcpy(line.data() + kPrefix.size(), message.data(), body);
  line[kPrefix.size() + body] = '\n';
  const ssize_t ignored = ::write(STDERR_FILENO, line.data(), kPrefix.size() + body + 1);
  static_cast<void>(ignored);
}

}  // namespace hsm::fault
