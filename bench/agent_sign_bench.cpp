// hsm-bench-agent: ES256 signing through a running hsm-agent with the hsm::client library, the
// way an application would, reporting the same JSON line as hsm-bench-direct
// (latency_report.hpp) so that the two can be divided.
//
// Load shapes (N = --connections, D = --depth; N x D requests are in flight at once):
//   D = 1: N threads, each with its own Client (one connection) calling the synchronous sign();
//          the closest match to N direct threads.
//   D > 1: N Clients (one connection each), each keeping D sign_async() calls in flight; a
//          completion callback records the latency and starts the next call (closed loop).
// Each request is `sign` with a fixed 32-byte message as `data`: the agent hashes it (SHA-256)
// and signs the digest, exactly what hsm-bench-direct does in-process.

#include <hsm/client.hpp>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <array>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <iostream>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "latency_report.hpp"

namespace hsm::bench {
namespace {

constexpr std::size_t kEs256SignatureBytes = 64;
constexpr std::array<std::uint8_t, 32> kMessage = {
    'h', 's', 'm', '-', 's', 'i', 'd', 'e', 'c', 'a', 'r', ' ', 'b', 'e', 'n', 'c',
    'h', ' ', 'm', 'e', 's', 's', 'a', 'g', 'e', ' ', '3', '2', 'b', 'y', 't', 'e'};

struct Options {
  std::string socket = default_socket_path();
  std::string kid = "bench-es256";
  bool create_key = false;
  bool setup_only = false;
  unsigned connections = 1;
  unsigned depth = 1;
  unsigned duration_ms = 5000;
  unsigned warmup_ms = 500;
  unsigned timeout_ms = 5000;
  std::vector<int> server_pids;  // whose CPU time to report (hsm-agent)
};

ClientOptions client_options(const Options& options) {
  ClientOptions client;
  client.socket_path = options.socket;
  client.timeout = std::chrono::milliseconds(options.timeout_ms);
  client.connections = 1;
  return client;
}

/// Errors seen by every signer: a count and the first message, for the report.
/// Thread-safety: record() from any thread.
class ErrorLog {
 public:
  void record(const std::string& what) {
    errors_.fetch_add(1, std::memory_order_relaxed);
    const std::lock_guard lock(mutex_);
    if (first_.empty()) first_ = what;
  }
  [[nodiscard]] std::uint64_t count() const noexcept {
    return errors_.load(std::memory_order_relaxed);
  }
  [[nodiscard]] std::string first() const {
    const std::lock_guard lock(mutex_);
    return first_;
  }

 private:
  std::atomic<std::uint64_t> errors_{0};
  mutable std::mutex mutex_;
  std::string first_;
};

/// Checks that `kid` is an ES256 key on the agent, creating it when asked and missing.
void prepare_key(Client& client, const Options& options) {
  try {
    const PublicKey key = client.get_public_key(options.kid);
    if (key.alg != "ES256") {
      throw std::runtime_error("key '" + options.kid + "' is " + key.alg + ", not ES256");
    }
  } catch (const Error& e) {
    if (e.code() != "not_found" || !options.create_key) throw;
    client.generate_key(options.kid, std::string("ES256"));
  }
}

/// D = 1: one thread, one connection, synchronous calls.
void sync_sign_loop(const Options& options, const MeasurementWindow& window,
                    LatencyHistogram& latencies, ErrorLog& errors) {
  Client client(client_options(options));
  for (Clock::time_point now = Clock::now(); now < window.end;) {
    const Clock::time_point started = now;
    try {
      const Bytes signature = client.sign(options.kid, kMessage);
      now = Clock::now();
      if (signature.size() != kEs256SignatureBytes) {
        errors.record("signature of " + std::to_string(signature.size()) + " bytes, not 64");
      } else if (window.counts(now)) {
        latencies.record(now - started);
      }
    } catch (const std::exception& e) {
      now = Clock::now();
      errors.record(e.what());
    }
  }
}

/// D > 1: one connection that keeps `depth` asynchronous calls in flight until the window ends.
/// Thread-safety: callbacks run on the client's threads; the counters are atomics and the
/// histogram is thread-safe. wait_until_drained() blocks the caller until the last call ends.
class PipelinedSigner {
 public:
  PipelinedSigner(const Options& options, const MeasurementWindow& window,
                  LatencyHistogram& latencies, ErrorLog& errors)
      : client_(client_options(options)),
        kid_(options.kid),
        window_(window),
        latencies_(latencies),
        errors_(errors) {}
  PipelinedSigner(const PipelinedSigner&) = delete;
  PipelinedSigner& operator=(const PipelinedSigner&) = delete;
  /// The client (and its threads) goes last: every callback has run by then.
  ~PipelinedSigner() = default;

  void start(unsigned depth) {
    {
      const std::lock_guard lock(mutex_);
      in_flight_ = depth;
    }
    for (unsigned i = 0; i < depth; ++i) issue();
  }

  /// Blocks until every call has completed (each ends by its deadline at the latest).
  void wait_until_drained() {
    std::unique_lock lock(mutex_);
    drained_.wait(lock, [this] { return in_flight_ == 0; });
  }

