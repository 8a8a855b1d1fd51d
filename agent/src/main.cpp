// hsm-agent: wires the components together and owns the process lifecycle. Every failure at
// start is one line naming the problem and a non-zero exit; never a crash, never a PIN.
#include <sys/prctl.h>
#include <unistd.h>

#include <prometheus/registry.h>
#include <spdlog/spdlog.h>

#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <memory>

#include "config/agent_config.hpp"
#include "log/audit_log.hpp"
#include "log/logging.hpp"
#include "metrics/agent_metrics.hpp"
#include "metrics/health_state.hpp"
#include "metrics/http_endpoint.hpp"
#include "metrics/process_collector.hpp"
#include "policy/access_control.hpp"
#include "server/server.hpp"
#include "server/socket_path.hpp"
#include "service/key_service.hpp"

namespace {

constexpr int kExitConfig = 2;
constexpr int kExitStartup = 1;

int fail(const std::string& message, int code) {
  std::fprintf(stderr, "hsm-agent: %s\n", message.c_str());
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

  auto registry = std::make_shared<prometheus::Registry>();
  AgentMetrics metrics(*registry);
  HealthState health;
  std::unique_ptr<AuditLog> audit;
  std::unique_ptr<KeyService> keys;
  try {
    audit = std::make_unique<AuditLog>(config.audit_log);
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
      http = std::make_unique<HttpEndpoint>(config.metrics_listen, registry, health,
                                            process_metrics);
      spdlog::info("metrics on http://{}/metrics", config.metrics_listen);
    } catch (const std::exception& e) {
      keys->close();
      return fail(e.what(), kExitStartup);
    }
  }

  AccessControl access(config.access, config.hsm.read_only, ::getuid());
  Server server({config, *keys, metrics, health, access, *audit});
  try {
    server.run([&health] { health.set_ready(); }, [&audit] { audit->reopen(); });
  } catch (const SocketSetupError& e) {
    keys->close();
    return fail(e.what(), kExitStartup);
  }

  audit->flush();
  if (server.abandoned_workers()) {
    // A worker is stuck inside the token: finalising under it is undefined behaviour, and
    // destructors would wait for it. The socket is already gone; leave now.
    spdlog::warn("exiting with PKCS#11 calls still running");
    spdlog::shutdown();
    std::_Exit(0);
  }
  keys->close();
  spdlog::info("stopped");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    return fail(std::string("fatal: ") + e.what(), kExitStartup);
  }
}
