#include "commands.hpp"

#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <iomanip>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <utility>
#include <vector>

#include "bench_command.hpp"
#include "encoding.hpp"
#include "metrics_summary.hpp"

namespace hsm::hsmctl {
namespace {

constexpr std::size_t kMaxSignatureFileBytes = std::size_t{64} * 1024;

std::string format_ms(double milliseconds) {
  std::ostringstream text;
  text << std::fixed << std::setprecision(2) << milliseconds;
  return text.str();
}

// --json output: nlohmann::json, members in the order written.
using Json = nlohmann::ordered_json;

/// One compact document. Bytes that are not UTF-8 (a kid, an agent's message) become U+FFFD,
/// so the output is always valid JSON.
std::string json_text(const Json& document) {
  return document.dump(-1, ' ', false, Json::error_handler_t::replace);
}

void print_json(std::ostream& out, const Json& document) {
  out << json_text(document) << '\n';
}

/// A number; whole values (counters read from /metrics as doubles) print as integers.
Json number(double value) {
  constexpr double kExactIntegers = 9007199254740992.0;  // 2^53
  if (std::isfinite(value) && value == std::trunc(value) && std::fabs(value) <= kExactIntegers) {
    return static_cast<std::int64_t>(value);
  }
  return value;  // non-finite values print as null
}

template <class T>
Json or_null(const std::optional<T>& value) {
  return value ? Json(*value) : Json(nullptr);
}

/// kid, alg and jwk; the caller may add members.
Json key_object(const std::string& kid, const std::string& alg, const Jwk& jwk) {
  return Json{{"kid", kid}, {"alg", alg}, {"jwk", jwk}};
}

// ---- What to sign or verify: shared by sign and verify --------------------------------------

/// --in FILE | --digest HEX | --data STRING, exactly one.
class InputFlags {
 public:
  void define(CLI::App& command, std::string_view verb) {
    auto* group = command.add_option_group("input", "what to " + std::string(verb) + " (one of)");
    in_ = group->add_option("--in", in_file_, "read the message from FILE ('-': standard input)")
              ->type_name("FILE");
    digest_ = group
                  ->add_option("--digest", digest_hex_,
                               "a digest computed by the caller, in hex (32 bytes for ES256)")
                  ->type_name("HEX");
    data_ = group->add_option("--data", data_text_, "the message given on the command line")
                ->type_name("STRING");
    group->require_option(1);
  }

  struct Input {
    bool is_digest = false;
    Bytes bytes;
  };

  [[nodiscard]] Input read(const Context& context) const {
    if (digest_->count() > 0) {
      return {true, decode_hex(digest_hex_)};
    }
    if (in_->count() > 0) {
      return {false, read_file(in_file_, context.max_input_bytes())};
    }
    return {false, Bytes(data_text_.begin(), data_text_.end())};
  }

 private:
  std::string in_file_, digest_hex_, data_text_;
  CLI::Option* in_ = nullptr;
  CLI::Option* digest_ = nullptr;
  CLI::Option* data_ = nullptr;
};

/// --alg A --format raw|der, as SignOptions.
class SignFlags {
 public:
  void define(CLI::App& command) {
    alg_ =
        command.add_option("--alg", alg_value_, "algorithm (default: the key's)")->type_name("ALG");
    format_ = command
                  .add_option("--format", format_value_,
                              "signature encoding: raw (JOSE r||s, default) or der")
                  ->type_name("FORMAT")
                  ->check(CLI::IsMember({"raw", "der"}));
  }
  [[nodiscard]] SignOptions options() const {
    SignOptions options;
    if (alg_->count() > 0) {
      options.alg = alg_value_;
    }
    if (format_->count() > 0) {
      options.format = format_value_;
    }
    return options;
  }

