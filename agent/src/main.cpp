// hsm-agent: wires the components together and owns the process lifecycle. Every failure at
// start is one line naming the problem and a non-zero exit; never a crash, never a PIN.
#include <prometheus/registry.h>
#include <spdlog/spdlog.h>
#include <sys/prctl.h>
#include <unistd.h>

#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <memory>
#include <optional>
#include <stdexcept>

#include "config/agent_config.hpp"
#include "log/audit_log.hpp"
#include "log/logging.hpp"
#include "metrics/agent_metrics.hpp"
#include "metrics/health_state.hpp"
#include "metrics/http_endpoint.hpp"
#include "metrics/process_collector.hpp"
#include "policy/access_control.hpp"
#include "policy/policy_file.hpp"
#include "policy/rate_limiter.hpp"
#include "server/server.hpp"
#include "server/socket_path.hpp"
#include "service/key_service.hpp"
#include "service/systemd_notifier.hpp"
#include "service/token_supervisor.hpp"

namespace {

constexpr int kExitConfig = 2;
constexpr int kExitStartup = 1;

int fail(const std::string& message, int code) {
  hsm::agent::log_startup_failure(message);  // JSON with --log-format json
  return code;
}

int run(int argc, char** argv) {
  using namespace hsm::agent;

  // No core dumps and no ptrace by processes of the same uid: the PIN lives in this memory.
  ::prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
  std::signal(SIGPIPE, SIG_IGN);

  ParsedCommandLine parsed;
  try {
    parsed = parse_config(argc, argv);
  } catch (const ConfigError& e) {
    return fail(e.what(), kExitConfig);
  }
  if (!parsed.config) return parsed.exit_code;
  AgentConfig& config = *parsed.config;

  try {
    init_logging(config.log_level, config.log_format);
    load_pin(config, [](const std::string& warning) { spdlog::warn("{}", warning); });
  } catch (const ConfigError& e) {
    return fail(e.what(), kExitConfig);
  }

  // Access rules are checked before the token is touched: a bad policy is a configuration
  // error, reported as such.
  std::optional<AccessControl> access;
  std::optional<RateLimiter> rate_limiter;
  try {
    access.emplace(config.access, config.hsm.read_only, ::getuid());
    rate_limiter.emplace(config.access);
  } catch (const PolicyError& e) {
    return fail(e.what(), kExitConfig);
  } catch (const std::invalid_argument& e) {
    return fail(e.what(), kExitConfig);
  }
  spdlog::info("access: {} ({} rules)", access->description(), access->rules()->size());

  auto registry = std::make_shared<prometheus::Registry>();
  AgentMetrics metrics(*registry, config.metrics_all_histograms);
  HealthState health;
  std::unique_ptr<AuditLog> audit;
  std::unique_ptr<KeyService> keys;
  try {
    audit = std::make_unique<AuditLog>(
        config.audit_log, AuditOptions{.fail_open = config.audit_fail_open}, metrics, health);
    const std::string module_path = config.hsm.module_path;
    keys = KeyService::open(std::move(config.hsm), metrics);
    metrics.build_info
        .Add({{"version", HSM_AGENT_VERSION},
              {"module", module_path},
              {"token_label", keys->token().label}})
        .Set(1);
    spdlog::info("token '{}' ({} {}, serial {}) ready with {} sessions", keys->token().label,
                 keys->token().manufacturer, keys->token().model, keys->token().serial,
                 config.hsm.sessions);
  } catch (const StartupError& e) {
    return fail(e.what(), kExitStartup);
  } catch (const std::exception& e) {
    return fail(e.what(), kExitStartup);
  }
  // Collected at scrape time; registered through the registry's collectable list.
  auto process_metrics = std::make_shared<ProcessCollector>();

  std::unique_ptr<HttpEndpoint> http;
  if (!config.metrics_listen.empty()) {
    try {
      http =
          std::make_unique<HttpEndpoint>(config.metrics_listen, registry, health, process_metrics);
      keys->set_metrics_url(http->metrics_url());
      spdlog::info("metrics on {}", http->metrics_url());
    } catch (const std::exception& e) {
      keys->close();
      return fail(e.what(), kExitStartup);
    }
  }

  // Probes the token every --probe-interval, drives /readyz and hsm_agent_hsm_up, and
  // re-initialises the token after a fault (docs/reliability.md). Stopped before keys->close().
  TokenSupervisor supervisor =
      keys->supervise(health, SupervisorOptions{.probe_interval = config.probe_interval});

  SystemdNotifier systemd(health);
  Server server({config, *keys, metrics, health, *access, *audit, *rate_limiter});
  try {
    server.run([&supervisor] { supervisor.set_serving(); },
               [&audit, &access] {
                 // SIGHUP, on a thread of its own (never the loop): rotate the audit log, re-read
                 // the policy (a bad file keeps the rules in force).
                 audit->reopen();
                 if (auto error = access->reload()) {
                   spdlog::error("policy not reloaded, keeping the current one: {}", error->what());
                 } else {
                   spdlog::info("access: {} ({} rules)", access->description(),
                                access->rules()->size());
                 }
               },
               [&systemd, &config] { systemd.ready(config.socket_path); },
               [&systemd] { systemd.stopping(); });
  } catch (const SocketSetupError& e) {
    (void)supervisor.stop();
    keys->close();
    return fail(e.what(), kExitStartup);
  }

  audit->close();  // every audit line is written before any of the exits below
  if (server.abandoned_threads()) {
    // A worker is stuck inside the token: finalising under it is undefined behaviour, and
    // destructors would wait for it. The socket is already gone; leave now.
    spdlog::warn("exiting with PKCS#11 calls still running");
    spdlog::shutdown();
    std::_Exit(0);
  }
  if (!supervisor.stop()) {
    // The supervisor is stuck inside the token (a hung re-initialisation or probe): same case.
    spdlog::warn("exiting with a token supervisor call still running");
    spdlog::shutdown();
    std::_Exit(0);
  }
  keys->close();
  spdlog::info("stopped");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  int code = kExitStartup;
  try {
    code = run(argc, argv);
  } catch (const std::exception& e) {
    code = fail(std::string("fatal: ") + e.what(), kExitStartup);
  }
  spdlog::shutdown();  // the logger's thread writes what is queued
  return code;
}
