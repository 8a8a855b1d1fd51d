// hsm-bench-direct: the baseline. Loads a PKCS#11 module in-process (dlopen, as an application
// without the agent would), logs in once, finds the ES256 key once, then T threads each with its
// own session sign for a fixed time. Each signature is what the agent does for a `sign` request:
// SHA-256 of a fixed 32-byte message (OpenSSL), C_SignInit(CKM_ECDSA) + one C_Sign into a
// buffer sized in advance (es256_token.hpp). Prints one JSON line (latency_report.hpp) on stdout.
//
// It shares no code with the agent, so the agent's overhead is measured against an independent
// implementation; it shares its PKCS#11 code with hsm-bench-floor, which makes the very same
// signatures behind a process boundary. The same program measures p11-kit remoting when
// --module is p11-kit-client.so (P11_KIT_SERVER_ADDRESS in the environment).
//
// The PIN is read from --pin-file only (never argv), held in a buffer wiped after C_Login.

#include <CLI/CLI.hpp>
#include <algorithm>
#include <array>
#include <exception>
#include <iostream>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "es256_token.hpp"
#include "latency_report.hpp"

namespace hsm::bench {
namespace {

// ---- The run ---------------------------------------------------------------------------------

struct Options {
  std::string module;
  std::string token_label;
  std::string pin_file;
  std::string kid = "bench-es256";
  bool create_key = false;
  bool setup_only = false;
  unsigned threads = 1;
  unsigned duration_ms = 5000;
  unsigned warmup_ms = 500;
  std::vector<int> server_pids;  // whose CPU time to report (p11-kit server)
};

/// One thread's loop: sign until the window ends, sampling what completes inside it.
void sign_loop(const Session& session, CK_OBJECT_HANDLE key, const MeasurementWindow& window,
               LatencyHistogram& latencies, ErrorLog& errors) {
  std::array<CK_BYTE, kSignatureBufferBytes> signature{};
  for (Clock::time_point now = Clock::now(); now < window.end;) {
    const Clock::time_point started = now;
    const std::optional<std::string> failure = sign_es256(session, key, kBenchMessage, signature);
    now = Clock::now();
    if (failure) {
      errors.record(*failure);
    } else if (window.counts(now)) {
      latencies.record(now - started);
    }
  }
}

int run(const Options& options) {
  const Es256Token token({.module = options.module,
                          .token_label = options.token_label,
                          .pin_file = options.pin_file,
                          .kid = options.kid,
                          .create_key = options.create_key});
  if (options.setup_only) {
    std::cerr << "hsm-bench-direct: key '" << options.kid << "' is ready\n";
    return 0;
  }
  // Every session of this process shares the token's one login.
  std::vector<std::unique_ptr<Session>> sessions;
  for (unsigned i = 0; i < std::max(1U, options.threads); ++i) {
    sessions.push_back(token.open_session());
  }

  const auto latencies = histograms_for(sessions.size());
  ErrorLog errors;
  const MeasurementWindow window = MeasurementWindow::starting_now(
      std::chrono::milliseconds(options.warmup_ms), std::chrono::milliseconds(options.duration_ms));
  const CpuSample cpu = run_in_threads(
      sessions.size(), window, options.server_pids,
      [&](std::size_t i) { sign_loop(*sessions[i], token.key(), window, *latencies[i], errors); });

  auto report = finished_run_report("direct", sessions.size(), window, errors, cpu,
                                    !options.server_pids.empty());
  report.settings = {{"module", json_string(options.module)},
                     {"threads", std::to_string(sessions.size())}};
  return write_run_json(std::cout, std::move(report), latencies);
}

}  // namespace
}  // namespace hsm::bench

int main(int argc, char** argv) {
  hsm::bench::Options options;
  CLI::App app{"hsm-bench-direct: ES256 signing throughput and latency, in-process PKCS#11"};
  app.add_option("--module", options.module, "PKCS#11 module to dlopen")->required();
  app.add_option("--token-label", options.token_label, "token label (default: the first token)");
  app.add_option("--pin-file", options.pin_file, "file holding the user PIN")->required();
  app.add_option("--kid", options.kid, "CKA_LABEL of the ES256 private key")->capture_default_str();
  app.add_flag("--create-key", options.create_key, "generate the key when it is missing");
  app.add_flag("--setup-only", options.setup_only, "log in, find or create the key, and exit");
  app.add_option("--threads", options.threads, "signing threads, one session each")
      ->capture_default_str()
      ->check(CLI::Range(1U, 4096U));
  app.add_option("--duration-ms", options.duration_ms, "measured time")
      ->capture_default_str()
      ->check(CLI::Range(1U, 3'600'000U));
  app.add_option("--warmup-ms", options.warmup_ms, "signing before the measurement starts")
      ->capture_default_str();
  app.add_option("--server-pid", options.server_pids,
                 "also report the CPU time of this process and its children (repeatable)");
  CLI11_PARSE(app, argc, argv);
  try {
    return hsm::bench::run(options);
  } catch (const std::exception& e) {
    std::cerr << "hsm-bench-direct: " << e.what() << '\n';
    return 1;
  }
}
