// The fault module's only diagnostics channel: one line on stderr per problem, prefixed with the
// module's name, so it shows up in the host process's log (hsm-agent, a test) without a logging
// dependency inside a PKCS#11 module.
#pragma once

#include <string>
#include <string_view>

namespace hsm::fault {

/// The text for an errno value (thread-safe, unlike strerror).
[[nodiscard]] std::string errno_text(int error);

/// Writes "hsm_fault_pkcs11: <message>\n" with a single write(2), so lines from concurrent calls
/// do not interleave. Thread-safe; never throws; errors writing to stderr are ignored.
void report(std::string_view message) noexcept;

}  // namespace hsm::fault
