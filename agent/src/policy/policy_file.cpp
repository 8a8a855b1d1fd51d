#include "policy/policy_file.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstring>
#include <functional>
#include <limits>
#include <system_error>
#include <utility>

#include "config/trusted_path.hpp"
#include "hsm/common/file_descriptor.hpp"

namespace hsm::agent {
namespace {

std::string format_message(const std::string& source, std::optional<std::size_t> line,
                           std::optional<std::size_t> column, const std::string& problem) {
  std::string message = source;
  if (line) {
    message += ':' + std::to_string(*line);
    if (column) message += ':' + std::to_string(*column);
  }
  return message + ": " + problem;
}

std::string known_method_names() {
  std::string names;
  for (const auto method : protocol::all_methods()) {
    names += std::string(protocol::to_string(method)) + ", ";
  }
  return names + "or \"*\" for all";
}

// uid_t and gid_t are 32-bit; (uid_t)-1 means "no change" to the kernel and is nobody's id.
constexpr std::uint64_t kMaxId = std::numeric_limits<std::uint32_t>::max() - 1;

/// Walks one YAML document and builds the rules; every problem is a PolicyError at the
/// offending node's position. `path` strings ("rules[1].match.uids[0]") say where in the
/// structure, the position says where in the file.
class PolicyParser {
 public:
  explicit PolicyParser(const std::string& source) : source_(source) {}

  std::vector<PolicyRule> parse_document(const YAML::Node& root) {
    if (root.IsNull()) fail(root, "the policy is empty: it needs a `rules:` list");
    if (!root.IsMap()) fail(root, "the policy must be a map with a `rules:` list");
    std::optional<YAML::Node> rules;
    for_each_entry(root, "the policy", {"rules"},
                   [&rules](const std::string&, const YAML::Node& value) { rules = value; });
    if (!rules) fail(root, "the policy has no `rules:` list");
    if (!rules->IsSequence()) fail(*rules, "rules: must be a list of rules");
    if (rules->size() == 0) fail(*rules, "rules: is empty, so no caller could connect");
    if (rules->size() > kMaxPolicyRules) {
      fail(*rules, "rules: more than " + std::to_string(kMaxPolicyRules) + " rules");
    }
    std::vector<PolicyRule> parsed;
    parsed.reserve(rules->size());
    std::size_t index = 0;
    for (const auto& node : *rules) {
      parsed.push_back(parse_rule(node, "rules[" + std::to_string(index) + "]"));
      ++index;
    }
    check_unique_names(*rules, parsed);
    return parsed;
  }

 private:
  using EntryHandler = std::function<void(const std::string& key, const YAML::Node& value)>;

  [[noreturn]] void fail(const YAML::Node& at, const std::string& problem) const {
    const YAML::Mark mark = at.Mark();
    if (mark.is_null()) throw PolicyError(source_, std::nullopt, std::nullopt, problem);
    throw PolicyError(source_, static_cast<std::size_t>(mark.line) + 1,
                      static_cast<std::size_t>(mark.column) + 1, problem);
  }

  /// Calls `handle` for each key of the map `node`; an unknown or repeated key is an error
  /// (YAML parsers keep both copies of a repeated key, and which one wins is not obvious).
  void for_each_entry(const YAML::Node& node, const std::string& path,
                      std::initializer_list<std::string_view> known, const EntryHandler& handle) {
    std::vector<std::string> seen;
    for (const auto& entry : node) {
      const YAML::Node& key = entry.first;
      if (!key.IsScalar()) fail(key, path + ": keys must be plain words");
      const std::string& name = key.Scalar();
      if (std::find(known.begin(), known.end(), name) == known.end()) {
        std::string expected;
        for (const auto known_key : known) {
          expected += (expected.empty() ? "" : ", ") + std::string(known_key);
        }
        fail(key, path + ": unknown key '" + name + "' (expected: " + expected + ")");
      }
      if (std::find(seen.begin(), seen.end(), name) != seen.end()) {
        fail(key, path + ": '" + name + "' is given twice");
      }
      seen.push_back(name);
      handle(name, entry.second);
    }
  }

  const YAML::Node& require_list(const YAML::Node& node, const std::string& path,
                                 const std::string& example) const {
    if (!node.IsSequence()) fail(node, path + " must be a list, e.g. " + example);
    if (node.size() > kMaxPolicyListItems) {
      fail(node, path + " has more than " + std::to_string(kMaxPolicyListItems) + " items");
    }
    return node;
  }

  std::string scalar(const YAML::Node& node, const std::string& path,
                     const std::string& what) const {
    if (!node.IsScalar()) fail(node, path + " must be " + what);
    return node.Scalar();
  }

  bool boolean(const YAML::Node& node, const std::string& path) const {
    const std::string text = scalar(node, path, "true or false");
    if (text == "true") return true;
    if (text == "false") return false;
    fail(node, path + " must be true or false, not '" + text + "'");
  }

