#include "latency_report.hpp"

#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

namespace hsm::bench {

std::size_t LatencyHistogram::bucket_of(std::uint64_t nanoseconds) noexcept {
  if (nanoseconds < kSubBuckets) return static_cast<std::size_t>(nanoseconds);
  // The top seven bits of the value pick the bucket: the power of two, then 64 steps in it.
  const auto power = static_cast<unsigned>(std::bit_width(nanoseconds) - 1);  // >= 6
  const auto shift = power - 6;
  const auto step = static_cast<std::size_t>(nanoseconds >> shift) - kSubBuckets;
  return kSubBuckets * (power - 5) + step;
}

double LatencyHistogram::bucket_middle_ns(std::size_t bucket) noexcept {
  if (bucket < kSubBuckets) return static_cast<double>(bucket);
  const std::size_t shift = bucket / kSubBuckets - 1;
  const std::size_t step = bucket % kSubBuckets;
  const double width = std::ldexp(1.0, static_cast<int>(shift));
  return static_cast<double>(kSubBuckets + step) * width + width / 2;
}

void LatencyHistogram::record(Clock::duration latency) noexcept {
  const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(latency).count();
  const std::uint64_t value = ns > 0 ? static_cast<std::uint64_t>(ns) : 0;
  counts_[bucket_of(value)].fetch_add(1, std::memory_order_relaxed);
  total_ns_.fetch_add(value, std::memory_order_relaxed);
  std::uint64_t seen = max_ns_.load(std::memory_order_relaxed);
  while (value > seen && !max_ns_.compare_exchange_weak(seen, value, std::memory_order_relaxed)) {
  }
}

void LatencyHistogram::merge(const LatencyHistogram& other) noexcept {
  for (std::size_t i = 0; i < kBuckets; ++i) {
    counts_[i].fetch_add(other.counts_[i].load(std::memory_order_relaxed),
                         std::memory_order_relaxed);
  }
  total_ns_.fetch_add(other.total_ns_.load(std::memory_order_relaxed), std::memory_order_relaxed);
  max_ns_.store(std::max(max_ns_.load(std::memory_order_relaxed),
                         other.max_ns_.load(std::memory_order_relaxed)),
                std::memory_order_relaxed);
}

std::uint64_t LatencyHistogram::count() const noexcept {
  std::uint64_t total = 0;
  for (const auto& bucket : counts_) total += bucket.load(std::memory_order_relaxed);
  return total;
}

double LatencyHistogram::percentile_us(double quantile) const noexcept {
  const std::uint64_t total = count();
  if (total == 0) return 0;
  // The rank of the sample that answers: ceil(q * n), at least the first one.
  const auto rank = std::max<std::uint64_t>(
      1, static_cast<std::uint64_t>(std::ceil(quantile * static_cast<double>(total))));
  std::uint64_t seen = 0;
  for (std::size_t i = 0; i < kBuckets; ++i) {
    seen += counts_[i].load(std::memory_order_relaxed);
    if (seen >= rank) return std::min(bucket_middle_ns(i) / 1000.0, max_us());
  }
  return max_us();
}

double LatencyHistogram::max_us() const noexcept {
  return static_cast<double>(max_ns_.load(std::memory_order_relaxed)) / 1000.0;
}

double LatencyHistogram::mean_us() const noexcept {
  const std::uint64_t total = count();
  if (total == 0) return 0;
  return static_cast<double>(total_ns_.load(std::memory_order_relaxed)) /
         static_cast<double>(total) / 1000.0;
}

MeasurementWindow MeasurementWindow::starting_now(std::chrono::milliseconds warmup,
                                                  std::chrono::milliseconds duration) {
  const Clock::time_point start = Clock::now() + warmup;
  return {start, start + duration};
}

namespace {

/// utime + stime of one process, in clock ticks; 0 when it cannot be read.
std::uint64_t process_ticks(int pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string text;
  if (!std::getline(in, text)) return 0;
  // The command name (field 2) may hold spaces; fields are counted after its closing ')'.
  const auto close = text.rfind(')');
  if (close == std::string::npos) return 0;
  std::istringstream fields(text.substr(close + 2));
  std::string field;
  std::uint64_t utime = 0, stime = 0;
  for (int index = 3; fields >> field; ++index) {
    if (index == 14) utime = std::strtoull(field.c_str(), nullptr, 10);
    if (index == 15) {
      stime = std::strtoull(field.c_str(), nullptr, 10);
      break;
    }
  }
  return utime + stime;
}

/// The pids of `pid`'s children (every thread's), from /proc/<pid>/task/<tid>/children.
std::vector<int> children_of(int pid) {
  std::vector<int> children;
  std::error_code error;
  const std::filesystem::path tasks = "/proc/" + std::to_string(pid) + "/task";
  for (const auto& task : std::filesystem::directory_iterator(tasks, error)) {
    std::ifstream in(task.path() / "children");
    for (int child = 0; in >> child;) children.push_back(child);
  }
  return children;
}

std::uint64_t tree_ticks(int pid, int depth) {
  std::uint64_t ticks = process_ticks(pid);
  if (depth < 8) {
    for (const int child : children_of(pid)) ticks += tree_ticks(child, depth + 1);
  }
  return ticks;
}

}  // namespace

CpuSample sample_cpu(const std::vector<int>& server_pids) {
  CpuSample sample;
  rusage usage{};
  if (::getrusage(RUSAGE_SELF, &usage) == 0) {
    const auto seconds = [](const timeval& t) {
      return static_cast<double>(t.tv_sec) + static_cast<double>(t.tv_usec) / 1e6;
    };
    sample.self_seconds = seconds(usage.ru_utime) + seconds(usage.ru_stime);
  }
  const auto ticks_per_second = static_cast<double>(::sysconf(_SC_CLK_TCK));
  std::uint64_t ticks = 0;
  for (const int pid : server_pids) ticks += tree_ticks(pid, 0);
  sample.server_seconds = static_cast<double>(ticks) / ticks_per_second;
  return sample;
}

CpuSample cpu_during(const MeasurementWindow& window, const std::vector<int>& server_pids) {
  std::this_thread::sleep_until(window.start);
  const CpuSample start = sample_cpu(server_pids);
  std::this_thread::sleep_until(window.end);
  const CpuSample end = sample_cpu(server_pids);
  return {end.self_seconds - start.self_seconds, end.server_seconds - start.server_seconds};
}

std::string json_string(const std::string& text) {
  // Bytes that are not UTF-8 (an agent's error message) become U+FFFD: the line stays JSON.
  return nlohmann::json(text).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

namespace {

/// A number with a fixed number of decimals (JSON has no NaN or infinity; none arise here).
std::string fixed(double value, int decimals) {
  char text[64];
  std::snprintf(text, sizeof text, "%.*f", decimals, value);
  return text;
}

}  // namespace

void write_json(std::ostream& out, const Report& report) {
  const LatencyHistogram empty;
  const LatencyHistogram& latencies = report.latencies != nullptr ? *report.latencies : empty;
  const std::uint64_t ops = latencies.count();
  out << "{\"mode\":" << json_string(report.mode);
  for (const auto& [key, value] : report.settings) {
    out << ',' << json_string(key) << ':' << value;
  }
  out << ",\"concurrency\":" << report.concurrency << ",\"duration_s\":" << fixed(report.seconds, 3)
      << ",\"ops\":" << ops << ",\"errors\":" << report.errors << ",\"throughput_per_s\":"
      << fixed(report.seconds > 0 ? static_cast<double>(ops) / report.seconds : 0.0, 1)
      << ",\"latency_us\":{\"p50\":" << fixed(latencies.percentile_us(0.50), 1)
      << ",\"p90\":" << fixed(latencies.percentile_us(0.90), 1)
      << ",\"p99\":" << fixed(latencies.percentile_us(0.99), 1)
      << ",\"max\":" << fixed(latencies.max_us(), 1)
      << ",\"mean\":" << fixed(latencies.mean_us(), 1) << '}';
  const auto per_op_us = [ops](double seconds) {
    return fixed(ops > 0 ? seconds * 1e6 / static_cast<double>(ops) : 0.0, 1);
  };
  out << ",\"cpu_us_per_op\":{\"client\":" << per_op_us(report.cpu.self_seconds);
  if (report.has_server) out << ",\"server\":" << per_op_us(report.cpu.server_seconds);
  out << '}';
  if (report.errors > 0) out << ",\"first_error\":" << json_string(report.first_error);
  out << "}\n";
}

std::vector<std::unique_ptr<LatencyHistogram>> histograms_for(std::size_t threads) {
  std::vector<std::unique_ptr<LatencyHistogram>> histograms;
  histograms.reserve(threads);
  for (std::size_t i = 0; i < threads; ++i)
    histograms.push_back(std::make_unique<LatencyHistogram>());
  return histograms;
}

CpuSample run_in_threads(std::size_t threads, const MeasurementWindow& window,
                         const std::vector<int>& server_pids,
                         const std::function<void(std::size_t)>& work) {
  std::vector<std::jthread> running;
  running.reserve(threads);
  for (std::size_t i = 0; i < threads; ++i) running.emplace_back(work, i);
  return cpu_during(window, server_pids);  // the jthreads join on the way out
}

Report finished_run_report(std::string mode, std::uint64_t concurrency,
                           const MeasurementWindow& window, const ErrorLog& errors,
                           const CpuSample& cpu, bool has_server) {
  Report report;
  report.mode = std::move(mode);
  report.concurrency = concurrency;
  report.seconds = window.seconds();
  report.errors = errors.count();
  report.first_error = errors.first();
  report.cpu = cpu;
  report.has_server = has_server;
  return report;
}

int write_run_json(std::ostream& out, Report report,
                   const std::vector<std::unique_ptr<LatencyHistogram>>& per_thread) {
  LatencyHistogram all;
  for (const auto& one : per_thread) all.merge(*one);
  report.latencies = &all;
  write_json(out, report);
  out.flush();
  return all.count() > 0 ? 0 : 1;
}

}  // namespace hsm::bench
