// libhsm_fault_pkcs11.so loaded with dlopen in front of a private SoftHSMv2 token: pass-through,
// every kind of fault, call counting, and what happens when the target is missing.
#include <dlfcn.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <filesystem>
#include <future>
#include <map>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "fault_module_harness.hpp"
#include "function_table.hpp"

using namespace std::chrono_literals;
using hsm::fault::test::EcKeyPair;
using hsm::fault::test::generate_ec_key;
using hsm::fault::test::Harness;
using hsm::fault::test::sign_once;
using hsm::fault::test::TokenConnection;
using hsm::fault::test::verify_once;

namespace {

/// A logged-in session with a fresh P-256 key pair: what most tests start from.
struct SigningSetup {
  SigningSetup() : session(token.open_session()) {
    REQUIRE(token.login(session) == CKR_OK);
    key = generate_ec_key(token.p11(), session);
  }

  [[nodiscard]] CK_RV sign() const { return sign_once(token.p11(), session, key.private_key); }

  TokenConnection token;
  CK_SESSION_HANDLE session;
  EcKeyPair key;
};

using hsm::fault::FunctionId;
using hsm::fault::kFunctionCount;
using hsm::fault::kFunctionNames;

/// Calls a PKCS#11 function with every argument zero: handle 0 (CK_INVALID_HANDLE), null
/// pointers. Only for calls a rule answers without reaching the target, and for those the
/// module forwards (CallKind::kEndsOperation), which SoftHSMv2 refuses at once for handle 0.
template <typename... Args>
CK_RV call_with_zero_arguments(CK_RV (*function)(Args...)) {
  return function(Args{}...);
}

/// One entry per PKCS#11 function, from the module's own list, so a function added there is
/// tested here too.
using ZeroArgumentCall = CK_RV (*)(CK_FUNCTION_LIST&);
constexpr std::array<ZeroArgumentCall, kFunctionCount> kZeroArgumentCalls = {
#define HSM_FAULT_ZERO_ARGUMENT_CALL(name, kind) \
  [](CK_FUNCTION_LIST& p11) { return call_with_zero_arguments(p11.name); },
    HSM_FAULT_PKCS11_FUNCTIONS(HSM_FAULT_ZERO_ARGUMENT_CALL)
#undef HSM_FAULT_ZERO_ARGUMENT_CALL
};

/// Every function a rule can name: all but C_GetFunctionList.
std::vector<std::size_t> faultable_functions() {
  std::vector<std::size_t> functions;
  for (std::size_t i = 0; i < kFunctionCount; ++i) {
    if (static_cast<FunctionId>(i) != FunctionId::C_GetFunctionList) {
      functions.push_back(i);
    }
  }
  return functions;
}

/// Vendor-defined return values SoftHSMv2 never gives, so a call that returns one was faulted.
constexpr CK_RV kVendorDefined = 0x80000000UL;  // CKR_VENDOR_DEFINED, whose macro has a C cast
constexpr CK_RV kOnce = kVendorDefined | 0x101;
constexpr CK_RV kTwice = kVendorDefined | 0x102;
constexpr CK_RV kAlways = kVendorDefined | 0x103;
constexpr CK_RV kAfterHang = kVendorDefined | 0x104;

std::string hex(CK_RV rv) {
  std::ostringstream text;
  text << "0x" << std::hex << rv;
  return text.str();
}

/// Removes the control file when a test leaves, before futures that may be hung are joined
/// (declare it after them).
struct ClearRulesOnExit {
  ClearRulesOnExit() = default;
  ClearRulesOnExit(const ClearRulesOnExit&) = delete;
  ClearRulesOnExit& operator=(const ClearRulesOnExit&) = delete;
  ClearRulesOnExit(ClearRulesOnExit&&) = delete;
  ClearRulesOnExit& operator=(ClearRulesOnExit&&) = delete;
  ~ClearRulesOnExit() { Harness::instance().remove_rules(); }
};

}  // namespace

