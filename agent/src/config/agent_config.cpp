#include "config/agent_config.hpp"

#include <sys/stat.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <map>

namespace hsm::agent {
namespace {

// A poll longer than this is a core given away, not a latency gain (docs/performance.md).
constexpr unsigned kMaxBusyPollUs = 1000;

// Adds an option whose environment variable follows from its name, so flag and variable can
// never drift apart.
template <typename T>
CLI::Option* add_option(CLI::App& app, const std::string& flag, T& target,
                        const std::string& description) {
  return app.add_option(flag, target, description)->envname(env_name_for_flag(flag));
}

CLI::Option* add_flag(CLI::App& app, const std::string& flag, bool& target,
                      const std::string& description) {
  return app.add_flag(flag, target, description)->envname(env_name_for_flag(flag));
}

mode_t parse_socket_mode(const std::string& text) {
  if (text.empty() || text.size() > 4 ||
      !std::all_of(text.begin(), text.end(), [](char c) { return c >= '0' && c <= '7'; })) {
    throw ConfigError("--socket-mode must be an octal mode such as 0660, got '" + text + "'");
  }
  const auto mode = static_cast<mode_t>(std::strtoul(text.c_str(), nullptr, 8));
  if ((mode & 0007) != 0) {
    // Whoever can write to the socket can sign as the service.
    throw ConfigError("--socket-mode " + text + " grants access to others; use at most 0770");
  }
  return mode;
}

}  // namespace

std::string env_name_for_flag(const std::string& flag) {
  std::string name = "HSM_AGENT_";
  for (char c : flag.substr(flag.find_first_not_of('-'))) {
    name += c == '-' ? '_' : static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  }
  return name;
}

ParsedCommandLine parse_config(int argc, const char* const* argv) {
  AgentConfig config;
  CLI::App app{
      "hsm-agent: signs with keys held in a PKCS#11 token, for the applications of this pod.\n"
      "Every flag can also be set by its environment variable (shown as 'Env'). The PIN comes\n"
      "from --pin-file or HSM_AGENT_PIN, never from the command line.",
      "hsm-agent"};
  app.set_version_flag("--version", std::string("hsm-agent ") + HSM_AGENT_VERSION);
  app.get_formatter()->column_width(40);

  std::string module, token_label, socket_mode = "0660", log_format = "text";
  int slot_index = -1;
  unsigned sessions = 4, max_sessions = 64, session_idle_timeout_s = 30;
  std::size_t request_timeout_ms = 5000;
  std::size_t idle_timeout_s = 300, shutdown_timeout_s = 10, probe_interval_s = 10;
  unsigned read_timeout_s = 10, busy_poll_us = 0;
  std::string pin_file, policy, socket_group, object_changes = "auto";
  const std::map<std::string, ObjectChanges> object_change_modes = {
      {"auto", ObjectChanges::kAuto},
      {"serialized", ObjectChanges::kSerialized},
      {"concurrent", ObjectChanges::kConcurrent}};

  add_option(app, "--module", module, "PKCS#11 module (shared library) to load")->required();
  auto* label_opt = add_option(app, "--token-label", token_label, "token to use, by label");
  auto* slot_opt = add_option(app, "--slot-index", slot_index,
                              "token to use, by index into the slots with a token present")
                       ->check(CLI::NonNegativeNumber);
  label_opt->excludes(slot_opt);
  add_option(app, "--pin-file", pin_file,
             "file holding the user PIN (else env HSM_AGENT_PIN, which is then unset)");
  add_option(app, "--socket", config.socket_path, "Unix socket to listen on")
      ->capture_default_str();
  add_option(app, "--socket-mode", socket_mode, "socket permissions (octal)")
      ->capture_default_str();
  add_option(app, "--socket-group", socket_group, "group owning the socket (name or gid)");
  add_flag(app, "--shared-socket-dir", config.shared_socket_dir,
           "the socket directory is a volume shared by the pod's containers (a Kubernetes "
           "emptyDir, mode 0777): accept it although others may write to it, if it is a mount "
           "point; only the agent may mount it writable (docs/security.md)");
  add_option(app, "--metrics-listen", config.metrics_listen,
             "HOST:PORT for /metrics, /healthz, /readyz; empty disables")
      ->capture_default_str();
  add_flag(app, "--metrics-all-histograms", config.metrics_all_histograms,
           "a latency histogram for every method and PKCS#11 function, not only those of the "
           "signing path (about 470 more series per agent: for investigating a token)");
  add_option(app, "--probe-interval", probe_interval_s, "seconds between token health probes")
      ->capture_default_str()
      ->check(CLI::Range(std::size_t{1}, std::size_t{3600}));
  add_flag(app, "--read-only", config.hsm.read_only,
           "read-only sessions: generate_key and delete_key are refused");
  add_option(app, "--object-changes", object_changes,
             "whether key generation and deletion run alone, apart from signing and lookups; "
             "auto: for tokens whose library needs it (SoftHSMv2)")
      ->capture_default_str()
      ->check(CLI::IsMember(object_change_modes));
  add_option(app, "--sessions", sessions,
             "PKCS#11 sessions opened at start and kept open when idle")
      ->capture_default_str()
      ->check(CLI::Range(1U, 1024U));
  auto* max_sessions_opt =
      add_option(app, "--max-sessions", max_sessions,
                 "most PKCS#11 sessions (and requests running against the token at once); the "
                 "pool grows to it while requests wait, never past the token's own limit")
          ->capture_default_str()
          ->check(CLI::Range(1U, 1024U));
  add_option(app, "--session-idle-timeout", session_idle_timeout_s,
             "seconds a session above --sessions may stay idle before it is closed")
      ->capture_default_str()
      ->check(CLI::Range(1U, 3600U));
  add_option(app, "--max-message-bytes", config.limits.max_message_bytes,
             "largest request accepted; a larger one closes its connection")
      ->capture_default_str()
      ->check(CLI::Range(std::size_t{1024}, std::size_t{64} * 1024 * 1024));
  add_option(app, "--max-connections", config.limits.max_connections,
             "connections beyond this are closed at accept")
      ->capture_default_str()
      ->check(CLI::Range(std::size_t{1}, std::size_t{1'000'000}));
  add_option(app, "--max-connections-per-uid", config.limits.max_connections_per_uid,
             "connections one caller uid may hold; default a quarter of --max-connections (at "
             "least 16)")
      ->check(CLI::Range(std::size_t{1}, std::size_t{1'000'000}));
  add_option(app, "--max-buffered-bytes", config.limits.max_buffered_bytes,
             "bytes held for callers in all (incomplete messages, requests, unsent answers); "
             "past it the heaviest connections stop being read")
      ->capture_default_str()
      ->check(CLI::Range(std::size_t{1} << 20, std::size_t{1} << 40));
  add_option(app, "--read-timeout", read_timeout_s,
             "seconds a message may take to arrive once its first byte did")
      ->capture_default_str()
      ->check(CLI::Range(1U, 3600U));
  add_option(app, "--max-inflight-per-connection", config.limits.max_inflight_per_connection,
             "requests in flight per connection before reading it pauses")
      ->capture_default_str()
      ->check(CLI::Range(std::size_t{1}, std::size_t{65536}));
  add_option(app, "--workers", config.workers,
             "event loops, each serving its own connections (0: one per core)")
      ->capture_default_str()
      ->check(CLI::Range(0U, 256U));
  add_option(app, "--busy-poll-us", busy_poll_us,
             "latency mode: microseconds a worker keeps polling its connections after an answer "
             "before it sleeps (0: off; costs CPU, see docs/performance.md)")
      ->capture_default_str()
      ->check(CLI::Range(0U, kMaxBusyPollUs));
  add_option(app, "--max-queue", config.limits.max_queue,
             "requests waiting for a worker before new ones get 'overloaded'")
      ->capture_default_str()
      ->check(CLI::Range(std::size_t{1}, std::size_t{1'000'000}));
  add_option(app, "--max-write-buffer", config.limits.max_write_buffer_bytes,
             "bytes of answers queued for a slow reader before its connection is closed")
      ->capture_default_str()
      ->check(CLI::Range(std::size_t{4096}, std::size_t{1} << 30));
  add_option(app, "--request-timeout", request_timeout_ms,
             "default per-request deadline in ms (a request may carry timeout_ms)")
      ->capture_default_str()
      ->check(CLI::Range(std::size_t{1}, std::size_t{3'600'000}));
  add_option(app, "--idle-timeout", idle_timeout_s,
             "seconds before an idle connection is closed; 0 disables")
      ->capture_default_str();
  add_option(app, "--shutdown-timeout", shutdown_timeout_s,
             "seconds to drain in-flight requests on SIGTERM")
      ->capture_default_str();
  add_option(app, "--log-level", config.log_level, "trace, debug, info, warn or error")
      ->capture_default_str()
      ->check(CLI::IsMember({"trace", "debug", "info", "warn", "error"}));
  add_option(app, "--log-format", log_format, "text or json")
      ->capture_default_str()
      ->check(CLI::IsMember({"text", "json"}));
  add_option(app, "--audit-log", config.audit_log,
             "audit log file, reopened on SIGHUP; '-' is stdout")
      ->capture_default_str();
  add_flag(app, "--audit-fail-open", config.audit_fail_open,
           "keep answering key operations while the audit log cannot be written (its lost lines "
           "are counted); default: refuse them with audit_unavailable until it can");
  add_option(app, "--policy", policy, "access policy file (YAML); see docs/policy.md");
  add_option(app, "--allow-uid", config.access.allow_uids,
             "without a policy: also allow this uid (non-admin methods); repeatable")
      ->delimiter(',');
  add_option(app, "--allow-gid", config.access.allow_gids,
             "without a policy: also allow this gid (non-admin methods); repeatable")
      ->delimiter(',');
  add_option(app, "--admin-uid", config.access.admin_uids,
             "without a policy: this uid may also generate and delete keys; repeatable")
      ->delimiter(',');
  add_option(app, "--rate-limit", config.access.rate_limit_per_second,
             "requests per second per caller uid; 0 is off")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  add_option(app, "--rate-burst", config.access.rate_burst,
             "token bucket size per caller uid; 0 means twice the rate")
      ->check(CLI::NonNegativeNumber);

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return {std::nullopt, app.exit(e)};
  } catch (const CLI::CallForAllHelp& e) {
    return {std::nullopt, app.exit(e)};
  } catch (const CLI::CallForVersion& e) {
    return {std::nullopt, app.exit(e)};
  } catch (const CLI::ParseError& e) {
    throw ConfigError(e.what());
  }

