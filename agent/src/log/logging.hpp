// Operational logs: spdlog to stderr, as text or as one JSON object per line, with levels.
// Call init_logging once at start, before any thread logs. Thereafter use spdlog::info(...)
// etc. from any thread (spdlog's default logger is thread-safe).
// Never log the PIN, request data or signatures.
#pragma once

#include <string>

#include "config/agent_config.hpp"

namespace hsm::agent {

/// Throws ConfigError for an unknown level.
void init_logging(const std::string& level, LogFormat format);

/// A start-up failure, through spdlog to stderr and flushed: a JSON line (level "critical")
/// when init_logging chose JSON, else the one plain line `hsm-agent: <message>` (also before
/// init_logging, when the command line itself is wrong).
void log_startup_failure(const std::string& message);

}  // namespace hsm::agent