TEST_CASE("the module hands out a complete function list and exports only C_GetFunctionList",
          "[fault_module]") {
  Harness& harness = Harness::instance();
  CK_FUNCTION_LIST& p11 = harness.p11();
  CHECK(p11.version.major == 2);
  CHECK(p11.version.minor == 40);
  const auto* entries = reinterpret_cast<void* const*>(&p11.C_Initialize);
  for (std::size_t i = 0; i < hsm::fault::kFunctionCount; ++i) {
    INFO(hsm::fault::kFunctionNames[i]);
    CHECK(entries[i] != nullptr);
  }
  CK_FUNCTION_LIST* again = nullptr;
  REQUIRE(p11.C_GetFunctionList(&again) == CKR_OK);
  CHECK(again == &p11);
  CHECK(p11.C_GetFunctionList(nullptr) == CKR_ARGUMENTS_BAD);

  CHECK(dlsym(harness.library(), "C_GetFunctionList") != nullptr);
  for (const char* hidden : {"C_Initialize", "C_Sign", "C_Login", "C_Finalize"}) {
    INFO(hidden);
    CHECK(dlsym(harness.library(), hidden) == nullptr);
  }
}

TEST_CASE("without rules every call reaches SoftHSMv2: login, EC key generation, sign, verify",
          "[fault_module]") {
  SigningSetup setup;
  CK_FUNCTION_LIST& p11 = setup.token.p11();

  CK_INFO info{};
  REQUIRE(p11.C_GetInfo(&info) == CKR_OK);
  CHECK(std::string(reinterpret_cast<const char*>(info.manufacturerID), 8) == "SoftHSM ");

  CK_SESSION_INFO session_info{};
  REQUIRE(p11.C_GetSessionInfo(setup.session, &session_info) == CKR_OK);
  CHECK(session_info.state == CKS_RW_USER_FUNCTIONS);

  std::vector<unsigned char> signature;
  REQUIRE(sign_once(p11, setup.session, setup.key.private_key, &signature) == CKR_OK);
  CHECK(signature.size() == 64);
  CHECK(verify_once(p11, setup.session, setup.key.public_key, signature) == CKR_OK);
  signature[0] ^= 0x01;
  CHECK(verify_once(p11, setup.session, setup.key.public_key, signature) == CKR_SIGNATURE_INVALID);
}

TEST_CASE("count=1 injects the error once, then calls pass again", "[fault_module]") {
  SigningSetup setup;
  Harness::instance().write_rules("C_Sign rv=CKR_DEVICE_ERROR count=1\n");
  CHECK(setup.sign() == CKR_DEVICE_ERROR);
  CHECK(setup.sign() == CKR_OK);
  CHECK(setup.sign() == CKR_OK);
}

TEST_CASE("an injected C_Sign error ends the real signing operation, as on a real token",
          "[fault_module]") {
  SigningSetup setup;
  CK_FUNCTION_LIST& p11 = setup.token.p11();
  Harness::instance().write_rules("C_Sign rv=CKR_DEVICE_ERROR count=1\n");
  CHECK(setup.sign() == CKR_DEVICE_ERROR);
  // No operation is left active in SoftHSMv2: C_Sign without C_SignInit is refused...
  std::vector<unsigned char> digest(32, 1);
  std::vector<unsigned char> buffer(64);
  CK_ULONG length = buffer.size();
  CHECK(p11.C_Sign(setup.session, digest.data(), digest.size(), buffer.data(), &length) ==
        CKR_OPERATION_NOT_INITIALIZED);
  // ...and the next C_SignInit does not see CKR_OPERATION_ACTIVE.
  CHECK(setup.sign() == CKR_OK);
}

TEST_CASE("count=N injects the error exactly N times", "[fault_module]") {
  SigningSetup setup;
  Harness::instance().write_rules("C_Sign rv=CKR_SESSION_HANDLE_INVALID count=3\n");
  CHECK(setup.sign() == CKR_SESSION_HANDLE_INVALID);
  CHECK(setup.sign() == CKR_SESSION_HANDLE_INVALID);
  CHECK(setup.sign() == CKR_SESSION_HANDLE_INVALID);
  CHECK(setup.sign() == CKR_OK);
}

