// Operational logs: spdlog to stderr, as text or as one JSON object per line, with levels.
// Call init_logging once at start, before any thread logs. Thereafter use spdlog::info(...)
// etc. from any thread (spdlog's default logger is thread-safe).
// Never log the PIN, request data or signatures.
//
// The logger is asynchronous: a call queues the line (formatting happens on the logger's own
// thread) and returns; it never waits for stderr. When the queue is full (a stderr that blocks,
// a burst) the oldest queued line is dropped and counted (dropped_log_lines(), exported as
// hsm_agent_log_dropped_lines_total). Before an exit that skips static destructors
// (std::_Exit) call spdlog::shutdown(), which writes what is queued.
#pragma once

#include <cstdint>
#include <string>

#include "config/agent_config.hpp"

namespace hsm::agent {

/// Throws ConfigError for an unknown level.
void init_logging(const std::string& level, LogFormat format);

/// A start-up failure, through spdlog to stderr and flushed: a JSON line (level "critical")
/// when init_logging chose JSON, else the one plain line `hsm-agent: <message>` (also before
/// init_logging, when the command line itself is wrong).
void log_startup_failure(const std::string& message);

/// Returns once every line logged before the call is written to stderr, or after 2 s.
void flush_logs();

/// Lines dropped so far because the logger's queue was full.
[[nodiscard]] std::uint64_t dropped_log_lines();

}  // namespace hsm::agent
