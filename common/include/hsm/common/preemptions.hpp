// thread_preemptions(): how often the kernel has taken the CPU from the calling thread against
// its will (getrusage(RUSAGE_THREAD).ru_nivcsw). Latency mode (docs/performance.md) polls only
// while this stays still: a thread that is preempted while it polls or works is on a machine
// whose cores are all busy, where every microsecond it spins is taken from work.
#pragma once

#include <chrono>
#include <cstdint>

namespace hsm::common {

/// How long polling stops, on both sides of the socket, once a polling thread was preempted
/// (docs/performance.md, "Latency mode": without it, two busy connections on two cores lost
/// 43 % at 200 µs).
inline constexpr std::chrono::milliseconds kPauseAfterPreemption{50};

/// Involuntary context switches of the calling thread so far; 0 if the kernel cannot say.
[[nodiscard]] std::uint64_t thread_preemptions() noexcept;

}  // namespace hsm::common