TEST_CASE("a rule without count holds until its line is removed", "[fault_module]") {
  SigningSetup setup;
  Harness& harness = Harness::instance();
  harness.write_rules("C_Sign rv=0x30\n");
  for (int i = 0; i < 5; ++i) {
    CHECK(setup.sign() == CKR_DEVICE_ERROR);
  }

  SECTION("an emptied control file clears it") {
    harness.write_rules("# nothing\n");
  }
  SECTION("a deleted control file clears it") {
    harness.remove_rules();
  }
  SECTION("another rule in its place clears it") {
    harness.write_rules("C_Verify rv=CKR_DEVICE_ERROR\n");
  }
  CHECK(setup.sign() == CKR_OK);
}

TEST_CASE("an unchanged line keeps its count across rewrites but a changed line starts afresh",
          "[fault_module]") {
  SigningSetup setup;
  Harness& harness = Harness::instance();
  harness.write_rules("C_Sign rv=CKR_DEVICE_ERROR count=1\n");
  CHECK(setup.sign() == CKR_DEVICE_ERROR);
  harness.write_rules("# a new comment line\nC_Sign rv=CKR_DEVICE_ERROR count=1\n");
  CHECK(setup.sign() == CKR_OK);  // same line: already used up
  harness.write_rules("C_Sign rv=CKR_DEVICE_ERROR count=1   # again\n");
  CHECK(setup.sign() == CKR_DEVICE_ERROR);  // changed line: a new rule
  CHECK(setup.sign() == CKR_OK);
}

TEST_CASE("the first matching rule with faults left applies", "[fault_module]") {
  SigningSetup setup;
  Harness::instance().write_rules(
      "C_Sign rv=CKR_DEVICE_ERROR count=1\n"
      "C_Sign rv=CKR_FUNCTION_FAILED count=1\n");
  CHECK(setup.sign() == CKR_DEVICE_ERROR);
  CHECK(setup.sign() == CKR_FUNCTION_FAILED);
  CHECK(setup.sign() == CKR_OK);
}

TEST_CASE("invalid lines do not disable the valid ones", "[fault_module]") {
  SigningSetup setup;
  std::string errors = hsm::fault::test::capture_stderr([&] {
    Harness::instance().write_rules("C_Sgn rv=CKR_DEVICE_ERROR\nC_Sign rv=CKR_DEVICE_ERROR\n");
    CHECK(setup.sign() == CKR_DEVICE_ERROR);
  });
  CHECK_THAT(errors, Catch::Contains("line 1: unknown function `C_Sgn`"));
}

TEST_CASE("`*` faults every function except C_Finalize and C_GetFunctionList", "[fault_module]") {
  TokenConnection token;
  CK_FUNCTION_LIST& p11 = token.p11();
  const CK_SESSION_HANDLE session = token.open_session();
  Harness::instance().write_rules("* rv=CKR_DEVICE_REMOVED\n");
  CK_ULONG count = 0;
  CHECK(p11.C_GetSlotList(CK_TRUE, nullptr, &count) == CKR_DEVICE_REMOVED);
  CK_SESSION_INFO info{};
  CHECK(p11.C_GetSessionInfo(session, &info) == CKR_DEVICE_REMOVED);
  CHECK(token.login(session) == CKR_DEVICE_REMOVED);
  CK_FUNCTION_LIST* list = nullptr;
  CHECK(p11.C_GetFunctionList(&list) == CKR_OK);
  CHECK(token.finalize() == CKR_OK);  // reaches SoftHSMv2, which is initialised
  CK_C_INITIALIZE_ARGS args{};
  args.flags = CKF_OS_LOCKING_OK;
  CHECK(p11.C_Initialize(&args) == CKR_DEVICE_REMOVED);            // not forwarded
  CHECK(p11.C_Finalize(nullptr) == CKR_CRYPTOKI_NOT_INITIALIZED);  // from SoftHSMv2 itself
}

