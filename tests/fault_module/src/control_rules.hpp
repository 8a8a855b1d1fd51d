// Parsing of the fault module's control file (format: tests/fault_module/README.md). Pure
// functions over text: no I/O, no global state, so they are unit-tested directly.
#pragma once

#include <p11-kit/pkcs11.h>

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "function_table.hpp"

namespace hsm::fault {

/// Which sessions a rule applies to.
struct SessionFilter {
  enum class Mode {
    kAny,     ///< every call (functions without a session argument included)
    kFirst,   ///< the first session that makes a matching call; later only that one
    kHandle,  ///< one given session handle
  };
  Mode mode = Mode::kAny;
  CK_SESSION_HANDLE handle = CK_INVALID_HANDLE;  ///< for kHandle
};

/// One parsed control-file line.
struct RuleSpec {
  /// The trimmed line, comment included. Rules keep their remaining count across re-reads of
  /// the file as long as this text stays the same (see README, "Rule identity").
  std::string identity;
  std::size_t line_number = 0;         ///< 1-based, for messages
  std::optional<FunctionId> function;  ///< nullopt: `*` (see matches())
  std::optional<CK_RV> rv;             ///< returned instead of the real result
  std::optional<std::uint64_t> count;  ///< calls to fault; nullopt: until removed
  std::chrono::microseconds delay{0};  ///< added before the call
  bool hang = false;                   ///< block until the line is removed
  SessionFilter session;

  /// Whether this rule is about `id` by name. `*` matches every function except
  /// C_GetFunctionList (never faulted) and C_Finalize (so a client can always clean up).
  [[nodiscard]] bool matches(FunctionId id) const noexcept;
};

struct ParsedControl {
  std::vector<RuleSpec> rules;      ///< valid lines, in file order
  std::vector<std::string> errors;  ///< "line N: why" for every rejected line
};

/// Upper bounds on what a control file can ask for: the file is input from outside.
inline constexpr std::size_t kMaxControlFileBytes = std::size_t{64} * 1024;
inline constexpr std::size_t kMaxLineBytes = 1024;
inline constexpr std::chrono::milliseconds kMaxDelay{3'600'000};

/// Parses a whole control file. Invalid lines are reported in `errors` and skipped; they never
/// disable the valid ones. Never throws except std::bad_alloc.
[[nodiscard]] ParsedControl parse_control_text(std::string_view text);

/// A CK_RV from a `CKR_` name in our table, or from a number (`0x30`, `48`); nullopt if neither.
[[nodiscard]] std::optional<CK_RV> parse_rv(std::string_view text) noexcept;

/// The `CKR_` name of `rv` when it is in our table, else nullopt.
[[nodiscard]] std::optional<std::string_view> rv_name(CK_RV rv) noexcept;

}  // namespace hsm::fault