  std::uint32_t id(const YAML::Node& node, const std::string& path, const char* kind) const {
    const std::string what =
        std::string("a numeric ") + kind + " from 0 to " + std::to_string(kMaxId);
    const std::string text = scalar(node, path, what);
    std::uint64_t value = 0;
    const auto* end = text.data() + text.size();
    const auto [ptr, ec] = std::from_chars(text.data(), end, value);
    if (text.empty() || ec != std::errc() || ptr != end || value > kMaxId) {
      fail(node, path + ": '" + text + "' is not " + what + " (names are not resolved)");
    }
    return static_cast<std::uint32_t>(value);
  }

  template <typename Id>
  std::vector<Id> ids(const YAML::Node& node, const std::string& path, const char* kind) const {
    require_list(node, path, "[10001]");
    std::vector<Id> out;
    out.reserve(node.size());
    std::size_t index = 0;
    for (const auto& item : node) {
      out.push_back(static_cast<Id>(id(item, path + "[" + std::to_string(index) + "]", kind)));
      ++index;
    }
    return out;
  }

  CallerMatch parse_match(const YAML::Node& node, const std::string& path) {
    if (!node.IsMap()) {
      fail(node, path + " must be a map: { uids: [...] }, { gids: [...] } or { any: true }");
    }
    CallerMatch match;
    bool any_given = false;
    for_each_entry(node, path, {"uids", "gids", "any"},
                   [&](const std::string& key, const YAML::Node& value) {
                     const std::string at = path + "." + key;
                     if (key == "uids") {
                       match.uids = ids<uid_t>(value, at, "uid");
                     } else if (key == "gids") {
                       match.gids = ids<gid_t>(value, at, "gid");
                     } else {
                       match.any = boolean(value, at);
                       any_given = true;
                     }
                   });
    if (match.any && (!match.uids.empty() || !match.gids.empty())) {
      fail(node, path + ": `any: true` already selects every caller; remove uids and gids");
    }
    if (!match.any && match.uids.empty() && match.gids.empty()) {
      fail(node, path + (any_given ? ": `any: false` and no uids or gids selects no caller"
                                   : ": selects no caller; give uids, gids or `any: true`"));
    }
    return match;
  }

  MethodSet parse_methods(const YAML::Node& node, const std::string& path) {
    require_list(node, path, "[sign, get_public_key]");
    if (node.size() == 0) fail(node, path + " is empty: grant at least one method");
    MethodSet methods;
    std::size_t index = 0;
    for (const auto& item : node) {
      const std::string at = path + "[" + std::to_string(index++) + "]";
      const std::string name = scalar(item, at, "a method name");
      if (name == "*") {
        methods = MethodSet::all();
      } else if (const auto method = protocol::parse_method(name)) {
        methods.add(*method);
      } else {
        fail(item, at + ": unknown method '" + name + "' (known: " + known_method_names() + ")");
      }
    }
    return methods;
  }

  std::vector<KidPattern> parse_kids(const YAML::Node& node, const std::string& path) {
    require_list(node, path, "[\"app-*\"]");
    if (node.size() == 0) fail(node, path + " is empty: list at least one kid pattern");
    std::vector<KidPattern> kids;
    kids.reserve(node.size());
    std::size_t index = 0;
    for (const auto& item : node) {
      const std::string at = path + "[" + std::to_string(index++) + "]";
      std::string pattern = scalar(item, at, "a kid pattern");
      if (const auto problem = KidPattern::problem(pattern); !problem.empty()) {
        fail(item, at + ": " + problem);
      }
      kids.emplace_back(std::move(pattern));
    }
    return kids;
  }

  PolicyRule parse_rule(const YAML::Node& node, const std::string& path) {
    if (!node.IsMap()) fail(node, path + " must be a map with match, methods and kids");
    PolicyRule rule;
    bool has_match = false;
    bool has_methods = false;
    std::optional<YAML::Node> kids_node;
    for_each_entry(node, path, {"name", "match", "methods", "kids"},
                   [&](const std::string& key, const YAML::Node& value) {
                     const std::string at = path + "." + key;
                     if (key == "name") {
                       rule.name = scalar(value, at, "a string");
                       if (rule.name.empty()) fail(value, at + " must not be empty");
                     } else if (key == "match") {
                       rule.match = parse_match(value, at);
                       has_match = true;
                     } else if (key == "methods") {
                       rule.methods = parse_methods(value, at);
                       has_methods = true;
                     } else {
                       rule.kids = parse_kids(value, at);
                       kids_node = value;
                     }
                   });
    if (!has_match) fail(node, path + " has no `match:` (which callers the rule is for)");
    if (!has_methods) fail(node, path + " has no `methods:` (what the rule grants)");
    std::optional<protocol::Method> kid_method;
    for (const auto method : protocol::all_methods()) {
      if (rule.methods.contains(method) && method_takes_kid(method)) {
        kid_method = method;
        break;
      }
    }
    // Omitted kids are never "every key": a rule that can touch keys says which, so widening
    // a rule's methods cannot silently grant every key.
    if (kid_method && !kids_node) {
      fail(node,
           path + " grants " + std::string(protocol::to_string(*kid_method)) +
               ", which takes a kid: add `kids:` (e.g. [\"app-*\"], or [\"*\"] for every key)");
    }
    if (!kid_method && kids_node) {
      fail(*kids_node, path +
                           ".kids: none of the rule's methods takes a kid, so kids has no "
                           "effect (list_keys and get_jwks always list every key); remove it");
    }
    return rule;
  }

