// hsmctl's commands: one class per command, listed in one table (command_table()); run_hsmctl()
// parses the command line, runs the chosen command and maps the outcome to an exit code.
#pragma once

#include <CLI/CLI.hpp>
#include <cstdint>
#include <memory>
#include <optional>
#include <ostream>
#include <span>
#include <string>
#include <string_view>

#include "hsm/client.hpp"

namespace hsm::hsmctl {

/// hsmctl's exit codes (documented in --help).
enum class ExitCode : int {
  kOk = 0,
  kNegative = 1,       // a negative answer: invalid signature, health not ok, nothing deleted
  kUsage = 2,          // bad command line or input
  kAgentError = 3,     // the agent answered with an error (or a timeout / protocol error)
  kCannotConnect = 4,  // no agent listening on the socket
};

struct GlobalOptions {
  std::string socket = hsm::default_socket_path();
  bool json = false;
  std::uint32_t timeout_ms = 5000;
};

/// What a command runs with. The client is created (and connects) on first use.
class Context {
 public:
  Context(const GlobalOptions& options, std::ostream& out, std::ostream& err)
      : options_(options), out_(out), err_(err) {}

  [[nodiscard]] hsm::Client& client();
  [[nodiscard]] bool json() const noexcept { return options_.json; }
  [[nodiscard]] const std::string& socket() const noexcept { return options_.socket; }
  [[nodiscard]] std::uint32_t timeout_ms() const noexcept { return options_.timeout_ms; }
  [[nodiscard]] std::ostream& out() noexcept { return out_; }
  [[nodiscard]] std::ostream& err() noexcept { return err_; }
  /// The largest input hsmctl reads from a file for sign/verify.
  [[nodiscard]] std::size_t max_input_bytes() const;

 private:
  const GlobalOptions& options_;
  std::ostream& out_;
  std::ostream& err_;
  std::optional<hsm::Client> client_;
};

class Command {
 public:
  Command() = default;
  virtual ~Command() = default;
  Command(const Command&) = delete;
  Command& operator=(const Command&) = delete;
  Command(Command&&) = delete;
  Command& operator=(Command&&) = delete;
  /// Declares the command's positionals and flags on its subcommand.
  virtual void define(CLI::App& command) = 0;
  /// Runs after a successful parse. Throws hsm::Error (agent and connection failures) or
  /// UsageError (bad input found after parsing); run_hsmctl() maps both to exit codes.
  [[nodiscard]] virtual ExitCode run(Context& context) = 0;
};

struct CommandEntry {
  std::string_view name;
  std::string_view summary;
  std::unique_ptr<Command> (*make)();
};

/// Every command, in the order --help lists them. A new command is one class and one entry.
[[nodiscard]] std::span<const CommandEntry> command_table();

/// The whole CLI: `args` as main() gets them (args[0] is the program name). Returns the exit
/// code; writes results to `out`, diagnostics to `err`.
[[nodiscard]] int run_hsmctl(std::span<const std::string> args, std::ostream& out,
                             std::ostream& err);

}  // namespace hsm::hsmctl
