// The agent's FileDescriptor is hsm::common's (common/include/hsm/common/file_descriptor.hpp).
#pragma once

#include "hsm/common/file_descriptor.hpp"

namespace hsm::agent {

using common::FileDescriptor;

}  // namespace hsm::agent