  config.hsm.module_path = module;
  if (!label_opt->empty()) config.hsm.token_label = token_label;
  if (!slot_opt->empty()) config.hsm.slot_index = static_cast<unsigned>(slot_index);
  if (!config.hsm.token_label && !config.hsm.slot_index) {
    throw ConfigError("choose the token with --token-label or --slot-index");
  }
  if (!max_sessions_opt->empty() && max_sessions < sessions) {
    throw ConfigError("--max-sessions (" + std::to_string(max_sessions) +
                      ") is below --sessions (" + std::to_string(sessions) + ")");
  }
  config.hsm.sessions = sessions;
  // Unless given, the ceiling is at least the idle minimum (--sessions 100 alone is valid).
  config.hsm.max_sessions = std::max(max_sessions, sessions);
  config.hsm.session_idle_timeout = std::chrono::seconds(session_idle_timeout_s);
  config.hsm.object_changes = object_change_modes.at(object_changes);
  config.socket_mode = parse_socket_mode(socket_mode);
  if (!socket_group.empty()) config.socket_group = socket_group;
  if (!pin_file.empty()) config.pin_file = pin_file;
  if (!policy.empty()) config.access.policy_path = policy;
  config.log_format = log_format == "json" ? LogFormat::kJson : LogFormat::kText;
  config.limits.request_timeout = std::chrono::milliseconds(request_timeout_ms);
  config.busy_poll = std::chrono::microseconds(busy_poll_us);
  config.limits.idle_timeout = std::chrono::seconds(idle_timeout_s);
  config.limits.read_timeout = std::chrono::seconds(read_timeout_s);
  if (config.limits.max_connections_per_uid == 0) {
    // A quarter of the connections, so that one caller cannot take every slot; at least 16 (or
    // every connection, when fewer are allowed), which a busy app's pool needs.
    const auto& limits = config.limits;
    config.limits.max_connections_per_uid =
        std::max(limits.max_connections / 4, std::min<std::size_t>(16, limits.max_connections));
  }
  config.limits.shutdown_timeout = std::chrono::seconds(shutdown_timeout_s);
  config.probe_interval = std::chrono::seconds(probe_interval_s);
  if (config.socket_path.empty()) throw ConfigError("--socket must not be empty");
  if (config.socket_path.size() >= 108) {  // sizeof(sockaddr_un::sun_path)
    throw ConfigError("--socket path is too long for a Unix socket: " + config.socket_path);
  }
  return {std::move(config), 0};
}