 private:
  std::string alg_value_, format_value_;
  CLI::Option* alg_ = nullptr;
  CLI::Option* format_ = nullptr;
};

// ---- Commands -------------------------------------------------------------------------------

class HealthCommand final : public Command {
 public:
  void define(CLI::App& /*command*/) override {}
  ExitCode run(Context& context) override {
    const Health health = context.client().health();
    if (context.json()) {
      print_json(context.out(), {{"ok", health.ok},
                                 {"latency_ms", number(health.latency_ms)},
                                 {"error", or_null(health.error)},
                                 {"token",
                                  {{"label", health.token.label},
                                   {"manufacturer", health.token.manufacturer},
                                   {"model", health.token.model},
                                   {"serial", health.token.serial}}}});
    } else {
      auto& out = context.out();
      out << (health.ok ? "ok" : "NOT OK");
      if (health.error) {
        out << ": " << *health.error;
      }
      out << "\ntoken:   " << health.token.label << " (" << health.token.manufacturer << ", "
          << health.token.model << ", serial " << health.token.serial
          << ")\nlatency: " << format_ms(health.latency_ms) << " ms\n";
    }
    return health.ok ? ExitCode::kOk : ExitCode::kNegative;
  }
};

class CapabilitiesCommand final : public Command {
 public:
  void define(CLI::App& /*command*/) override {}
  ExitCode run(Context& context) override {
    const Capabilities caps = context.client().capabilities();
    if (context.json()) {
      print_json(context.out(),
                 {{"protocol", caps.protocol},
                  {"agent_version", caps.agent_version},
                  {"can_create", caps.can_create},
                  {"can_import", caps.can_import},
                  {"can_delete", caps.can_delete},
                  {"supported_algs", caps.supported_algs},
                  {"default_alg", caps.default_alg},
                  {"max_message_bytes", caps.max_message_bytes},
                  {"metrics_url", caps.metrics_url ? Json(*caps.metrics_url) : Json(nullptr)}});
      return ExitCode::kOk;
    }
    auto yes_no = [](bool value) { return value ? "yes" : "no"; };
    std::string algs;
    for (const auto& alg : caps.supported_algs) {
      algs += (algs.empty() ? "" : ", ") + alg;
    }
    context.out() << "agent version:     " << caps.agent_version
                  << "\nprotocol:          " << caps.protocol << "\nalgorithms:        " << algs
                  << " (default " << caps.default_alg << ")"
                  << "\ncreate keys:       " << yes_no(caps.can_create)
                  << "\nimport keys:       " << yes_no(caps.can_import)
                  << "\ndelete keys:       " << yes_no(caps.can_delete)
                  << "\nmax message bytes: " << caps.max_message_bytes
                  << "\nmetrics:           " << caps.metrics_url.value_or("none") << '\n';
    return ExitCode::kOk;
  }
};

class KeysCommand final : public Command {
 public:
  void define(CLI::App& /*command*/) override {}
  ExitCode run(Context& context) override {
    const auto keys = context.client().list_keys();
    if (context.json()) {
      Json list = Json::array();
      for (const auto& key : keys) {
        list.push_back(key_object(key.kid, key.alg, key.jwk));
      }
      print_json(context.out(), {{"keys", std::move(list)}});
      return ExitCode::kOk;
    }
    if (keys.empty()) {
      context.out() << "no keys\n";
      return ExitCode::kOk;
    }
    std::size_t width = 3;
    for (const auto& key : keys) {
      width = std::max(width, key.kid.size());
    }
    context.out() << std::left << std::setw(static_cast<int>(width + 2)) << "KID"
                  << "ALG\n";
    for (const auto& key : keys) {
      context.out() << std::setw(static_cast<int>(width + 2)) << key.kid << key.alg << '\n';
    }
    context.out() << std::right;
    return ExitCode::kOk;
  }
};

/// The JWKS document is JSON by nature: the same output with or without --json.
class JwksCommand final : public Command {
 public:
  void define(CLI::App& /*command*/) override {}
  ExitCode run(Context& context) override {
    const auto keys = context.client().get_jwks();
    print_json(context.out(), {{"keys", keys}});
    return ExitCode::kOk;
  }
};

class GenerateCommand final : public Command {
 public:
  void define(CLI::App& command) override {
    command.add_option("kid", kid_, "the new key's id (its CKA_LABEL)")
        ->required()
        ->type_name("KID");
    alg_ = command.add_option("--alg", alg_value_, "algorithm (default: the agent's)")
               ->type_name("ALG");
    rsa_bits_ = command.add_option("--rsa-bits", rsa_bits_value_, "RSA modulus size in bits")
                    ->type_name("N");
  }
  ExitCode run(Context& context) override {
    std::optional<std::string> alg;
    if (alg_->count() > 0) {
      alg = alg_value_;
    }
    std::optional<std::uint32_t> rsa_bits;
    if (rsa_bits_->count() > 0) {
      rsa_bits = rsa_bits_value_;
    }
    const KeyInfo key = context.client().generate_key(kid_, alg, rsa_bits);
    if (context.json()) {
      print_json(context.out(), key_object(key.kid, key.alg, key.jwk));
    } else {
      context.out() << "generated " << key.kid << " (" << key.alg << ")\n"
                    << json_text(key.jwk) << '\n';
    }
    return ExitCode::kOk;
  }

