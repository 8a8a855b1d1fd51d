// The policy file parser: what a good file turns into, and for every kind of mistake a
// PolicyError that names the file, the line and the column of the offending text.
#include "policy/policy_file.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <thread>

#include "policy_test_support.hpp"

namespace hsm::agent {
namespace {

using protocol::Method;
using namespace std::chrono_literals;

PolicyError parse_error(const std::string& text) {
  try {
    (void)parse_policy(text, "test.yaml");
  } catch (const PolicyError& e) {
    return e;
  }
  FAIL("expected a PolicyError for:\n" << text);
  throw std::logic_error("unreachable");
}

/// The error's line, and that its message starts with "test.yaml:<line>:".
std::size_t error_line(const PolicyError& e) {
  REQUIRE(e.line().has_value());
  CHECK(std::string(e.what()).rfind("test.yaml:" + std::to_string(*e.line()) + ":", 0) == 0);
  return *e.line();
}

TEST_CASE("a full rule parses into its match, methods and kid patterns") {
  const auto rules = parse_policy(R"(
rules:
  - name: app-signers
    match: { uids: [10001, 10002], gids: [3000] }
    methods: [sign, verify, get_public_key, health]
    kids: ["app-*", "shared"]
  - name: everyone
    match:
      any: true
    methods:
      - health
      - capabilities
)",
                                  "test.yaml");
  REQUIRE(rules.size() == 2);
  CHECK(rules[0].name == "app-signers");
  CHECK(rules[0].match.uids == std::vector<uid_t>{10001, 10002});
  CHECK(rules[0].match.gids == std::vector<gid_t>{3000});
  CHECK_FALSE(rules[0].match.any);
  CHECK(rules[0].methods.contains(Method::kSign));
  CHECK(rules[0].methods.contains(Method::kVerify));
  CHECK(rules[0].methods.contains(Method::kGetPublicKey));
  CHECK(rules[0].methods.contains(Method::kHealth));
  CHECK_FALSE(rules[0].methods.contains(Method::kGenerateKey));
  CHECK_FALSE(rules[0].methods.contains(Method::kListKeys));
  REQUIRE(rules[0].kids.size() == 2);
  CHECK(rules[0].kids[0].text() == "app-*");
  CHECK(rules[1].match.any);
  CHECK(rules[1].kids.empty());
  CHECK(rules[1].methods.contains(Method::kCapabilities));
}

TEST_CASE("\"*\" grants every method, import_key included; names are optional") {
  const auto rules =
      parse_policy("rules:\n- match: {uids: [0]}\n  methods: ['*']\n  kids: ['*']\n", "test.yaml");
  REQUIRE(rules.size() == 1);
  CHECK(rules[0].name.empty());
  CHECK(rules[0].methods == MethodSet::all());
  for (const auto method : protocol::all_methods()) CHECK(rules[0].methods.contains(method));
}

TEST_CASE("uids and gids span 0 .. 4294967294") {
  const auto rules = parse_policy(
      "rules:\n- match: {uids: [0, 4294967294], gids: [0, 4294967294]}\n  methods: [health]\n",
      "test.yaml");
  CHECK(rules[0].match.uids == std::vector<uid_t>{0, 4294967294U});
  CHECK(rules[0].match.gids == std::vector<gid_t>{0, 4294967294U});
}

TEST_CASE("YAML syntax errors give the file, line and column") {
  const auto e = parse_error("rules:\n  - match: {uids: [1]}\n    methods: [health\n");
  CHECK(error_line(e) >= 3);
  CHECK_THAT(e.what(), Catch::Contains("invalid YAML"));
}

TEST_CASE("unknown keys are refused where they stand") {
  SECTION("top level") {
    const auto e = parse_error("version: 1\nrules:\n- match: {uids: [1]}\n  methods: [health]\n");
    CHECK(error_line(e) == 1);
    CHECK(e.column() == 1);
    CHECK_THAT(e.what(), Catch::Contains("unknown key 'version'"));
  }
  SECTION("in a rule: a misspelt kids would otherwise be dropped") {
    const auto e = parse_error(R"(rules:
  - name: a
    match: { uids: [1] }
    methods: [sign]
    kid: ["app-*"]
)");
    CHECK(error_line(e) == 5);
    CHECK(e.column() == 5);
    CHECK_THAT(e.what(), Catch::Contains("rules[0]: unknown key 'kid'"));
    CHECK_THAT(e.what(), Catch::Contains("expected: name, match, methods, kids"));
  }
  SECTION("in a match") {
    const auto e = parse_error("rules:\n- match: {uid: [1]}\n  methods: [health]\n");
    CHECK(error_line(e) == 2);
    CHECK_THAT(e.what(), Catch::Contains("rules[0].match: unknown key 'uid'"));
  }
}

TEST_CASE("a key given twice is refused") {
  const auto e = parse_error(R"(rules:
  - match: { uids: [1] }
    methods: [health]
    methods: [health, generate_key]
)");
  CHECK(error_line(e) == 4);
  CHECK_THAT(e.what(), Catch::Contains("'methods' is given twice"));
}

TEST_CASE("unknown methods are refused, with the known names") {
  const auto e = parse_error(R"(rules:
  - match: { uids: [1] }
    methods: [sign, sgn]
    kids: ["*"]
)");
  CHECK(error_line(e) == 3);
  CHECK(e.column() == 21);
  CHECK_THAT(e.what(), Catch::Contains("rules[0].methods[1]: unknown method 'sgn'"));
  CHECK_THAT(e.what(), Catch::Contains("get_public_key"));
}

TEST_CASE("bad uids and gids are refused") {
  const std::string value = GENERATE(as<std::string>{}, "-1", "4294967295", "99999999999999999999",
                                     "app", "1.5", "0x10", "\"\"", "[1]", "{}", "~");
  CAPTURE(value);
  const auto e =
      parse_error("rules:\n- match:\n    uids: [10001, " + value + "]\n  methods: [health]\n");
  CHECK(error_line(e) == 3);
  CHECK_THAT(e.what(), Catch::Contains("rules[0].match.uids[1]"));
  CHECK_THAT(e.what(), Catch::Contains("uid from 0 to 4294967294"));

  const auto g = parse_error("rules:\n- match: {gids: [" + value + "]}\n  methods: [health]\n");
  CHECK(error_line(g) == 2);
  CHECK_THAT(g.what(), Catch::Contains("gid from 0 to 4294967294"));
}

TEST_CASE("a match must select someone, unambiguously") {
  SECTION("no match") {
    const auto e = parse_error("rules:\n- name: x\n  methods: [health]\n");
    CHECK(error_line(e) == 2);
    CHECK_THAT(e.what(), Catch::Contains("has no `match:`"));
  }
  SECTION("empty match") {
    CHECK_THAT(parse_error("rules:\n- match: {}\n  methods: [health]\n").what(),
               Catch::Contains("selects no caller"));
  }
  SECTION("empty lists") {
    CHECK_THAT(parse_error("rules:\n- match: {uids: [], gids: []}\n  methods: [health]\n").what(),
               Catch::Contains("selects no caller"));
  }
  SECTION("any: false alone") {
    CHECK_THAT(parse_error("rules:\n- match: {any: false}\n  methods: [health]\n").what(),
               Catch::Contains("`any: false` and no uids or gids"));
  }
  SECTION("any with uids") {
    const auto e = parse_error("rules:\n- match: {any: true, uids: [1]}\n  methods: [health]\n");
    CHECK(error_line(e) == 2);
    CHECK_THAT(e.what(), Catch::Contains("already selects every caller"));
  }
  SECTION("any is a strict boolean") {
    CHECK_THAT(parse_error("rules:\n- match: {any: yes}\n  methods: [health]\n").what(),
               Catch::Contains("must be true or false, not 'yes'"));
  }
  SECTION("match is a map") {
    CHECK_THAT(parse_error("rules:\n- match: [1]\n  methods: [health]\n").what(),
               Catch::Contains("rules[0].match must be a map"));
  }
}

TEST_CASE("methods are a non-empty list") {
  CHECK_THAT(parse_error("rules:\n- match: {uids: [1]}\n").what(),
             Catch::Contains("has no `methods:`"));
  CHECK_THAT(parse_error("rules:\n- match: {uids: [1]}\n  methods: []\n").what(),
             Catch::Contains("grant at least one method"));
  const auto e = parse_error("rules:\n- match: {uids: [1]}\n  methods: health\n");
  CHECK(error_line(e) == 3);
  CHECK_THAT(e.what(), Catch::Contains("rules[0].methods must be a list"));
}

TEST_CASE("a rule that grants a kid-taking method must say which kids") {
  const Method method = GENERATE(Method::kSign, Method::kVerify, Method::kGetPublicKey,
                                 Method::kGenerateKey, Method::kDeleteKey, Method::kSignBatch);
  const std::string name(protocol::to_string(method));
  CAPTURE(name);
  const auto e = parse_error("rules:\n- match: {uids: [1]}\n  methods: [health, " + name + "]\n");
  CHECK(error_line(e) == 2);
  CHECK_THAT(e.what(), Catch::Contains("grants " + name + ", which takes a kid"));
  CHECK_THAT(e.what(), Catch::Contains("add `kids:`"));
  CHECK_THAT(parse_error("rules:\n- match: {uids: [1]}\n  methods: ['*']\n").what(),
             Catch::Contains("which takes a kid"));
}

TEST_CASE("kids on a rule whose methods take none is refused as a misunderstanding") {
  const auto e = parse_error(R"(rules:
  - match: { uids: [1] }
    methods: [list_keys, get_jwks]
    kids: ["app-*"]
)");
  CHECK(error_line(e) == 4);
  CHECK_THAT(e.what(), Catch::Contains("none of the rule's methods takes a kid"));
}

TEST_CASE("bad kid patterns are refused") {
  CHECK_THAT(parse_error("rules:\n- match: {uids: [1]}\n  methods: [sign]\n  kids: []\n").what(),
             Catch::Contains("list at least one kid pattern"));
  CHECK_THAT(parse_error("rules:\n- match: {uids: [1]}\n  methods: [sign]\n  kids: ['']\n").what(),
             Catch::Contains("must not be empty"));
  const auto e =
      parse_error("rules:\n- match: {uids: [1]}\n  methods: [sign]\n  kids: ['ok', 'app-\\']\n");
  CHECK(error_line(e) == 4);
  CHECK_THAT(e.what(), Catch::Contains("rules[0].kids[1]: a kid pattern must not end with a lone"));
  CHECK_THAT(
      parse_error("rules:\n- match: {uids: [1]}\n  methods: [sign]\n  kids: \"app-*\"\n").what(),
      Catch::Contains("rules[0].kids must be a list"));
}

TEST_CASE("the document must be one map holding a non-empty rules list") {
  CHECK_THAT(parse_error("").what(), Catch::Contains("the policy is empty"));
  CHECK_THAT(parse_error("# only a comment\n").what(), Catch::Contains("the policy is empty"));
  CHECK_THAT(parse_error("- 1\n").what(), Catch::Contains("must be a map with a `rules:` list"));
  CHECK_THAT(parse_error("rules: []\n").what(), Catch::Contains("no caller could connect"));
  CHECK_THAT(parse_error("rules: {}\n").what(), Catch::Contains("must be a list of rules"));
  CHECK_THAT(parse_error("rules:\n- health\n").what(), Catch::Contains("rules[0] must be a map"));
  CHECK_THAT(
      parse_error("rules:\n- match: {uids: [1]}\n  methods: [health]\n---\nrules: []\n").what(),
      Catch::Contains("holds 2 YAML documents"));
}

TEST_CASE("rule names are unique") {
  const auto e = parse_error(R"(rules:
  - name: a
    match: { uids: [1] }
    methods: [health]
  - name: a
    match: { uids: [2] }
    methods: [health]
)");
  CHECK(error_line(e) == 5);
  CHECK_THAT(e.what(), Catch::Contains("'a' is already used by rules[0]"));
}

TEST_CASE("policy files: read, bounded, and refused when others may change them") {
  test::TempDir dir;
  const std::string good = "rules:\n- match: {uids: [1]}\n  methods: [health]\n";

  SECTION("a good file") {
    CHECK(load_policy_file(dir.write("policy.yaml", good)).size() == 1);
  }
  SECTION("errors name the file and line") {
    const auto path = dir.write("policy.yaml", "rules:\n- match: {uids: [1]}\n  methods: [sing]\n");
    try {
      (void)load_policy_file(path);
      FAIL("no error");
    } catch (const PolicyError& e) {
      CHECK(e.source() == path);
      CHECK(e.line() == 3);
      CHECK_THAT(e.what(), Catch::StartsWith(path + ":3:"));
    }
  }
  SECTION("a missing file") {
    const auto path = (dir.path() / "missing.yaml").string();
    CHECK_THROWS_WITH(load_policy_file(path),
                      Catch::StartsWith(path + ": cannot open the policy file"));
  }
  SECTION("a directory") {
    CHECK_THROWS_WITH(load_policy_file(dir.path().string()), Catch::Contains("not a regular file"));
  }
  SECTION("world-writable") {
    const auto path = dir.write("policy.yaml", good);
    ::chmod(path.c_str(), 0666);
    CHECK_THROWS_WITH(load_policy_file(path), Catch::Contains("writable by others"));
  }
  SECTION("writable by the group") {
    const auto path = dir.write("policy.yaml", good);
    ::chmod(path.c_str(), 0664);
    CHECK_THROWS_WITH(load_policy_file(path), Catch::Contains(path + " is writable by group"));
  }
  SECTION("in a directory the group may write") {
    const auto path = dir.write("policy.yaml", good);
    ::chmod(dir.path().c_str(), 0775);
    CHECK_THROWS_WITH(load_policy_file(path),
                      Catch::StartsWith(path + ": ") &&
                          Catch::Contains(dir.path().string() + " is writable by group"));
  }
  SECTION("owned by another uid (needs root)") {
    const auto path = dir.write("policy.yaml", good);
    if (::geteuid() == 0) {
      REQUIRE(::chown(path.c_str(), 10001, 10001) == 0);
      CHECK_THROWS_WITH(load_policy_file(path), Catch::Contains(path + " is owned by uid 10001"));
    }
  }
  SECTION("a FIFO is refused without waiting for a writer") {
    const auto path = (dir.path() / "policy.yaml").string();
    REQUIRE(::mkfifo(path.c_str(), 0644) == 0);
    // Should loading ever open the FIFO, a writer comes after 2 s so that the test ends anyway,
    // and says it was needed.
    std::atomic<bool> done{false};
    bool writer_needed = false;
    std::thread writer([&] {
      for (int i = 0; i < 100 && !done; ++i) std::this_thread::sleep_for(20ms);
      if (done) return;
      const int fd = ::open(path.c_str(), O_WRONLY | O_NONBLOCK | O_CLOEXEC);
      writer_needed = fd >= 0;
      if (fd >= 0) ::close(fd);
    });
    CHECK_THROWS_WITH(load_policy_file(path), Catch::Contains("not a regular file"));
    done = true;
    writer.join();
    CHECK_FALSE(writer_needed);
  }
  SECTION("a symlink to a device is refused before the device is opened") {
    const auto path = (dir.path() / "policy.yaml").string();
    std::filesystem::create_symlink("/dev/zero", path);
    CHECK_THROWS_WITH(load_policy_file(path), Catch::Contains("not a regular file (/dev/zero)"));
  }
  SECTION("a Kubernetes ConfigMap layout: symlinks through ..data") {
    std::filesystem::create_directory(dir.path() / "..2024_01_01");
    (void)dir.write("..2024_01_01/policy.yaml", good);
    std::filesystem::create_directory_symlink("..2024_01_01", dir.path() / "..data");
    const auto path = (dir.path() / "policy.yaml").string();
    std::filesystem::create_symlink("..data/policy.yaml", path);
    CHECK(load_policy_file(path).size() == 1);
  }
  SECTION("too large") {
    std::string big = good + "#";
    big += std::string(kMaxPolicyFileBytes, 'x');
    CHECK_THROWS_WITH(load_policy_file(dir.write("policy.yaml", big)),
                      Catch::Contains("larger than"));
  }
}

TEST_CASE("kid patterns have fnmatch semantics") {
  const auto matches = [](const std::string& pattern, const std::string& kid) {
    return KidPattern(pattern).matches(kid);
  };
  CHECK(matches("app-*", "app-1"));
  CHECK(matches("app-*", "app-"));
  CHECK(matches("app-*", "app-x/y.z"));
  CHECK_FALSE(matches("app-*", "admin-key"));
  CHECK_FALSE(matches("app-*", "App-1"));  // case-sensitive
  CHECK_FALSE(matches("app-*", "xapp-1"));
  CHECK(matches("*", "anything"));
  CHECK(matches("exact", "exact"));
  CHECK_FALSE(matches("exact", "exact2"));
  CHECK_FALSE(matches("exact", "exac"));
  CHECK(matches("*-prod", "signer-prod"));
  CHECK_FALSE(matches("*-prod", "signer-prod2"));
  CHECK(matches("tenant-?", "tenant-a"));
  CHECK_FALSE(matches("tenant-?", "tenant-ab"));
  CHECK(matches("k[0-9]", "k7"));
  CHECK_FALSE(matches("k[0-9]", "kx"));
  CHECK(matches("k[!0-9]", "kx"));
  CHECK(matches("a*b*c", "a--b--c"));
  // A backslash escapes: \* is a literal star (kids may contain any character but NUL).
  CHECK(matches("lit\\*", "lit*"));
  CHECK_FALSE(matches("lit\\*", "literal"));
  CHECK(matches(".hidden*", ".hidden-1"));
  CHECK(matches("*", ".dot"));
}

}  // namespace
}  // namespace hsm::agent
