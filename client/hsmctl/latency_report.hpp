// What the benchmarks measure and print: a latency histogram that many threads record into, the
// measurement window, CPU sampling and the one-line JSON report that bench/run.sh reads.
// Shared by `hsmctl bench` (through the agent) and bench/hsm-bench-direct (in-process PKCS#11,
// also over p11-kit) so that their numbers mean the same thing; it holds no PKCS#11, agent or
// client code. Built as its own small library (hsm_bench_report) so bench/ can link it alone.
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <ostream>
#include <string>
#include <utility>
#include <vector>

namespace hsm::bench {

using Clock = std::chrono::steady_clock;

/// A log-linear histogram of latencies in nanoseconds: exact below 64 ns, then 64 buckets per
/// power of two, so any percentile read from it is within 1/64 (1.6 %) of the true sample.
/// Fixed size, no allocation while recording.
///
/// Thread-safety: record() may be called from any number of threads at once (relaxed atomics;
/// give each thread its own histogram and merge() them afterwards to keep cache lines private).
/// merge() and the readers must not run concurrently with record() on the same histogram.
class LatencyHistogram {
 public:
  void record(Clock::duration latency) noexcept;
  /// Adds every sample of `other` into this one.
  void merge(const LatencyHistogram& other) noexcept;

  [[nodiscard]] std::uint64_t count() const noexcept;
  /// The latency below which a fraction `quantile` (0..1] of the samples lie, in microseconds
  /// (the middle of its bucket); 0 when there are no samples.
  [[nodiscard]] double percentile_us(double quantile) const noexcept;
  [[nodiscard]] double max_us() const noexcept;
  [[nodiscard]] double mean_us() const noexcept;

 private:
  static constexpr std::size_t kSubBuckets = 64;             // per power of two
  static constexpr std::size_t kBuckets = kSubBuckets * 59;  // covers every uint64 value
  [[nodiscard]] static std::size_t bucket_of(std::uint64_t nanoseconds) noexcept;
  [[nodiscard]] static double bucket_middle_ns(std::size_t bucket) noexcept;

  std::array<std::atomic<std::uint64_t>, kBuckets> counts_{};
  std::atomic<std::uint64_t> total_ns_{0};
  std::atomic<std::uint64_t> max_ns_{0};
};

/// When the benchmark counts: operations that complete inside [start, end) are sampled; the
/// warm-up before start is run but not counted. Workers stop issuing new work at end.
struct MeasurementWindow {
  Clock::time_point start;
  Clock::time_point end;

  [[nodiscard]] static MeasurementWindow starting_now(std::chrono::milliseconds warmup,
                                                      std::chrono::milliseconds duration);
  [[nodiscard]] bool counts(Clock::time_point completed) const noexcept {
    return completed >= start && completed < end;
  }
  [[nodiscard]] double seconds() const noexcept {
    return std::chrono::duration<double>(end - start).count();
  }
};

/// CPU time (user + system, in seconds) spent by this process, and by other processes (each
/// with all its descendants, e.g. p11-kit server's per-connection children) named by pid.
/// A load-independent measure of cost: on a busy machine wall-clock numbers are noisy, CPU
/// seconds per signature much less so. Reads /proc; an unreadable pid counts as zero.
struct CpuSample {
  double self_seconds = 0;
  double server_seconds = 0;
};
[[nodiscard]] CpuSample sample_cpu(const std::vector<int>& server_pids);
/// The CPU spent inside `window`: sleeps until its start, samples, sleeps until its end,
/// samples, and returns the difference. Called by the main thread while the workers run.
[[nodiscard]] CpuSample cpu_during(const MeasurementWindow& window,
                                   const std::vector<int>& server_pids);

/// One run's result, printed as one JSON object on one line.
struct Report {
  std::string mode;  ///< "direct" (hsm-bench-direct) or "agent" (hsmctl bench)
  /// Settings echoed back (module path, threads, depth, ...): key and value already in JSON
  /// (a number, or a string made with json_string()).
  std::vector<std::pair<std::string, std::string>> settings;
  std::uint64_t concurrency = 0;  ///< operations in flight at once
  double seconds = 0;
  std::uint64_t errors = 0;
  std::string first_error;  ///< empty when errors == 0
  const LatencyHistogram* latencies = nullptr;
  /// CPU used during the window (end minus start sample); reported per operation.
  CpuSample cpu;
  bool has_server = false;  ///< whether cpu.server_seconds was measured (--server-pid)
};

/// `text` as a JSON string literal (quotes and escapes added).
[[nodiscard]] std::string json_string(const std::string& text);

/// Writes {"mode":..., settings..., "concurrency", "duration_s", "ops", "errors",
/// "throughput_per_s", "latency_us": {"p50","p90","p99","max","mean"}, "cpu_us_per_op":
/// {"client", "server"?}, "first_error"?} and a newline.
void write_json(std::ostream& out, const Report& report);

/// Errors seen by every signing thread: a count and the first message, for the report.
/// Thread-safety: every member from any thread.
class ErrorLog {
 public:
  void record(std::string what) {
    errors_.fetch_add(1, std::memory_order_relaxed);
    const std::lock_guard lock(mutex_);
    if (first_.empty()) first_ = std::move(what);
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

/// One histogram per measuring thread (each records into its own; write_run_json() merges).
[[nodiscard]] std::vector<std::unique_ptr<LatencyHistogram>> histograms_for(std::size_t threads);

/// Runs work(0) .. work(threads - 1), each on its own thread, while the calling thread samples
/// the CPU spent inside `window` (cpu_during); returns that once every thread has returned.
CpuSample run_in_threads(std::size_t threads, const MeasurementWindow& window,
                         const std::vector<int>& server_pids,
                         const std::function<void(std::size_t)>& work);

/// The report of a finished run, as every benchmark program ends: the measured window, the
/// errors and CPU time. Its latencies are set by the caller (or by write_run_json()).
[[nodiscard]] Report finished_run_report(std::string mode, std::uint64_t concurrency,
                                         const MeasurementWindow& window, const ErrorLog& errors,
                                         const CpuSample& cpu, bool has_server);

/// How hsm-bench-direct and hsm-bench-floor end: the threads' histograms merged into the
/// report, its JSON line written to `out` and flushed. Returns the exit status: 0 when anything
/// was measured.
int write_run_json(std::ostream& out, Report report,
                   const std::vector<std::unique_ptr<LatencyHistogram>>& per_thread);

}  // namespace hsm::bench