TEST_CASE("every function can be failed once, N times and always, by the same rules",
          "[fault_module][every_function]") {
  TokenConnection token;
  Harness& harness = Harness::instance();
  const std::vector<std::size_t> functions = faultable_functions();
  REQUIRE(functions.size() == kFunctionCount - 1);
  const auto before = harness.read_stats();
  // First match wins: one kOnce, then two kTwice, then kAlways for good.
  std::string rules;
  for (const std::size_t i : functions) {
    const std::string name{kFunctionNames[i]};
    rules += name + " rv=" + hex(kOnce) + " count=1\n";
    rules += name + " rv=" + hex(kTwice) + " count=2\n";
    rules += name + " rv=" + hex(kAlways) + "\n";
  }
  harness.write_rules(rules);
  ClearRulesOnExit clear_rules;

  for (const std::size_t i : functions) {
    INFO(kFunctionNames[i]);
    CK_FUNCTION_LIST& p11 = token.p11();
    CHECK(kZeroArgumentCalls[i](p11) == kOnce);
    CHECK(kZeroArgumentCalls[i](p11) == kTwice);
    CHECK(kZeroArgumentCalls[i](p11) == kTwice);
    CHECK(kZeroArgumentCalls[i](p11) == kAlways);
    CHECK(kZeroArgumentCalls[i](p11) == kAlways);
  }
  // Each call was counted under its own function's name.
  const std::string last{kFunctionNames[functions.back()]};
  const auto old_count = [&before](const std::string& key) {
    const auto it = before.find(key);
    return it == before.end() ? std::uint64_t{0} : it->second;
  };
  harness.wait_for_stat(last + ".injected", old_count(last + ".injected") + 5);
  const auto after = harness.read_stats();
  for (const std::size_t i : functions) {
    const std::string name{kFunctionNames[i]};
    INFO(name);
    const auto now = [&after](const std::string& key) {
      const auto it = after.find(key);
      return it == after.end() ? std::uint64_t{0} : it->second;
    };
    CHECK(now(name + ".injected") - old_count(name + ".injected") == 5);
  }
}

TEST_CASE("every function can be hung until released, all at once, each on its own thread",
          "[fault_module][every_function]") {
  TokenConnection token;
  Harness& harness = Harness::instance();
  const std::vector<std::size_t> functions = faultable_functions();
  std::map<std::string, std::uint64_t> hung_before;
  for (const auto& [key, value] : harness.read_stats()) {
    hung_before[key] = value;
  }
  // With an rv, a released call does not reach SoftHSMv2 with its zero arguments (only the
  // kEndsOperation ones are forwarded, and refused there for session handle 0).
  std::string rules;
  for (const std::size_t i : functions) {
    rules += std::string{kFunctionNames[i]} + " hang=1 rv=" + hex(kAfterHang) + "\n";
  }
  harness.write_rules(rules);
  std::vector<std::future<CK_RV>> calls;
  calls.reserve(functions.size());
  for (const std::size_t i : functions) {
    calls.push_back(
        std::async(std::launch::async, [&token, i] { return kZeroArgumentCalls[i](token.p11()); }));
  }
  ClearRulesOnExit clear_rules;

  // Every call has reached its hang (counted as injected) ...
  for (const std::size_t i : functions) {
    const std::string key = std::string{kFunctionNames[i]} + ".injected";
    INFO(key);
    CHECK(harness.wait_for_stat(key, hung_before[key] + 1) == hung_before[key] + 1);
  }
  // ... and none has returned while its rule is in the file.
  for (std::size_t n = 0; n < functions.size(); ++n) {
    INFO(kFunctionNames[functions[n]]);
    CHECK(calls[n].wait_for(0ms) == std::future_status::timeout);
  }
  harness.remove_rules();
  for (std::size_t n = 0; n < functions.size(); ++n) {
    INFO(kFunctionNames[functions[n]]);
    REQUIRE(calls[n].wait_for(30s) == std::future_status::ready);
    CHECK(calls[n].get() == kAfterHang);
  }
}

