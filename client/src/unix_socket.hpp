// The file descriptor of a connected Unix stream socket, and how to get one.
#pragma once

#include <string>

#include "hsm/common/file_descriptor.hpp"

namespace hsm::client {

/// Owns one file descriptor (the one owner type shared with the agent and the benchmarks).
using UniqueFd = common::FileDescriptor;

/// Connects to the Unix stream socket at `path` without ever blocking (a listener whose
/// backlog is full is a failure, like a missing one). The descriptor is close-on-exec and in
/// blocking mode. Throws hsm::Error(connection_failed) naming the path and the reason.
[[nodiscard]] UniqueFd connect_unix_socket(const std::string& path);

}  // namespace hsm::client
