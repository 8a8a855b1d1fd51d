#include "call_stats.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <exception>
#include <thread>
#include <utility>

#include "stderr_report.hpp"

namespace hsm::fault {

CallStats::CallStats(std::string path) : path_(std::move(path)) {
  if (path_.empty()) {
    return;
  }
  try {
    std::thread([this] { write_loop(); }).detach();
  } catch (const std::exception& error) {
    report(std::string("cannot start the HSM_FAULT_STATS writer (") + error.what() +
           "); the stats file is written at C_Finalize only");
  }
}

void CallStats::write_loop() noexcept {
  while (true) {
    std::this_thread::sleep_for(kWriteInterval);
    if (dirty_.exchange(false, std::memory_order_relaxed)) {
      std::lock_guard lock(write_mutex_);
      write_file();
    }
  }
}

void CallStats::flush() noexcept {
  if (path_.empty()) {
    return;
  }
  std::lock_guard lock(write_mutex_);
  dirty_.store(false, std::memory_order_relaxed);
  write_file();
}

void CallStats::write_file() noexcept {
  try {
    // Snapshot under write_mutex_: counters only grow, so files written in lock order never go
    // backwards even when the writer thread and flush() race.
    std::string text;
    for (std::size_t i = 0; i < kFunctionCount; ++i) {
      const std::string name(kFunctionNames[i]);
      if (const auto calls = calls_[i].load(std::memory_order_relaxed); calls != 0) {
        text += name + ' ' + std::to_string(calls) + '\n';
      }
      if (const auto faults = injected_[i].load(std::memory_order_relaxed); faults != 0) {
        text += name + ".injected " + std::to_string(faults) + '\n';
      }
    }
    // Readers must never see a half-written file: write a private temporary, then rename.
    const std::string temporary = path_ + '.' + std::to_string(::getpid()) + ".tmp";
    const int fd = ::open(temporary.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    bool ok = fd >= 0;
    std::size_t written = 0;
    while (ok && written < text.size()) {
      const ssize_t n = ::write(fd, text.data() + written, text.size() - written);
      if (n < 0 && errno == EINTR) {
        continue;
      }
      ok = n > 0;
      if (ok) {
        written += static_cast<std::size_t>(n);
      }
    }
    if (fd >= 0 && ::close(fd) != 0) {
      ok = false;
    }
    if (ok && std::rename(temporary.c_str(), path_.c_str()) != 0) {
      ok = false;
    }
    if (!ok) {
      const int saved = errno;
      ::unlink(temporary.c_str());
      if (!write_failed_) {
        report("cannot write HSM_FAULT_STATS=" + path_ + ": " + errno_text(saved));
      }
    }
    write_failed_ = !ok;
  } catch (...) {
    // Out of memory building the text: skip this write; the next change tries again.
    dirty_.store(true, std::memory_order_relaxed);
  }
}

}  // namespace hsm::fault