TEST_CASE("hang=1 count=1 hangs one call only; the next ones pass while it hangs",
          "[fault_module]") {
  SigningSetup setup;
  Harness& harness = Harness::instance();
  CK_FUNCTION_LIST& p11 = setup.token.p11();
  const std::uint64_t hung_before = harness.stat("C_GetSessionInfo.injected");
  harness.write_rules("C_GetSessionInfo hang=1 count=1\n");
  auto hung = std::async(std::launch::async, [&] {
    CK_SESSION_INFO info{};
    return p11.C_GetSessionInfo(setup.session, &info);
  });
  ClearRulesOnExit clear_rules;
  REQUIRE(harness.wait_for_stat("C_GetSessionInfo.injected", hung_before + 1) == hung_before + 1);
  CK_SESSION_INFO info{};
  CHECK(p11.C_GetSessionInfo(setup.session, &info) == CKR_OK);
  CHECK(info.state == CKS_RW_USER_FUNCTIONS);
  CHECK(hung.wait_for(0ms) == std::future_status::timeout);
  harness.remove_rules();  // a spent rule still holds its hung call until its line goes
  REQUIRE(hung.wait_for(30s) == std::future_status::ready);
  CHECK(hung.get() == CKR_OK);
}

TEST_CASE("session=<handle> faults only that session", "[fault_module]") {
  SigningSetup setup;
  const CK_SESSION_HANDLE other = setup.token.open_session();
  Harness::instance().write_rules("C_Sign rv=CKR_SESSION_CLOSED session=" + std::to_string(other) +
                                  "\n");
  CHECK(setup.sign() == CKR_OK);
  CHECK(sign_once(setup.token.p11(), other, setup.key.private_key) == CKR_SESSION_CLOSED);
  CHECK(setup.sign() == CKR_OK);
}

TEST_CASE("C_Login rv=CKR_PIN_INCORRECT never logs in, and every C_Login is counted",
          "[fault_module]") {
  Harness& harness = Harness::instance();
  std::map<std::string, std::uint64_t> before;
  {
    TokenConnection token;
    REQUIRE(token.finalize() == CKR_OK);  // C_Finalize writes the stats file: exact baseline
    before = harness.read_stats();
  }
  {
    TokenConnection token;
    CK_FUNCTION_LIST& p11 = token.p11();
    const CK_SESSION_HANDLE session = token.open_session();
    harness.write_rules("C_Login rv=CKR_PIN_INCORRECT\n");
    for (int i = 0; i < 3; ++i) {
      CHECK(token.login(session) == CKR_PIN_INCORRECT);
    }
    CK_SESSION_INFO info{};
    REQUIRE(p11.C_GetSessionInfo(session, &info) == CKR_OK);
    CHECK(info.state == CKS_RW_PUBLIC_SESSION);  // the wrong PIN never reached the token
    harness.remove_rules();
    CHECK(token.login(session) == CKR_OK);
    REQUIRE(token.finalize() == CKR_OK);
  }
  const auto after = harness.read_stats();
  const auto delta = [&](const std::string& key) {
    const auto get = [&key](const std::map<std::string, std::uint64_t>& stats) {
      const auto it = stats.find(key);
      return it == stats.end() ? std::uint64_t{0} : it->second;
    };
    return get(after) - get(before);
  };
  CHECK(delta("C_Login") == 4);
  CHECK(delta("C_Login.injected") == 3);
  CHECK(delta("C_Initialize") == 1);
  CHECK(delta("C_Finalize") == 1);
  CHECK(delta("C_OpenSession") == 1);
  CHECK(delta("C_Sign") == 0);
}

