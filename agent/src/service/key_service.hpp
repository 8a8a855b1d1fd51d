// KeyService: executes decoded protocol requests against the token. It is the seam between
// the transport (server/) and the HSM (pkcs11/, keys/): the server decodes, checks policy and
// schedules; KeyService does the PKCS#11 work and builds the typed result.
//
// It is one concrete class over a TokenState (service/token_state.hpp): tests run it against
// SoftHSMv2 or the fault module, never a stand-in. The TokenState stays inside: the token
// supervisor is started with supervise(), and tests that drive recovery themselves build the
// TokenState and hand it in.
//
// Thread-safety: execute() is called concurrently from the threads that run requests (up to
// max_sessions of them); it may block on the HSM for as long as the token takes. Nothing here
// runs on the libuv loop thread.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

#include "hsm/protocol/types.hpp"
#include "pkcs11/secret.hpp"

namespace hsm::agent {

class AgentMetrics;
class HealthState;
class TokenState;
class TokenSupervisor;
struct SupervisorOptions;

namespace keys {
struct KeyEntry;
}  // namespace keys

namespace pkcs11 {
class Pkcs11Error;
class Session;
}  // namespace pkcs11

/// Everything needed to open the token. The PIN is moved in and wiped by its owner.
enum class ObjectChanges : std::uint8_t { kAuto, kSerialized, kConcurrent };

struct HsmConfig {
  std::string module_path;                 // the vendor's PKCS#11 library (dlopen'ed)
  std::optional<std::string> token_label;  // matched against present tokens, trimmed
  std::optional<unsigned> slot_index;      // index into the list of slots with a token
  SecretString pin;
  bool read_only = false;  // read-only sessions; no generate/delete
  /// The session pool (pkcs11/session_pool.hpp): `sessions` are kept open when idle (>= 1); it
  /// grows up to `max_sessions` (never below `sessions`) while requests wait for a session, and
  /// closes sessions idle for `session_idle_timeout`. The server runs at most max_sessions
  /// requests against the token at once.
  unsigned sessions = 4;
  unsigned max_sessions = 64;
  std::chrono::milliseconds session_idle_timeout{30000};
  /// Whether calls that create or destroy token objects (generate_key, delete_key) run alone,
  /// apart from the calls that read objects (pkcs11/object_change_gate.hpp): kAuto does so for
  /// the tokens known to need it (SoftHSMv2, pkcs11::needs_serialized_object_changes).
  ObjectChanges object_changes = ObjectChanges::kAuto;
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

  /// A KeyService over a token already opened (TokenState::open). `state` is shared so that a
  /// test can also drive it; `metrics` must outlive this KeyService.
  KeyService(std::shared_ptr<TokenState> state, AgentMetrics& metrics);
  /// close().
  ~KeyService();
  KeyService(const KeyService&) = delete;
  KeyService& operator=(const KeyService&) = delete;

  /// Runs one request of a token-side method (not capabilities, which the server answers from
  /// capabilities(): asked for it, this answers internal). Never throws: every failure is an
  /// Error with a protocol code (and the CKR name when PKCS#11 failed). While the token is down
  /// it answers hsm_unavailable at once, without a PKCS#11 call (health answers ok=false).
  /// `deadline` bounds the wait for a free session (deadline_exceeded when none comes free by
  /// then); a PKCS#11 call already running is not interrupted (the server answers at the
  /// deadline and drops the late result).
  [[nodiscard]] Outcome execute(const protocol::Request& request,
                                std::chrono::steady_clock::time_point deadline);

  /// The token side of capabilities, computed once at start (the server adds the transport's
  /// limits and answers the method).
  [[nodiscard]] const protocol::CapabilitiesResult& capabilities() const noexcept {
    return capabilities_;
  }
  /// Where the agent serves its metrics, told to clients in capabilities.metrics_url. Set at
  /// start, before the server copies the capabilities; not thread-safe.
  void set_metrics_url(std::optional<std::string> url) {
    capabilities_.metrics_url = std::move(url);
  }

  /// The token's description, for logs and hsm_agent_build_info.
  [[nodiscard]] const protocol::TokenDescription& token() const noexcept;

  /// Whether the token is up (not waiting for a re-initialisation). Thread-safe, cheap.
  [[nodiscard]] TokenStatus token_status() const;

  /// Starts the token supervisor over this service's token (probe, re-initialisation,
  /// readiness; service/token_supervisor.hpp). This KeyService, `health` and the metrics must
  /// outlive it; stop it before close().
  [[nodiscard]] TokenSupervisor supervise(HealthState& health, SupervisorOptions options);

  /// Logs out and finalises. Called once, after the request threads and the supervisor have
  /// stopped; later calls do nothing.
  void close() noexcept;

 private:
  struct Context;

  [[nodiscard]] protocol::Result dispatch(const protocol::Request& request, Context& context);
  [[nodiscard]] protocol::HealthResult health(Context& context);
  [[nodiscard]] protocol::HealthResult health_while_down() const;
  [[nodiscard]] protocol::KeyDescription generate_key(Context& context,
                                                      const protocol::GenerateKeyParams& params);
  /// The alg used and the signature.
  [[nodiscard]] std::pair<std::string_view, protocol::Bytes> sign_one(
      Context& context, const protocol::SignParams& params);
  [[nodiscard]] protocol::VerifyResult verify(Context& context,
                                              const protocol::VerifyParams& params);
  [[nodiscard]] protocol::PublicKeyResult get_public_key(Context& context,
                                                         const protocol::KidParams& params);
  [[nodiscard]] protocol::ListKeysResult list_keys(Context& context);
  [[nodiscard]] protocol::JwksResult get_jwks(Context& context);
  /// Every key on the token (one pooled session).
  [[nodiscard]] std::vector<std::shared_ptr<const keys::KeyEntry>> all_keys(Context& context);
  [[nodiscard]] protocol::DeleteKeyResult delete_key(Context& context,
                                                     const protocol::KidParams& params);
  [[nodiscard]] protocol::SignBatchResult sign_batch(Context& context,
                                                     const protocol::SignBatchParams& params);
  template <typename Work>
  auto with_session(Context& context, const std::string* kid, Work&& work)
      -> decltype(work(std::declval<pkcs11::Session&>()));
  void note_failure(Context& context, const pkcs11::Pkcs11Error& e);

  std::shared_ptr<TokenState> state_;
  AgentMetrics& metrics_;
  const bool read_only_;
  protocol::CapabilitiesResult capabilities_;
  std::atomic<bool> closed_{false};
};

}  // namespace hsm::agent