 private:
  std::string kid_, alg_value_;
  std::uint32_t rsa_bits_value_ = 0;
  CLI::Option* alg_ = nullptr;
  CLI::Option* rsa_bits_ = nullptr;
};

class SignCommand final : public Command {
 public:
  void define(CLI::App& command) override {
    command.add_option("kid", kid_, "the signing key")->required()->type_name("KID");
    input_.define(command, "sign");
    sign_flags_.define(command);
    out_ = command
               .add_option("--out", out_file_,
                           "write the raw signature bytes to FILE instead of printing base64url")
               ->type_name("FILE");
  }
  ExitCode run(Context& context) override {
    const auto input = input_.read(context);
    auto& client = context.client();
    const Signature signature =
        input.is_digest ? client.sign_digest_detailed(kid_, input.bytes, sign_flags_.options())
                        : client.sign_detailed(kid_, input.bytes, sign_flags_.options());
    if (out_->count() > 0) {
      write_file(out_file_, signature.signature);
    }
    if (context.json()) {
      print_json(context.out(), {{"kid", signature.kid},
                                 {"alg", signature.alg},
                                 {"signature", encode_base64url(signature.signature)}});
    } else if (out_->count() == 0) {
      context.out() << encode_base64url(signature.signature) << '\n';
    }
    return ExitCode::kOk;
  }

 private:
  std::string kid_, out_file_;
  InputFlags input_;
  SignFlags sign_flags_;
  CLI::Option* out_ = nullptr;
};

class VerifyCommand final : public Command {
 public:
  void define(CLI::App& command) override {
    command.add_option("kid", kid_, "the key that made the signature")
        ->required()
        ->type_name("KID");
    input_.define(command, "verify");
    auto* group = command.add_option_group("signature", "the signature (one of)");
    sig_text_ = group->add_option("--sig-b64url", sig_text_value_, "the signature in base64url")
                    ->type_name("S");
    sig_file_ = group->add_option("--sig-file", sig_file_value_, "a file with the raw signature")
                    ->type_name("FILE");
    group->require_option(1);
    sign_flags_.define(command);
  }
  ExitCode run(Context& context) override {
    const auto input = input_.read(context);
    const Bytes signature = sig_text_->count() > 0
                                ? decode_base64url(sig_text_value_)
                                : read_file(sig_file_value_, kMaxSignatureFileBytes);
    auto& client = context.client();
    const bool valid =
        input.is_digest ? client.verify_digest(kid_, input.bytes, signature, sign_flags_.options())
                        : client.verify(kid_, input.bytes, signature, sign_flags_.options());
    if (context.json()) {
      print_json(context.out(), {{"valid", valid}});
    } else {
      context.out() << (valid ? "valid" : "invalid") << '\n';
    }
    return valid ? ExitCode::kOk : ExitCode::kNegative;
  }

 private:
  std::string kid_, sig_text_value_, sig_file_value_;
  InputFlags input_;
  SignFlags sign_flags_;
  CLI::Option* sig_text_ = nullptr;
  CLI::Option* sig_file_ = nullptr;
};

class PublicKeyCommand final : public Command {
 public:
  void define(CLI::App& command) override {
    command.add_option("kid", kid_, "the key")->required()->type_name("KID");
    command.add_option("--format", format_, "jwk (default) or pem (the SubjectPublicKeyInfo)")
        ->type_name("FORMAT")
        ->check(CLI::IsMember({"jwk", "pem"}));
  }
  ExitCode run(Context& context) override {
    const PublicKey key = context.client().get_public_key(kid_);
    if (context.json()) {
      Json document = key_object(key.kid, key.alg, key.jwk);
      document["pem"] = spki_to_pem(key.spki);
      print_json(context.out(), document);
    } else if (format_ == "pem") {
      context.out() << spki_to_pem(key.spki);
    } else {
      context.out() << json_text(key.jwk) << '\n';
    }
    return ExitCode::kOk;
  }

