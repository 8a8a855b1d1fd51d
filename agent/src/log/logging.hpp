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

}  // namespace hsm::agent
