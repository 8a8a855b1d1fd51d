// AgentConfig: every setting of hsm-agent, parsed once at start from the command line and the
// HSM_AGENT_* environment (a flag wins over its variable). Plain value; no I/O after parsing
// except reading the PIN.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "service/key_service.hpp"

namespace hsm::agent {

enum class LogFormat : std::uint8_t { kText, kJson };

struct ServerLimits {
  std::size_t max_message_bytes = 1024 * 1024;
  std::size_t max_connections = 1024;
  /// Connections one uid may hold at once; 0 here means max_connections / 4, at least 16
  /// (parse_config fills it in), so that one caller cannot take every slot.
  std::size_t max_connections_per_uid = 0;
  /// Bytes held for callers in all (incomplete messages, requests, unsent answers); see
  /// server/memory_budget.hpp. The default fits the Helm chart's 256 MiB memory limit with the
  /// formula in docs/reliability.md.
  std::size_t max_buffered_bytes = 64 * 1024 * 1024;
  /// How long a message may take to arrive once its first byte did.
  std::chrono::seconds read_timeout{10};
  std::size_t max_inflight_per_connection = 256;
  std::size_t max_queue = 4096;
  std::size_t max_write_buffer_bytes = 4 * 1024 * 1024;
  std::chrono::milliseconds request_timeout{5000};
  std::chrono::seconds idle_timeout{300};  // 0 disables
  std::chrono::seconds shutdown_timeout{10};
};

struct AccessConfig {
  std::optional<std::string> policy_path;
  std::vector<uid_t> allow_uids;
  std::vector<gid_t> allow_gids;
  std::vector<uid_t> admin_uids;
  double rate_limit_per_second = 0;  // 0: off
  double rate_burst = 0;             // 0: 2x rate
};

struct AgentConfig {
  // The token. hsm.pin is empty here; load_pin() fills it.
  HsmConfig hsm;
  std::optional<std::string> pin_file;

  std::string socket_path = "/run/hsm-agent/agent.sock";
  mode_t socket_mode = 0660;
  std::optional<std::string> socket_group;
  /// --shared-socket-dir: accept a socket directory others may write to when it is a mount of
  /// its own (a Kubernetes emptyDir); see server/socket_path.hpp.
  bool shared_socket_dir = false;
  std::string metrics_listen = "127.0.0.1:9464";  // empty: no HTTP endpoint
  /// --metrics-all-histograms: a latency histogram for every method and PKCS#11 function, not
  /// only the signing path's (docs/metrics.md, "Series budget").
  bool metrics_all_histograms = false;
  std::chrono::seconds probe_interval{10};

  ServerLimits limits;
  AccessConfig access;
  /// --workers: event loops, each with its own connections (0: one per core).
  unsigned workers = 0;
  /// --busy-poll-us: idle time a worker loop polls its connections without blocking after an
  /// answer, before it sleeps in epoll (latency mode, server/busy_poll.hpp); 0: never polls.
  std::chrono::microseconds busy_poll{0};

  std::string log_level = "info";
  LogFormat log_format = LogFormat::kText;
  std::string audit_log = "-";  // "-": stdout
  /// --audit-fail-open: key operations go on while the audit log cannot be written (its lost
  /// lines are counted); default: they are refused (audit_unavailable).
  bool audit_fail_open = false;
};

/// A bad flag or value: the message is one line for the operator (no PIN ever appears in it).
class ConfigError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// What parse_config decided.
struct ParsedCommandLine {
  std::optional<AgentConfig> config;  // nullopt: nothing to run (--help / --version printed)
  int exit_code = 0;                  // when config is nullopt
};

/// Parses argv and the HSM_AGENT_* environment. --help and --version print to stdout and return
/// no config. Throws ConfigError for a bad flag, value or combination.
[[nodiscard]] ParsedCommandLine parse_config(int argc, const char* const* argv);

/// Reads the PIN from --pin-file or HSM_AGENT_PIN (then removes HSM_AGENT_PIN from the
/// environment) into config.hsm.pin. Warns through `warn` when the file is readable by others, or
/// by a group other than the agent's own (a Kubernetes Secret is 0440 with the pod's fsGroup).
/// Throws ConfigError when neither is given or the file cannot be read.
void load_pin(AgentConfig& config, void (*warn)(const std::string&));

/// The environment variable that backs a flag: "--max-queue" -> "HSM_AGENT_MAX_QUEUE".
[[nodiscard]] std::string env_name_for_flag(const std::string& flag);

}  // namespace hsm::agent