void load_pin(AgentConfig& config, void (*warn)(const std::string&)) {
  if (config.pin_file) {
    struct stat st {};
    if (::stat(config.pin_file->c_str(), &st) != 0) {
      throw ConfigError("cannot read the PIN file " + *config.pin_file + ": " +
                        std::strerror(errno));
    }
    // Group access is expected when the group is the agent's own: a Kubernetes Secret volume is
    // root-owned with the pod's fsGroup (= the agent's gid) as group, mode 0440, and mounted in
    // the agent's container only. Any other group, and others, are warned about.
    const bool group_is_own = st.st_gid == ::getegid();
    if (((st.st_mode & S_IRWXO) != 0 || ((st.st_mode & S_IRWXG) != 0 && !group_is_own)) &&
        warn != nullptr) {
      warn("the PIN file " + *config.pin_file +
           " is readable by group or others; restrict it to mode 0400 or 0600 (or 0440 with "
           "the agent's own group)");
    }
    try {
      config.hsm.pin = SecretString::from_file(*config.pin_file);
    } catch (const std::exception& e) {
      throw ConfigError(e.what());
    }
  } else if (const char* pin = std::getenv("HSM_AGENT_PIN"); pin != nullptr) {
    config.hsm.pin = SecretString(pin);
    // /proc/PID/environ shows the process's initial environment block, which unsetenv() does
    // not change: wipe the whole "HSM_AGENT_PIN=..." entry in place, then unset it.
    constexpr std::string_view kEntryName = "HSM_AGENT_PIN=";
    char* entry = const_cast<char*>(pin) - kEntryName.size();
    const std::size_t entry_size = kEntryName.size() + std::strlen(pin);
    ::unsetenv("HSM_AGENT_PIN");
    std::memset(entry, 0, entry_size);
  } else {
    throw ConfigError("no PIN: set --pin-file (or HSM_AGENT_PIN_FILE) or HSM_AGENT_PIN");
  }
  if (config.hsm.pin.empty()) throw ConfigError("the PIN is empty");
}

}  // namespace hsm::agent
