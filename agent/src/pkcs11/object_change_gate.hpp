// ObjectChangeGate: keeps calls that create or destroy token objects apart from every other
// call that touches token objects, for a PKCS#11 library that is not safe there.
//
// Why: SoftHSMv2's file object store (2.6.1 in Debian bookworm, and upstream still) creates a
// new object's file before it records the file as known, and any access to a token object
// re-reads the token directory when the token changed. A thread that reads in that window takes
// the half-written file for an object of its own: C_GenerateKeyPair then fails with
// CKR_GENERAL_ERROR or CKR_TEMPLATE_INCONSISTENT, and lookups see stray objects (SoftHSMv2 issue
// 573). A test made 40 keys while three threads signed and listed keys: it failed on every run
// without the gate (tests/unit/agent/key_service_test.cpp, "[object_changes]").
//
// The gate is a reader-writer lock in which a waiting writer goes first: changes are rare and
// reads (signatures) are constant, and glibc's rwlock, under std::shared_mutex, prefers
// readers, so a steady stream of signatures could hold a key generation off for ever. A
// waiting change holds the turnstile, which every new read passes through, so reads that
// arrive after it wait; the reads already inside drain, and the change runs alone.
//
// Cost: a read is a lock and unlock of the turnstile and of the shared_mutex, tens of
// nanoseconds against a SoftHSMv2 signature of tens of microseconds; a key generation stalls
// reads for its own length (milliseconds for EC, up to seconds for RSA-4096). Module uses the
// gate only when it is switched on (docs/configuration.md, --serialize-object-changes).
#pragma once

#include <mutex>
#include <shared_mutex>

namespace hsm::agent::pkcs11 {

class ObjectChangeGate {
 public:
  /// Held while a call reads token objects; any number at once, none during a change.
  [[nodiscard]] std::shared_lock<std::shared_mutex> read() {
    { std::lock_guard pass(turnstile_); }
    return std::shared_lock(objects_);
  }

  /// Held while a call creates or destroys token objects: alone, ahead of later reads.
  [[nodiscard]] std::unique_lock<std::shared_mutex> change() {
    std::lock_guard hold(turnstile_);
    return std::unique_lock(objects_);
  }

 private:
  std::mutex turnstile_;
  std::shared_mutex objects_;
};

}  // namespace hsm::agent::pkcs11