 private:
  std::string kid_, format_ = "jwk";
};

class DeleteCommand final : public Command {
 public:
  void define(CLI::App& command) override {
    command.add_option("kid", kid_, "the key to delete (private and public objects)")
        ->required()
        ->type_name("KID");
  }
  ExitCode run(Context& context) override {
    const bool deleted = context.client().delete_key(kid_);
    if (context.json()) {
      print_json(context.out(), {{"kid", kid_}, {"deleted", deleted}});
    } else {
      context.out() << (deleted ? "deleted " : "no such key: ") << kid_ << '\n';
    }
    return deleted ? ExitCode::kOk : ExitCode::kNegative;
  }

 private:
  std::string kid_;
};

/// `hsmctl metrics`: the agent's own /metrics and /readyz, summarised (metrics_summary.hpp).
/// Without --metrics-url or $HSM_AGENT_METRICS_URL it asks the agent on --socket where its
/// metrics are (capabilities.metrics_url), so it summarises that agent and never a guess.
class MetricsCommand final : public Command {
 public:
  void define(CLI::App& command) override {
    const char* env = std::getenv("HSM_AGENT_METRICS_URL");
    if (env != nullptr) url_ = env;
    command
        .add_option("--metrics-url", url_,
                    "the agent's /metrics ($HSM_AGENT_METRICS_URL, else the address the agent "
                    "on --socket gives in capabilities)")
        ->type_name("URL");
  }
  ExitCode run(Context& context) override {
    if (url_.empty()) {
      // Throws hsm::Error when no agent answers on the socket (exit 4, like every command).
      const Capabilities caps = context.client().capabilities();
      if (!caps.metrics_url) {
        context.err() << "hsmctl: the agent on " << context.socket()
                      << " does not say where its metrics are (it serves none, "
                         "--metrics-listen \"\", or predates capabilities.metrics_url); give "
                         "--metrics-url\n";
        return ExitCode::kUsage;
      }
      url_ = *caps.metrics_url;
    }
    constexpr std::size_t kMaxMetricsBytes = std::size_t{8} * 1024 * 1024;
    constexpr std::size_t kMaxReadyBytes = 64 * 1024;
    const auto timeout = std::chrono::milliseconds{context.timeout_ms()};
    HttpAnswer metrics;
    HttpAnswer ready;
    try {
      metrics = http_get(url_, timeout, kMaxMetricsBytes);
      ready = http_get(with_path(url_, "/readyz"), timeout, kMaxReadyBytes);
    } catch (const std::invalid_argument& error) {
      throw UsageError(error.what());
    } catch (const MetricsUnreachable& error) {
      context.err() << "hsmctl: " << error.what() << '\n';
      return ExitCode::kCannotConnect;
    }
    if (metrics.status != 200) {
      context.err() << "hsmctl: " << url_ << " answered HTTP " << metrics.status << '\n';
      return ExitCode::kAgentError;
    }
    MetricsSummary summary = summarize(parse_exposition(metrics.body));
    summary.ready = ready.status == 200;
    summary.ready_text = ready.body.substr(0, ready.body.find('\n'));
    if (context.json()) {
      print_json(context.out(), summary);
    } else {
      print_text(context.out(), summary);
    }
    return ExitCode::kOk;
  }

