// thread_preemptions(): how often the kernel has taken the CPU from the calling thread against
// its will (getrusage(RUSAGE_THREAD).ru_nivcsw). Latency mode (docs/performance.md) polls only
// while this stays still: a thread that is preempted while it polls or works is on a machine
// whose cores are all busy, where every microsecond it spins is taken from work.
#pragma once

#include <cstdint>

namespace hsm::common {

/// Involuntary context switches of the calling thread so far; 0 if the kernel cannot say.
[[nodiscard]] std::uint64_t thread_preemptions() noexcept;

}  // namespace hsm::common
