// HeapTrimmer: trims at its interval on its own thread, stops at once, and the trim it runs by
// default does give freed heap pages back (RSS read from /proc/self/statm).
#include "server/heap_trimmer.hpp"

#include <unistd.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <thread>
#include <vector>

namespace hsm::agent {
namespace {

using namespace std::chrono_literals;

[[maybe_unused]] std::size_t resident_bytes() {  // unused under a sanitizer
  std::ifstream statm("/proc/self/statm");
  std::size_t size_pages = 0;
  std::size_t resident_pages = 0;
  statm >> size_pages >> resident_pages;
  return resident_pages * static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
}

bool wait_until(const std::function<bool()>& condition) {
  for (int i = 0; i < 10'000; ++i) {  // 10 s at most: only a broken trimmer gets there
    if (condition()) return true;
    std::this_thread::sleep_for(1ms);
  }
  return condition();
}

TEST_CASE("heap trimmer: trims at each interval, and never again once destroyed",
          "[heap_trimmer]") {
  std::atomic<int> trims{0};
  std::atomic<std::thread::id> trimmed_on{};
  {
    HeapTrimmer trimmer(2ms, [&] {
      trimmed_on = std::this_thread::get_id();
      ++trims;
      return false;
    });
    CHECK(wait_until([&] { return trims.load() >= 3; }));
  }
  CHECK(trimmed_on.load() != std::this_thread::get_id());  // its own thread, not the caller's
  const int after_destruction = trims.load();
  std::this_thread::sleep_for(20ms);
  CHECK(trims.load() == after_destruction);
}

TEST_CASE("heap trimmer: trim_soon trims at once, not at the end of a long interval",
          "[heap_trimmer]") {
  std::atomic<int> trims{0};
  HeapTrimmer trimmer(1h, [&] {
    ++trims;
    return false;
  });
  std::this_thread::sleep_for(20ms);
  CHECK(trims.load() == 0);  // an hour's interval: nothing yet
  trimmer.trim_soon();
  CHECK(wait_until([&] { return trims.load() == 1; }));
  trimmer.trim_soon();
  CHECK(wait_until([&] { return trims.load() == 2; }));
}

TEST_CASE("heap trimmer: destruction does not wait for the interval", "[heap_trimmer]") {
  std::atomic<int> trims{0};
  {
    // Would hold the test for an hour (and fail it at ctest's timeout) if it waited.
    HeapTrimmer trimmer(std::chrono::hours(1), [&] {
      ++trims;
      return true;
    });
  }
  CHECK(trims.load() == 0);  // the first trim is one interval away
}

TEST_CASE("heap trimmer: the default trim gives freed heap pages back to the system",
          "[heap_trimmer]") {
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  WARN("a sanitizer replaces malloc: malloc_trim has nothing to trim here");
  return;
#else
  // 48 MiB in 1 KiB blocks, one block in 64 kept: the freed ones cannot go back by themselves
  // (the kept blocks pin the heap's top), only a trim returns their pages.
  constexpr std::size_t kBlock = 1024;
  constexpr std::size_t kBlocks = 48 * 1024;
  std::vector<void*> blocks;
  blocks.reserve(kBlocks);
  for (std::size_t i = 0; i < kBlocks; ++i) {
    void* block = std::malloc(kBlock);
    if (block == nullptr) FAIL("out of memory");
    std::memset(block, 0x5a, kBlock);  // resident, not just reserved
    blocks.push_back(block);
  }
  for (std::size_t i = 0; i < kBlocks; ++i) {
    if (i % 64 != 63) {
      std::free(blocks[i]);
      blocks[i] = nullptr;
    }
  }
  const std::size_t before = resident_bytes();
  CHECK(HeapTrimmer::trim_heap());
  const std::size_t after = resident_bytes();
  INFO("RSS " << before / 1024 << " KiB before the trim, " << after / 1024 << " KiB after");
  CHECK(before > after + std::size_t{32} * 1024 * 1024);  // most of the 47 MiB freed came back
  for (void* block : blocks) std::free(block);
#endif
}

}  // namespace
}  // namespace hsm::agent
