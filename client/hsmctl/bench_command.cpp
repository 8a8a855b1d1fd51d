#include "bench_command.hpp"

#include <algorithm>
#include <array>
#include <atomic>
#include <cctype>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <iomanip>
#include <memory>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "encoding.hpp"
#include "latency_report.hpp"

namespace hsm::hsmctl {
namespace {

using bench::Clock;
using bench::ErrorLog;
using bench::LatencyHistogram;
using bench::MeasurementWindow;

/// Digest sizes for --digest: the hash each JOSE alg signs with. EdDSA signs the whole message
/// and takes no digest.
struct DigestSize {
  std::string_view alg;
  std::size_t bytes;
};
constexpr std::array kDigestSizes{
    DigestSize{"ES256", 32}, DigestSize{"ES256K", 32}, DigestSize{"RS256", 32},
    DigestSize{"PS256", 32}, DigestSize{"ES384", 48},  DigestSize{"RS384", 48},
    DigestSize{"PS384", 48}, DigestSize{"ES512", 64},  DigestSize{"RS512", 64},
    DigestSize{"PS512", 64},
};

std::size_t digest_size(const std::string& alg) {
  for (const auto& entry : kDigestSizes) {
    if (entry.alg == alg) return entry.bytes;
  }
  throw UsageError("--digest: " + alg + " takes no digest (it signs the whole message)");
}

/// The same bytes every run, so that runs compare; not secret, not a real hash.
Bytes fixed_payload(std::size_t size) {
  Bytes payload(size);
  for (std::size_t i = 0; i < size; ++i) payload[i] = static_cast<std::uint8_t>('a' + i % 26);
  return payload;
}

/// What every signer needs. Read-only while the run lasts.
struct SignJob {
  ClientOptions client;
  std::string kid;
  SignOptions sign;
  bool digest = false;
  Bytes payload;
  std::size_t signature_bytes = 0;  // what a good answer carries (from the probe signature)
};

std::string wrong_size(std::size_t got, std::size_t want) {
  return "signature of " + std::to_string(got) + " bytes, expected " + std::to_string(want);
}

/// D = 1: one thread, one connection, synchronous calls until the window ends.
void sync_sign_loop(const SignJob& job, const MeasurementWindow& window,
                    LatencyHistogram& latencies, ErrorLog& errors) {
  Client client(job.client);
  for (Clock::time_point now = Clock::now(); now < window.end;) {
    const Clock::time_point started = now;
    try {
      const Signature answer = job.digest
                                   ? client.sign_digest_detailed(job.kid, job.payload, job.sign)
                                   : client.sign_detailed(job.kid, job.payload, job.sign);
      now = Clock::now();
      if (answer.signature.size() != job.signature_bytes) {
        errors.record(wrong_size(answer.signature.size(), job.signature_bytes));
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
/// histogram is thread-safe. wait_until_drained() blocks the caller until the last call ends
/// (each ends by its deadline at the latest).
class PipelinedSigner {
 public:
  PipelinedSigner(const SignJob& job, const MeasurementWindow& window, LatencyHistogram& latencies,
                  ErrorLog& errors)
      : job_(job), window_(window), latencies_(latencies), errors_(errors), client_(job.client) {}
  PipelinedSigner(const PipelinedSigner&) = delete;
  PipelinedSigner& operator=(const PipelinedSigner&) = delete;
  /// The client (and its threads) goes first, before the members its callbacks use: every
  /// callback has run by the time ~Client returns.
  ~PipelinedSigner() = default;

  void start(unsigned depth) {
    {
      const std::lock_guard lock(mutex_);
      in_flight_ = depth;
    }
    for (unsigned i = 0; i < depth; ++i) issue();
  }

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
    auto done = [this, started](Outcome<Signature> outcome) { complete(started, outcome); };
    try {
      if (job_.digest) {
        client_.sign_digest_async(job_.kid, job_.payload, std::move(done), job_.sign);
      } else {
        client_.sign_async(job_.kid, job_.payload, std::move(done), job_.sign);
      }
    } catch (const std::exception& e) {
      errors_.record(e.what());
      retire();
    }
  }

  void complete(Clock::time_point started, const Outcome<Signature>& outcome) {
    const Clock::time_point now = Clock::now();
    if (!outcome.ok()) {
      errors_.record(outcome.error().what());
    } else if (outcome.value().signature.size() != job_.signature_bytes) {
      errors_.record(wrong_size(outcome.value().signature.size(), job_.signature_bytes));
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

  // Declaration order matters: the members the callbacks touch are declared before client_,
  // so they are destroyed after it.
  const SignJob& job_;
  const MeasurementWindow& window_;
  LatencyHistogram& latencies_;
  ErrorLog& errors_;
  std::mutex mutex_;
  unsigned in_flight_ = 0;  // calls started and not yet retired; guarded by mutex_
  std::condition_variable drained_;
  Client client_;
};

std::string lowercase(std::string text) {
  std::transform(text.begin(), text.end(), text.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return text;
}

std::string format_us(double microseconds) {
  std::ostringstream text;
  text << std::fixed << std::setprecision(1) << microseconds;
  return text.str();
}

class BenchCommand final : public Command {
 public:
  void define(CLI::App& command) override {
    command
        .add_option("kid", kid_,
                    "the key to sign with (default hsmctl-bench-<alg>, generated when missing)")
        ->type_name("KID");
    alg_ = command
               .add_option("--alg", alg_value_,
                           "sign with this alg (default: the key's; ES256 for a new key)")
               ->type_name("ALG");
    command.add_flag("--create-key", create_key_, "generate KID (with --alg) when it is missing");
    command.add_option("-c,--connections", connections_, "connections, one Client each")
        ->capture_default_str()
        ->check(CLI::Range(1U, 4096U));
    command
        .add_option("-d,--depth", depth_,
                    "signatures in flight per connection (1: synchronous calls, a thread each)")
        ->capture_default_str()
        ->check(CLI::Range(1U, 65536U));
    command.add_option("--duration", duration_s_, "measured seconds")
        ->type_name("S")
        ->capture_default_str()
        ->check(CLI::Range(0.001, 86400.0));
    command.add_option("--warmup", warmup_s_, "seconds of unmeasured signing first")
        ->type_name("S")
        ->capture_default_str()
        ->check(CLI::Range(0.0, 3600.0));
    command
        .add_option("--busy-poll-us", busy_poll_us_,
                    "latency mode: each synchronous call polls for its answer for up to N us "
                    "before it blocks (ClientOptions::busy_poll; 0: off; default: "
                    "HSM_CLIENT_BUSY_POLL_US, else 0)")
        ->type_name("N")
        ->check(CLI::Range(0, static_cast<int>(ClientOptions::kMaxBusyPoll.count())));
    auto* group = command.add_option_group("payload", "what each request signs (one of)");
    group->add_option("--data-bytes", data_bytes_, "a message of N bytes (default 32)")
        ->type_name("N");
    group->add_flag("--digest", digest_, "a digest of the alg's hash size (sign_digest)");
    group->require_option(0, 1);
    command
        .add_option("--server-pid", server_pids_,
                    "also report the CPU time per signature of this process and its children "
                    "(the agent's pid; repeatable)")
        ->type_name("PID");
  }

  ExitCode run(Context& context) override {
    if (data_bytes_ > context.max_input_bytes()) {
      throw UsageError("--data-bytes: at most " + std::to_string(context.max_input_bytes()));
    }
    Client& setup = context.client();
    const SignJob job = prepare(setup);
    return measure(context, job);
  }

 private:
  /// Finds (or makes) the key and signs once, which checks the whole path before the clock
  /// starts and tells the size of a good signature.
  SignJob prepare(Client& setup) {
    const bool default_kid = kid_.empty();
    const std::string new_key_alg = alg_->count() > 0 ? alg_value_ : "ES256";
    if (default_kid) kid_ = "hsmctl-bench-" + lowercase(new_key_alg);

    SignJob job;
    job.kid = kid_;
    std::string key_alg;
    try {
      key_alg = setup.get_public_key(kid_).alg;
    } catch (const Error& e) {
      if (e.errc() != Errc::kNotFound || !(default_kid || create_key_)) throw;
      key_alg = setup.generate_key(kid_, new_key_alg).alg;
      generated_ = true;
    }
    alg_used_ = alg_->count() > 0 ? alg_value_ : key_alg;
    if (alg_->count() > 0) job.sign.alg = alg_value_;
    job.digest = digest_;
    job.payload = fixed_payload(digest_ ? digest_size(alg_used_) : data_bytes_);

    job.client = setup.options();
    job.client.connections = 1;
    // A benchmark reports what the agent does: a failed call is an error, not a hidden retry.
    job.client.retry.max_attempts = 1;
    if (busy_poll_us_) job.client.busy_poll = std::chrono::microseconds(*busy_poll_us_);

    const Signature probe = digest_ ? setup.sign_digest_detailed(kid_, job.payload, job.sign)
                                    : setup.sign_detailed(kid_, job.payload, job.sign);
    job.signature_bytes = probe.signature.size();
    return job;
  }

  ExitCode measure(Context& context, const SignJob& job) {
    const auto latencies = bench::histograms_for(connections_);
    ErrorLog errors;
    const auto to_ms = [](double seconds) {
      return std::chrono::milliseconds(static_cast<std::int64_t>(seconds * 1000.0 + 0.5));
    };
    const MeasurementWindow window = MeasurementWindow::starting_now(
        to_ms(warmup_s_), std::max(to_ms(duration_s_), std::chrono::milliseconds(1)));
    bench::CpuSample cpu;
    if (depth_ == 1) {
      cpu = bench::run_in_threads(connections_, window, server_pids_, [&](std::size_t i) {
        sync_sign_loop(job, window, *latencies[i], errors);
      });
    } else {
      std::vector<std::unique_ptr<PipelinedSigner>> signers;
      for (unsigned i = 0; i < connections_; ++i) {
        signers.push_back(std::make_unique<PipelinedSigner>(job, window, *latencies[i], errors));
      }
      for (auto& signer : signers) signer->start(depth_);
      cpu = bench::cpu_during(window, server_pids_);
      for (auto& signer : signers) signer->wait_until_drained();
    }

    LatencyHistogram all;
    for (const auto& one : latencies) all.merge(*one);
    auto report = bench::finished_run_report("agent", std::uint64_t{connections_} * depth_, window,
                                             errors, cpu, !server_pids_.empty());
    report.latencies = &all;
    report.settings = {
        {"socket", bench::json_string(job.client.socket_path)},
        {"kid", bench::json_string(job.kid)},
        {"alg", bench::json_string(alg_used_)},
        {"key_generated", generated_ ? "true" : "false"},
        {"busy_poll_us",
         std::to_string(job.client.busy_poll.value_or(std::chrono::microseconds::zero()).count())},
        {"payload", bench::json_string(job.digest ? "digest" : "data")},
        {"payload_bytes", std::to_string(job.payload.size())},
        {"connections", std::to_string(connections_)},
        {"depth", std::to_string(depth_)}};
    if (context.json()) {
      bench::write_json(context.out(), report);
    } else {
      print_text(context.out(), report, job);
    }
    if (report.errors > 0 || all.count() == 0) {
      context.err() << "hsmctl: bench: " << report.errors << " failed calls"
                    << (report.first_error.empty() ? "" : "; first: " + report.first_error)
                    << (all.count() == 0 ? "; no signature completed in the window" : "") << '\n';
      return ExitCode::kAgentError;
    }
    return ExitCode::kOk;
  }

  void print_text(std::ostream& out, const bench::Report& report, const SignJob& job) const {
    const LatencyHistogram& all = *report.latencies;
    const double ops = static_cast<double>(all.count());
    const auto per_op = [ops](double seconds) {
      return format_us(ops > 0 ? seconds * 1e6 / ops : 0);
    };
    out << "key         " << job.kid << " (" << alg_used_ << (generated_ ? ", generated" : "")
        << "), signing " << (job.digest ? "a digest" : "a message") << " of " << job.payload.size()
        << " bytes\n"
        << "load        " << connections_ << " connection" << (connections_ == 1 ? "" : "s")
        << " x depth " << depth_ << " for " << format_us(report.seconds) << " s\n"
        << "signatures  " << all.count() << " (" << report.errors << " errors)\n"
        << "throughput  " << format_us(report.seconds > 0 ? ops / report.seconds : 0) << "/s\n"
        << "latency us  p50 " << format_us(all.percentile_us(0.50)) << "  p90 "
        << format_us(all.percentile_us(0.90)) << "  p99 " << format_us(all.percentile_us(0.99))
        << "  max " << format_us(all.max_us()) << "  mean " << format_us(all.mean_us()) << '\n'
        << "cpu us/sig  hsmctl " << per_op(report.cpu.self_seconds);
    if (report.has_server) out << "  server " << per_op(report.cpu.server_seconds);
    out << '\n';
    if (report.errors > 0) out << "first error " << report.first_error << '\n';
  }

  std::string kid_, alg_value_;
  CLI::Option* alg_ = nullptr;
  bool create_key_ = false;
  unsigned connections_ = 1;
  unsigned depth_ = 1;
  std::optional<int> busy_poll_us_;
  double duration_s_ = 5.0;
  double warmup_s_ = 0.5;
  std::size_t data_bytes_ = 32;
  bool digest_ = false;
  std::vector<int> server_pids_;
  // Found while running.
  std::string alg_used_;
  bool generated_ = false;
};

}  // namespace

std::unique_ptr<Command> make_bench_command() {
  return std::make_unique<BenchCommand>();
}

}  // namespace hsm::hsmctl
