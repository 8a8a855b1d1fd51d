// ObjectChangeGate: a change runs alone, and a change waiting behind a steady stream of reads
// gets in (a reader-preferring lock would starve it: the test would then hang to ctest's
// timeout instead of passing).
#include "pkcs11/object_change_gate.hpp"

#include <atomic>
#include <catch2/catch.hpp>
#include <thread>
#include <vector>

using hsm::agent::pkcs11::ObjectChangeGate;

TEST_CASE("object change gate: changes run alone and are not starved by reads",
          "[object_changes]") {
  ObjectChangeGate gate;
  std::atomic<int> readers_inside{0};
  std::atomic<int> most_readers_inside{0};
  std::atomic<bool> stop{false};
  std::atomic<long> reads{0};
  std::vector<std::thread> readers;
  for (int i = 0; i < 4; ++i) {
    readers.emplace_back([&] {
      while (!stop.load()) {
        const auto shared = gate.read();
        const int inside = readers_inside.fetch_add(1) + 1;
        int seen = most_readers_inside.load();
        while (inside > seen && !most_readers_inside.compare_exchange_weak(seen, inside)) {
        }
        // Overlapping reads, back to back: the read lock is almost never free.
        std::this_thread::sleep_for(std::chrono::microseconds(50));
        readers_inside.fetch_sub(1);
        reads.fetch_add(1);
      }
    });
  }
  while (reads.load() < 100) std::this_thread::yield();
  int changes_alone = 0;
  for (int i = 0; i < 50; ++i) {
    const auto alone = gate.change();
    if (readers_inside.load() == 0) ++changes_alone;
    std::this_thread::sleep_for(std::chrono::microseconds(100));
    if (readers_inside.load() == 0) ++changes_alone;
  }
  stop.store(true);
  for (auto& reader : readers) reader.join();
  CHECK(changes_alone == 100);
  CHECK(most_readers_inside.load() > 1);  // reads do run side by side
}
