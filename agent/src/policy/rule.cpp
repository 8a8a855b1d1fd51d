#include "policy/rule.hpp"

#include <fnmatch.h>

#include <algorithm>
#include <utility>

namespace hsm::agent {
namespace {

// A pattern longer than this is a mistake: a kid is at most 255 bytes, and even a pattern that
// spells each byte as a bracket set stays far below.
constexpr std::size_t kMaxPatternBytes = 4096;

bool is_glob_special(char c) noexcept {
  return c == '*' || c == '?' || c == '[' || c == '\\';
}

}  // namespace

MethodSet MethodSet::all() noexcept {
  MethodSet set;
  for (const auto method : protocol::all_methods()) set.add(method);
  return set;
}

bool method_takes_kid(protocol::Method method) noexcept {
  using protocol::Method;
  switch (method) {
    case Method::kSign:
    case Method::kVerify:
    case Method::kGetPublicKey:
    case Method::kGenerateKey:
    case Method::kDeleteKey:
    case Method::kSignBatch:
      return true;
    case Method::kCapabilities:
    case Method::kHealth:
    case Method::kImportKey:
    case Method::kListKeys:
    case Method::kGetJwks:
      return false;
  }
  return false;
}

std::string KidPattern::problem(std::string_view pattern) {
  if (pattern.empty()) return "a kid pattern must not be empty";
  if (pattern.size() > kMaxPatternBytes) {
    return "a kid pattern must be at most " + std::to_string(kMaxPatternBytes) + " bytes";
  }
  if (pattern.find('\0') != std::string_view::npos) return "a kid pattern must not contain NUL";
  // A trailing lone backslash escapes nothing; fnmatch's treatment of it differs between libcs.
  std::size_t trailing_backslashes = 0;
  for (auto it = pattern.rbegin(); it != pattern.rend() && *it == '\\'; ++it) {
    ++trailing_backslashes;
  }
  if (trailing_backslashes % 2 == 1) {
    return "a kid pattern must not end with a lone backslash (write \\\\ for a literal one)";
  }
  return {};
}

KidPattern::KidPattern(std::string pattern) : pattern_(std::move(pattern)) {
  const auto first_special = std::find_if(pattern_.begin(), pattern_.end(), is_glob_special);
  if (pattern_ == "*") {
    kind_ = Kind::kAny;
  } else if (first_special == pattern_.end()) {
    kind_ = Kind::kExact;
    literal_ = pattern_;
  } else if (*first_special == '*' && first_special + 1 == pattern_.end()) {
    kind_ = Kind::kPrefix;
    literal_.assign(pattern_.begin(), first_special);
  } else {
    kind_ = Kind::kGlob;
  }
}

bool KidPattern::matches(const std::string& kid) const noexcept {
  switch (kind_) {
    case Kind::kAny:
      return true;
    case Kind::kExact:
      return kid == literal_;
    case Kind::kPrefix:
      return kid.starts_with(literal_);
    case Kind::kGlob:
      // Flags 0: '*' and '?' match '/' and a leading '.', and '\' escapes (see the header).
      return ::fnmatch(pattern_.c_str(), kid.c_str(), 0) == 0;
  }
  return false;
}

bool CallerMatch::matches(const Caller& caller) const noexcept {
  if (any) return true;
  return std::find(uids.begin(), uids.end(), caller.uid) != uids.end() ||
         std::find(gids.begin(), gids.end(), caller.gid) != gids.end();
}

bool PolicyRule::allows_kid(const std::string& kid) const noexcept {
  return std::any_of(kids.begin(), kids.end(),
                     [&kid](const KidPattern& pattern) { return pattern.matches(kid); });
}

}  // namespace hsm::agent
