#include "hsm/common/preemptions.hpp"

#include <sys/resource.h>

namespace hsm::common {

std::uint64_t thread_preemptions() noexcept {
  rusage usage{};
  if (::getrusage(RUSAGE_THREAD, &usage) != 0) {
    return 0;
  }
  return static_cast<std::uint64_t>(usage.ru_nivcsw);
}

}  // namespace hsm::common