  void check_unique_names(const YAML::Node& rules, const std::vector<PolicyRule>& parsed) const {
    for (std::size_t i = 0; i < parsed.size(); ++i) {
      if (parsed[i].name.empty()) continue;
      for (std::size_t j = 0; j < i; ++j) {
        if (parsed[j].name == parsed[i].name) {
          fail(rules[i], "rules[" + std::to_string(i) + "]: the name '" + parsed[i].name +
                             "' is already used by rules[" + std::to_string(j) + "]");
        }
      }
    }
  }

  const std::string& source_;
};

}  // namespace

PolicyError::PolicyError(std::string source, std::optional<std::size_t> line,
                         std::optional<std::size_t> column, const std::string& problem)
    : std::runtime_error(format_message(source, line, column, problem)),
      source_(std::move(source)),
      line_(line),
      column_(column) {}

std::vector<PolicyRule> parse_policy(std::string_view text, const std::string& source) {
  if (text.size() > kMaxPolicyFileBytes) {
    throw PolicyError(source, std::nullopt, std::nullopt,
                      "larger than " + std::to_string(kMaxPolicyFileBytes) + " bytes");
  }
  try {
    const std::vector<YAML::Node> documents = YAML::LoadAll(std::string(text));
    if (documents.size() > 1) {
      throw PolicyError(source, std::nullopt, std::nullopt,
                        "holds " + std::to_string(documents.size()) +
                            " YAML documents; a policy is one document");
    }
    PolicyParser parser(source);
    return parser.parse_document(documents.empty() ? YAML::Node() : documents.front());
  } catch (const YAML::Exception& e) {
    // Syntax errors (and yaml-cpp's own limits, such as nesting depth) carry their position.
    if (e.mark.is_null()) throw PolicyError(source, std::nullopt, std::nullopt, e.msg);
    throw PolicyError(source, static_cast<std::size_t>(e.mark.line) + 1,
                      static_cast<std::size_t>(e.mark.column) + 1, "invalid YAML: " + e.msg);
  }
}

std::vector<PolicyRule> load_policy_file(const std::string& path) {
  const auto error = [&path](const std::string& problem) {
    return PolicyError(path, std::nullopt, std::nullopt, problem);
  };
  const auto system_error = [&error](const std::string& what) {
    return error(what + ": " + std::strerror(errno));
  };
  // Who may change the file decides what callers may do: the file, its directory and every
  // directory and symlink on the way must be root's or the agent's (config/trusted_path.hpp).
  // Resolving the path here follows a ConfigMap's symlinks while checking each of them.
  TrustedPath found;
  try {
    found = resolve_trusted_path(path, ::geteuid());
  } catch (const UntrustedPathError& e) {
    throw error(e.what());
  } catch (const std::system_error& e) {
    throw error(std::string("cannot open the policy file: ") + e.what());
  }
  // Checked before open(): opening a FIFO waits for a writer, opening a device may do anything.
  if (!S_ISREG(found.st.st_mode)) {
    throw error("the policy is not a regular file (" + found.resolved + ")");
  }
  if (const auto access = foreign_write_access(found.resolved, found.st)) {
    throw error(access->description + ", so " + access->who +
                " could grant themselves every key (" + access->fix + ")");
  }
  // O_NOFOLLOW and O_NONBLOCK: should the file have been swapped since the checks (by root or
  // the agent's uid: no one else can), the agent still never follows a link nor waits.
  const common::FileDescriptor fd(
      ::open(found.resolved.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY));
  if (fd.get() < 0) throw system_error("cannot open the policy file " + found.resolved);
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) throw system_error("cannot stat the policy file");
  if (!S_ISREG(st.st_mode) || st.st_dev != found.st.st_dev || st.st_ino != found.st.st_ino) {
    throw error("the policy file changed while it was being read; try again");
  }
  if (static_cast<std::uint64_t>(st.st_size) > kMaxPolicyFileBytes) {
    throw error("larger than " + std::to_string(kMaxPolicyFileBytes) + " bytes");
  }
  // Read at most one byte past the limit: the file may grow between fstat and read.
  std::string text(kMaxPolicyFileBytes + 1, '\0');
  std::size_t filled = 0;
  while (filled < text.size()) {
    const ssize_t n = ::read(fd.get(), text.data() + filled, text.size() - filled);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throw system_error("cannot read the policy file");
    if (n == 0) break;
    filled += static_cast<std::size_t>(n);
  }
  text.resize(filled);
  return parse_policy(text, path);
}

}  // namespace hsm::agent