 private:
  /// Starts one call, or retires this slot when the window is over.
  void issue() {
    const Clock::time_point started = Clock::now();
    if (started >= window_.end) {
      retire();
      return;
    }
    try {
      client_.sign_async(kid_, kMessage,
                         [this, started](Outcome<Signature> outcome) { done(started, outcome); });
    } catch (const std::exception& e) {
      errors_.record(e.what());
      retire();
    }
  }

  void done(Clock::time_point started, const Outcome<Signature>& outcome) {
    const Clock::time_point now = Clock::now();
    if (!outcome.ok()) {
      errors_.record(outcome.error().what());
    } else if (outcome.value().signature.size() != kEs256SignatureBytes) {
      errors_.record("signature of " + std::to_string(outcome.value().signature.size()) +
                     " bytes, not 64");
    } else if (window_.counts(now)) {
      latencies_.record(now - started);
    }
    issue();
  }

  /// Under the mutex, so that wait_until_drained() cannot return (and the owner destroy this
  /// object) between the last decrement and the notification.
  void retire() {
    const std::lock_guard lock(mutex_);
    if (--in_flight_ == 0) drained_.notify_all();
  }

  Client client_;
  std::string kid_;
  const MeasurementWindow& window_;
  LatencyHistogram& latencies_;
  ErrorLog& errors_;
  std::mutex mutex_;
  unsigned in_flight_ = 0;  // calls started and not yet retired; guarded by mutex_
  std::condition_variable drained_;
};

int run(const Options& options) {
  {
    Client setup(client_options(options));
    prepare_key(setup, options);
  }
  if (options.setup_only) {
    std::cerr << "hsm-bench-agent: key '" << options.kid << "' is ready\n";
    return 0;
  }

  std::vector<std::unique_ptr<LatencyHistogram>> latencies;
  for (unsigned i = 0; i < options.connections; ++i) {
    latencies.push_back(std::make_unique<LatencyHistogram>());
  }
  ErrorLog errors;
  const MeasurementWindow window =
      MeasurementWindow::starting_now(std::chrono::milliseconds(options.warmup_ms),
                                      std::chrono::milliseconds(options.duration_ms));
  CpuSample cpu;
  if (options.depth == 1) {
    std::vector<std::jthread> threads;
    for (unsigned i = 0; i < options.connections; ++i) {
      threads.emplace_back(sync_sign_loop, std::cref(options), std::cref(window),
                           std::ref(*latencies[i]), std::ref(errors));
    }
    cpu = cpu_during(window, options.server_pids);
  } else {
    std::vector<std::unique_ptr<PipelinedSigner>> signers;
    for (unsigned i = 0; i < options.connections; ++i) {
      signers.push_back(
          std::make_unique<PipelinedSigner>(options, window, *latencies[i], errors));
    }
    for (auto& signer : signers) signer->start(options.depth);
    cpu = cpu_during(window, options.server_pids);
    for (auto& signer : signers) signer->wait_until_drained();
  }

  LatencyHistogram all;
  for (const auto& one : latencies) all.merge(*one);
  Report report;
  report.mode = "agent";
  report.settings = {{"socket", json_string(options.socket)},
                     {"connections", std::to_string(options.connections)},
                     {"depth", std::to_string(options.depth)}};
  report.concurrency = std::uint64_t{options.connections} * options.depth;
  report.seconds = window.seconds();
  report.errors = errors.count();
  report.first_error = errors.first();
  report.latencies = &all;
  report.cpu = cpu;
  report.has_server = !options.server_pids.empty();
  write_json(std::cout, report);
  std::cout.flush();
  return all.count() > 0 ? 0 : 1;
}

}  // namespace
}  // namespace hsm::bench

int main(int argc, char** argv) {
  hsm::bench::Options options;
  CLI::App app{"hsm-bench-agent: ES256 signing throughput and latency through hsm-agent"};
  app.add_option("--socket", options.socket, "the agent's Unix socket")->capture_default_str();
  app.add_option("--kid", options.kid, "the ES256 key to sign with")->capture_default_str();
  app.add_flag("--create-key", options.create_key, "generate the key when it is missing");
  app.add_flag("--setup-only", options.setup_only, "check (or create) the key and exit");
  app.add_option("--connections", options.connections, "client connections (one Client each)")
      ->capture_default_str()
      ->check(CLI::Range(1U, 4096U));
  app.add_option("--depth", options.depth,
                 "requests in flight per connection (1: synchronous calls, one thread each)")
      ->capture_default_str()
      ->check(CLI::Range(1U, 65536U));
  app.add_option("--duration-ms", options.duration_ms, "measured time")
      ->capture_default_str()
      ->check(CLI::Range(1U, 3'600'000U));
  app.add_option("--warmup-ms", options.warmup_ms, "signing before the measurement starts")
      ->capture_default_str();
  app.add_option("--timeout-ms", options.timeout_ms, "per-call deadline")
      ->capture_default_str()
      ->check(CLI::Range(1U, 3'600'000U));
  app.add_option("--server-pid", options.server_pids,
                 "also report the CPU time of this process and its children (repeatable)");
  CLI11_PARSE(app, argc, argv);
  try {
    return hsm::bench::run(options);
  } catch (const std::exception& e) {
    std::cerr << "hsm-bench-agent: " << e.what() << '\n';
    return 1;
  }
}
