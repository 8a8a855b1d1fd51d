#include "metrics/process_collector.hpp"

#include <sys/resource.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <sstream>
#include <string>

#include "log/logging.hpp"

namespace hsm::agent {
namespace {

prometheus::MetricFamily gauge_family(std::string name, std::string help, double value,
                                      prometheus::MetricType type = prometheus::MetricType::Gauge) {
  prometheus::MetricFamily family;
  family.name = std::move(name);
  family.help = std::move(help);
  family.type = type;
  prometheus::ClientMetric metric;
  if (type == prometheus::MetricType::Counter) {
    metric.counter.value = value;
  } else {
    metric.gauge.value = value;
  }
  family.metric.push_back(std::move(metric));
  return family;
}

double boot_time_seconds() {
  std::ifstream stat("/proc/stat");
  std::string key;
  double value = 0;
  while (stat >> key) {
    if (key == "btime") {
      stat >> value;
      return value;
    }
    stat.ignore(std::numeric_limits<std::streamsize>::max(), '\n');
  }
  return 0;
}

}  // namespace

std::vector<prometheus::MetricFamily> ProcessCollector::Collect() const {
  std::vector<prometheus::MetricFamily> families;
  const auto ticks = static_cast<double>(::sysconf(_SC_CLK_TCK));
  const auto page = static_cast<double>(::sysconf(_SC_PAGESIZE));

  // /proc/self/stat: the command name (field 2) may hold spaces; fields after ')' are fixed.
  std::ifstream stat_file("/proc/self/stat");
  std::string stat((std::istreambuf_iterator<char>(stat_file)), std::istreambuf_iterator<char>());
  const auto close = stat.rfind(')');
  if (close != std::string::npos && ticks > 0) {
    std::istringstream fields(stat.substr(close + 2));
    std::string field;
    double utime = 0, stime = 0, starttime = 0, vsize = 0, rss = 0;
    // Field 3 (state) is the first after ')'. utime=14, stime=15, starttime=22, vsize=23, rss=24.
    for (int index = 3; fields >> field && index <= 24; ++index) {
      if (index == 14) utime = std::stod(field);
      if (index == 15) stime = std::stod(field);
      if (index == 22) starttime = std::stod(field);
      if (index == 23) vsize = std::stod(field);
      if (index == 24) rss = std::stod(field);
    }
    families.push_back(gauge_family("process_cpu_seconds_total",
                                    "Total user and system CPU time spent in seconds",
                                    (utime + stime) / ticks, prometheus::MetricType::Counter));
    families.push_back(
        gauge_family("process_virtual_memory_bytes", "Virtual memory size in bytes", vsize));
    families.push_back(
        gauge_family("process_resident_memory_bytes", "Resident memory size in bytes", rss * page));
    families.push_back(gauge_family("process_start_time_seconds",
                                    "Start time of the process since unix epoch in seconds",
                                    boot_time_seconds() + starttime / ticks));
  }

  std::error_code ec;
  double fds = 0;
  for (auto it = std::filesystem::directory_iterator("/proc/self/fd", ec);
       !ec && it != std::filesystem::directory_iterator(); it.increment(ec)) {
    ++fds;
  }
  families.push_back(gauge_family("process_open_fds", "Number of open file descriptors", fds));
  rlimit limit{};
  if (::getrlimit(RLIMIT_NOFILE, &limit) == 0) {
    families.push_back(gauge_family("process_max_fds", "Maximum number of open file descriptors",
                                    static_cast<double>(limit.rlim_cur)));
  }
  families.push_back(gauge_family(
      "hsm_agent_log_dropped_lines_total", "Log lines dropped because the logger's queue was full",
      static_cast<double>(dropped_log_lines()), prometheus::MetricType::Counter));
  return families;
}

}  // namespace hsm::agent