 private:
  static std::string ms(const std::optional<double>& seconds) {
    return seconds ? format_ms(*seconds * 1000.0) + " ms" : "n/a";
  }
  static std::string yes_no(const std::optional<double>& flag) {
    if (!flag) return "n/a";
    return *flag == 1 ? "yes" : "no";
  }
  static std::string count(const std::optional<double>& value) {
    if (!value) return "n/a";
    std::ostringstream text;
    text << static_cast<long long>(*value);
    return text.str();
  }
  static std::string counts(const std::map<std::string, double>& values) {
    std::ostringstream text;
    bool first = true;
    for (const auto& [name, value] : values) {
      text << (first ? "" : ", ") << name << ' ' << static_cast<long long>(value);
      first = false;
    }
    return first ? "none" : text.str();
  }
  static void print_text(std::ostream& out, const MetricsSummary& s) {
    double total = 0;
    for (const auto& [code, value] : s.requests_by_code) total += value;
    out << "agent:         " << (s.version.empty() ? "?" : s.version) << ", token '"
        << s.token_label << "'\n"
        << "hsm up:        " << yes_no(s.hsm_up) << '\n'
        << "ready:         " << (s.ready ? "yes" : "no (" + s.ready_text + ")") << '\n'
        << "requests:      " << static_cast<long long>(total) << " (" << counts(s.requests_by_code)
        << ")\n"
        << "sign latency:  p50 " << ms(s.sign_p50_seconds) << ", p99 " << ms(s.sign_p99_seconds)
        << " (" << static_cast<long long>(s.sign_count) << " signs since start)\n"
        << "queue wait:    p99 " << ms(s.queue_wait_p99_seconds) << ", in flight "
        << count(s.requests_in_flight) << '\n'
        << "sessions:      idle " << count(s.sessions_idle) << ", busy " << count(s.sessions_busy)
        << '\n'
        << "pkcs11 errors: " << counts(s.pkcs11_errors_by_ckr) << '\n'
        << "connections:   open " << count(s.connections_open) << ", accepted "
        << count(s.connections_accepted) << ", rejected "
        << counts(s.connections_rejected_by_reason) << '\n';
  }
  static Json number_map(const std::map<std::string, double>& values) {
    Json object = Json::object();
    for (const auto& [name, value] : values) object[name] = number(value);
    return object;
  }
  static Json optional_number(const std::optional<double>& value) {
    return value ? number(*value) : Json(nullptr);
  }
  static void print_json(std::ostream& out, const MetricsSummary& s) {
    ::hsm::hsmctl::print_json(
        out,
        {{"version", s.version},
         {"token_label", s.token_label},
         {"hsm_up", s.hsm_up ? Json(*s.hsm_up == 1) : Json(nullptr)},
         {"ready", s.ready},
         {"ready_text", s.ready_text},
         {"requests_by_code", number_map(s.requests_by_code)},
         {"sign",
          {{"count", number(s.sign_count)},
           {"p50_seconds", optional_number(s.sign_p50_seconds)},
           {"p99_seconds", optional_number(s.sign_p99_seconds)}}},
         {"queue_wait_p99_seconds", optional_number(s.queue_wait_p99_seconds)},
         {"requests_in_flight", optional_number(s.requests_in_flight)},
         {"sessions",
          {{"idle", optional_number(s.sessions_idle)}, {"busy", optional_number(s.sessions_busy)}}},
         {"pkcs11_errors_by_ckr", number_map(s.pkcs11_errors_by_ckr)},
         {"connections",
          {{"open", optional_number(s.connections_open)},
           {"accepted", optional_number(s.connections_accepted)},
           {"rejected_by_reason", number_map(s.connections_rejected_by_reason)}}}});
  }