TEST_CASE("delay_ms adds at least the delay, then forwards", "[fault_module]") {
  SigningSetup setup;
  CK_FUNCTION_LIST& p11 = setup.token.p11();
  Harness::instance().write_rules("C_Sign delay_ms=30\n");
  CK_MECHANISM mechanism{CKM_ECDSA, nullptr, 0};
  REQUIRE(p11.C_SignInit(setup.session, &mechanism, setup.key.private_key) == CKR_OK);
  std::vector<unsigned char> digest(32, 7);
  std::vector<unsigned char> signature(64);
  CK_ULONG length = signature.size();
  const auto start = std::chrono::steady_clock::now();
  const CK_RV rv =
      p11.C_Sign(setup.session, digest.data(), digest.size(), signature.data(), &length);
  const auto elapsed = std::chrono::steady_clock::now() - start;
  CHECK(rv == CKR_OK);
  CHECK(length == 64);
  CHECK(elapsed >= 30ms);  // a lower bound only: sleeps never return early
}

TEST_CASE("hang=1 blocks the call until its line is removed, then forwards", "[fault_module]") {
  SigningSetup setup;
  Harness& harness = Harness::instance();
  const std::uint64_t hung_before = harness.stat("C_Sign.injected");
  harness.write_rules("C_Sign hang=1\n");
  auto hung = std::async(std::launch::async, [&setup] { return setup.sign(); });
  ClearRulesOnExit clear_rules;

  REQUIRE(harness.wait_for_stat("C_Sign.injected", hung_before + 1) == hung_before + 1);
  // The rule is still there, so the call must still be blocked.
  CHECK(hung.wait_for(50ms) == std::future_status::timeout);
  harness.remove_rules();
  REQUIRE(hung.wait_for(30s) == std::future_status::ready);
  CHECK(hung.get() == CKR_OK);
}

TEST_CASE("hang=1 rv=... returns that error once released", "[fault_module]") {
  SigningSetup setup;
  Harness& harness = Harness::instance();
  const std::uint64_t hung_before = harness.stat("C_Sign.injected");
  harness.write_rules("C_Sign hang=1 rv=CKR_DEVICE_ERROR\n");
  auto hung = std::async(std::launch::async, [&setup] { return setup.sign(); });
  ClearRulesOnExit clear_rules;
  REQUIRE(harness.wait_for_stat("C_Sign.injected", hung_before + 1) == hung_before + 1);
  harness.write_rules("");
  REQUIRE(hung.wait_for(30s) == std::future_status::ready);
  CHECK(hung.get() == CKR_DEVICE_ERROR);
  CHECK(setup.sign() == CKR_OK);  // the forwarded C_Sign ended the real operation
}

TEST_CASE("hang=1 session=first hangs one session while the others keep signing",
          "[fault_module]") {
  SigningSetup setup;
  Harness& harness = Harness::instance();
  const CK_SESSION_HANDLE other = setup.token.open_session();
  const std::uint64_t hung_before = harness.stat("C_Sign.injected");
  harness.write_rules("C_Sign hang=1 session=first\n");
  auto hung = std::async(std::launch::async, [&setup] { return setup.sign(); });
  ClearRulesOnExit clear_rules;

  // Once the first session's call is caught, the rule is bound to that session only.
  REQUIRE(harness.wait_for_stat("C_Sign.injected", hung_before + 1) == hung_before + 1);
  for (int i = 0; i < 5; ++i) {
    CHECK(sign_once(setup.token.p11(), other, setup.key.private_key) == CKR_OK);
  }
  CHECK(hung.wait_for(0ms) == std::future_status::timeout);
  harness.remove_rules();
  REQUIRE(hung.wait_for(30s) == std::future_status::ready);
  CHECK(hung.get() == CKR_OK);
}

