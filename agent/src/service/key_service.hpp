// KeyService: executes decoded protocol requests against the token. It is the seam between
// the transport (server/) and the HSM (pkcs11/, keys/): the server decodes, checks policy and
// schedules; KeyService does the PKCS#11 work and builds the typed result.
//
// Thread-safety: execute() is called concurrently from the worker threads (one per pooled
// session); it may block on the HSM for as long as the token takes. Nothing here runs on the
// libuv loop thread.
#pragma once

#include <chrono>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <variant>
#include <vector>

#include "hsm/protocol/types.hpp"
#include "pkcs11/secret.hpp"

namespace hsm::agent {

class AgentMetrics;
class TokenState;

/// Everything needed to open the token. The PIN is moved in and wiped by its owner.
struct HsmConfig {
  std::string module_path;                 // the vendor's PKCS#11 library (dlopen'ed)
  std::optional<std::string> token_label;  // matched against present tokens, trimmed
  std::optional<unsigned> slot_index;      // index into the list of slots with a token
  SecretString pin;
  bool read_only = false;  // read-only sessions; no generate/delete
  unsigned sessions = 8;   // size of the session pool (>= 1)
};

/// Startup failed in a way an operator must fix (module missing, token not found, PIN wrong).
/// The message names the problem in one line and never contains the PIN.
class StartupError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

using Outcome = std::variant<protocol::Error, protocol::Result>;

/// Token-level PKCS#11 faults (CKR_DEVICE_ERROR, CKR_TOKEN_NOT_PRESENT, CKR_USER_NOT_LOGGED_IN,
/// ... see pkcs11/error.hpp) seen by execute() or the token probe mark the token down; the
/// token supervisor re-initialises it (docs/reliability.md). `up` is false from the fault until
/// the re-initialisation succeeded; `last_fault` says why it is down.
struct TokenStatus {
  bool up = true;
  std::optional<std::string> last_fault;  // e.g. "C_Sign failed: CKR_DEVICE_ERROR (0x30)"
};

class KeyService {
 public:
  /// Loads the module, initialises it, finds the token, logs in once, opens the session pool and
  /// probes the token's mechanisms. Throws StartupError.
  static std::unique_ptr<KeyService> open(HsmConfig config, AgentMetrics& metrics);

  virtual ~KeyService() = default;

  /// Runs one request (any method but the transport-level ones). Never throws: every failure
  /// is an Error with a protocol code (and the CKR name when PKCS#11 failed). While the token is
  /// down it answers hsm_unavailable at once, without a PKCS#11 call (health answers ok=false).
  /// `deadline` bounds the wait for a free session (deadline_exceeded when none comes free by
  /// then); a PKCS#11 call already running is not interrupted (the server answers at the
  /// deadline and drops the late result).
  [[nodiscard]] virtual Outcome execute(const protocol::Request& request,
                                        std::chrono::steady_clock::time_point deadline) = 0;

  /// capabilities: answered without touching the token (computed once at start).
  [[nodiscard]] virtual const protocol::CapabilitiesResult& capabilities() const = 0;

  /// The token's description, for logs and hsm_agent_build_info.
  [[nodiscard]] virtual const protocol::TokenDescription& token() const = 0;

  /// Whether the token is up (not waiting for a re-initialisation). Thread-safe, cheap.
  [[nodiscard]] virtual TokenStatus token_status() const = 0;

  /// The token's connection state, for the TokenSupervisor (probe and re-initialisation).
  /// Lives as long as this KeyService.
  [[nodiscard]] virtual TokenState& token_state() = 0;

  /// Logs out and finalises. Called once, after the workers have stopped.
  virtual void close() noexcept = 0;
};

}  // namespace hsm::agent