  std::string url_;
};

template <class C>
std::unique_ptr<Command> make_command() {
  return std::make_unique<C>();
}

constexpr std::array kCommands{
    CommandEntry{"health", "check that the agent reaches the token (exit 1 when not ok)",
                 &make_command<HealthCommand>},
    CommandEntry{"caps", "the agent's capabilities", &make_command<CapabilitiesCommand>},
    CommandEntry{"keys", "list the keys", &make_command<KeysCommand>},
    CommandEntry{"jwks", "print the public keys as a JWKS document", &make_command<JwksCommand>},
    CommandEntry{"gen", "generate a key pair inside the token", &make_command<GenerateCommand>},
    CommandEntry{"sign", "sign a message or digest (prints the signature in base64url)",
                 &make_command<SignCommand>},
    CommandEntry{"verify", "verify a signature (exit 0 valid, 1 invalid)",
                 &make_command<VerifyCommand>},
    CommandEntry{"pubkey", "print a public key as JWK or PEM", &make_command<PublicKeyCommand>},
    CommandEntry{"delete", "delete a key (exit 1 when there was none)",
                 &make_command<DeleteCommand>},
    CommandEntry{"metrics", "summarise the agent's /metrics and /readyz (--metrics-url)",
                 &make_command<MetricsCommand>},
    CommandEntry{"bench", "signing load: throughput and latency (N connections x depth D)",
                 &make_bench_command},
};

void report_error(bool json, const hsm::Error& error, std::ostream& err) {
  if (json) {
    print_json(
        err,
        {{"error",
          {{"code", error.code()}, {"message", error.message()}, {"ckr", or_null(error.ckr())}}}});
  } else {
    err << "hsmctl: " << error.what() << '\n';
  }
}

constexpr std::string_view kExitCodes =
    "Exit codes: 0 success, 1 negative answer (invalid signature, health not ok, no such key to\n"
    "delete), 2 usage error, 3 agent error (code and message on stderr), 4 cannot connect.";

}  // namespace

hsm::Client& Context::client() {
  if (!client_) {
    ClientOptions client_options;
    client_options.socket_path = options_.socket;
    client_options.timeout = std::chrono::milliseconds{options_.timeout_ms};
    // An operator wants the answer, or the reason there is none, now: no retries.
    client_options.retry.max_attempts = 1;
    client_.emplace(std::move(client_options));
  }
  return *client_;
}

std::size_t Context::max_input_bytes() const {
  // The message travels inside a request that also carries the kid and the framing.
  constexpr std::size_t kRequestOverheadBytes = 4096;
  return ClientOptions{}.max_request_bytes - kRequestOverheadBytes;
}

std::span<const CommandEntry> command_table() {
  return kCommands;
}

int run_hsmctl(std::span<const std::string> args, std::ostream& out, std::ostream& err) {
  GlobalOptions options;
  CLI::App app{"hsmctl: operate hsm-agent, the PKCS#11 signing sidecar, over its Unix socket.",
               "hsmctl"};
  app.footer(std::string(kExitCodes));
  app.add_option("--socket", options.socket,
                 "the agent's socket ($HSM_AGENT_SOCKET, else /run/hsm-agent/agent.sock)")
      ->type_name("PATH")
      ->capture_default_str();
  app.add_flag("--json", options.json, "print one JSON document instead of text");
  app.add_option("--timeout", options.timeout_ms, "per-call timeout in milliseconds")
      ->type_name("MS")
      ->capture_default_str()
      ->check(CLI::Range(1u, 3'600'000u));
  app.require_subcommand(1);
  app.fallthrough();  // global flags are accepted after the command too: `hsmctl health --json`

  std::vector<std::pair<CLI::App*, std::unique_ptr<Command>>> commands;
  for (const CommandEntry& entry : command_table()) {
    CLI::App* sub = app.add_subcommand(std::string(entry.name), std::string(entry.summary));
    auto command = entry.make();
    command->define(*sub);
    commands.emplace_back(sub, std::move(command));
  }

  std::vector<const char*> argv;
  for (const auto& arg : args) {
    argv.push_back(arg.c_str());
  }
  if (argv.empty()) {
    argv.push_back("hsmctl");
  }
  try {
    app.parse(static_cast<int>(argv.size()), argv.data());
  } catch (const CLI::ParseError& error) {
    const int code = app.exit(error, out, err);  // prints help, or the error with a hint
    return code == 0 ? static_cast<int>(ExitCode::kOk) : static_cast<int>(ExitCode::kUsage);
  }

  Context context(options, out, err);
  for (auto& [sub, command] : commands) {
    if (!sub->parsed()) {
      continue;
    }
    try {
      return static_cast<int>(command->run(context));
    } catch (const UsageError& error) {
      err << "hsmctl: " << error.what() << '\n';
      return static_cast<int>(ExitCode::kUsage);
    } catch (const hsm::Error& error) {
      report_error(options.json, error, err);
      return static_cast<int>(error.errc() == Errc::kConnectionFailed ? ExitCode::kCannotConnect
                                                                      : ExitCode::kAgentError);
    } catch (const std::exception& error) {
      err << "hsmctl: " << error.what() << '\n';
      return static_cast<int>(ExitCode::kAgentError);
    }
  }
  return static_cast<int>(ExitCode::kUsage);  // unreachable: require_subcommand(1)
}

}  // namespace hsm::hsmctl