TEST_CASE("C_Finalize releases a hung call without touching the target", "[fault_module]") {
  SigningSetup setup;
  Harness& harness = Harness::instance();
  const std::uint64_t hung_before = harness.stat("C_Sign.injected");
  harness.write_rules("C_Sign hang=1\n");
  auto hung = std::async(std::launch::async, [&setup] { return setup.sign(); });
  ClearRulesOnExit clear_rules;
  REQUIRE(harness.wait_for_stat("C_Sign.injected", hung_before + 1) == hung_before + 1);
  CHECK(setup.token.finalize() == CKR_OK);
  REQUIRE(hung.wait_for(30s) == std::future_status::ready);
  CHECK(hung.get() == CKR_CRYPTOKI_NOT_INITIALIZED);
}

TEST_CASE("count=N is exact when many threads call at once", "[fault_module]") {
  SigningSetup setup;
  constexpr int kThreads = 8;
  constexpr int kSignsPerThread = 20;
  std::vector<CK_SESSION_HANDLE> sessions;
  sessions.reserve(kThreads);
  for (int i = 0; i < kThreads; ++i) {
    sessions.push_back(setup.token.open_session());
  }
  Harness::instance().write_rules("C_Sign rv=CKR_DEVICE_ERROR count=10\n");

  std::atomic<int> ok{0};
  std::atomic<int> device_errors{0};
  std::atomic<int> other{0};
  std::vector<std::thread> threads;
  threads.reserve(kThreads);
  for (const CK_SESSION_HANDLE session : sessions) {
    threads.emplace_back([&, session] {
      for (int i = 0; i < kSignsPerThread; ++i) {
        const CK_RV rv = sign_once(setup.token.p11(), session, setup.key.private_key);
        (rv == CKR_OK ? ok : rv == CKR_DEVICE_ERROR ? device_errors : other)++;
      }
    });
  }
  for (std::thread& thread : threads) {
    thread.join();
  }
  CHECK(device_errors == 10);
  CHECK(ok == kThreads * kSignsPerThread - 10);
  CHECK(other == 0);
}

TEST_CASE("a missing target makes C_Initialize fail with CKR_GENERAL_ERROR, not crash",
          "[fault_module]") {
  Harness& harness = Harness::instance();
  const std::string missing = (harness.directory() / "no-such-module.so").string();
  CK_FUNCTION_LIST* copy = Harness::load_module(
      harness.copy_module(),
      {{"HSM_FAULT_TARGET", missing}, {"HSM_FAULT_CONTROL", ""}, {"HSM_FAULT_STATS", ""}});
  CK_C_INITIALIZE_ARGS args{};
  args.flags = CKF_OS_LOCKING_OK;
  const std::string errors = hsm::fault::test::capture_stderr([&] {
    CHECK(copy->C_Initialize(&args) == CKR_GENERAL_ERROR);
    CHECK(copy->C_Initialize(&args) == CKR_GENERAL_ERROR);  // tried again, still no crash
  });
  CHECK_THAT(errors, Catch::Contains("HSM_FAULT_TARGET=" + missing));
  CHECK(std::count(errors.begin(), errors.end(), '\n') == 2);  // one line per attempt
  CK_ULONG count = 0;
  CHECK(copy->C_GetSlotList(CK_TRUE, nullptr, &count) == CKR_CRYPTOKI_NOT_INITIALIZED);
  CHECK(copy->C_Finalize(nullptr) == CKR_CRYPTOKI_NOT_INITIALIZED);
}

TEST_CASE("a target that is the fault module itself is refused", "[fault_module]") {
  Harness& harness = Harness::instance();
  const std::filesystem::path module = harness.copy_module();
  CK_FUNCTION_LIST* copy = Harness::load_module(
      module,
      {{"HSM_FAULT_TARGET", module.string()}, {"HSM_FAULT_CONTROL", ""}, {"HSM_FAULT_STATS", ""}});
  CK_C_INITIALIZE_ARGS args{};
  args.flags = CKF_OS_LOCKING_OK;
  const std::string errors = hsm::fault::test::capture_stderr(
      [&] { CHECK(copy->C_Initialize(&args) == CKR_GENERAL_ERROR); });
  CHECK_THAT(errors, Catch::Contains("it is this fault module itself"));
}
