// AccessControl: first-match semantics, kid globs, method grants, uid/gid/any, read-only, the
// default policy (no file), and SIGHUP reload keeping the old policy when the new one is bad.
#include "policy/access_control.hpp"

#include <sys/stat.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "policy_test_support.hpp"

namespace hsm::agent {
namespace {

using protocol::ErrorCode;
using protocol::Method;
using test::caller;
using test::request;

constexpr uid_t kAgentUid = 65532;

bool allowed(const AccessControl& access, const Caller& who, const protocol::Request& r) {
  return !access.authorize(who, r).has_value();
}

std::string denial(const AccessControl& access, const Caller& who, const protocol::Request& r) {
  const auto error = access.authorize(who, r);
  REQUIRE(error.has_value());
  CHECK(error->code == ErrorCode::kPermissionDenied);
  CHECK_FALSE(error->ckr.has_value());
  return error->message;
}

AccessControl policy(const std::string& yaml, bool read_only = false) {
  return AccessControl::from_policy_text(yaml, "test.yaml", read_only);
}

// The deploy/k8s example's shape: the app may sign with app-* keys and read their public keys.
const char* const kAppSigners = R"(
rules:
  - name: app-signers
    match: { uids: [10001] }
    methods: [sign, verify, get_public_key, get_jwks, health, capabilities, list_keys]
    kids: ["app-*"]
  - name: operator-health
    match: { uids: [65532] }
    methods: [health, capabilities, list_keys]
)";

TEST_CASE("a caller granted sign on app-* cannot sign admin-key or create keys") {
  const auto access = policy(kAppSigners);
  const auto app = caller(10001, 10001);
  CHECK(access.admits(app));
  CHECK(allowed(access, app, request(Method::kSign, "app-1")));
  CHECK(allowed(access, app, request(Method::kVerify, "app-1")));
  CHECK(allowed(access, app, request(Method::kGetPublicKey, "app-payments")));
  CHECK(allowed(access, app, request(Method::kListKeys)));
  CHECK(allowed(access, app, request(Method::kGetJwks)));
  CHECK(allowed(access, app, request(Method::kHealth)));

  CHECK(denial(access, app, request(Method::kSign, "admin-key")) ==
        "permission denied: sign on kid 'admin-key'");
  CHECK(denial(access, app, request(Method::kGetPublicKey, "admin-key")) ==
        "permission denied: get_public_key on kid 'admin-key'");
  // Not granted at all, whatever the kid: creating, deleting, batches.
  CHECK(denial(access, app, request(Method::kGenerateKey, "app-new")) ==
        "permission denied: generate_key on kid 'app-new'");
  CHECK(denial(access, app, request(Method::kDeleteKey, "app-1")) ==
        "permission denied: delete_key on kid 'app-1'");
  CHECK(denial(access, app, request(Method::kSignBatch, "app-1")) ==
        "permission denied: sign_batch on kid 'app-1'");
  CHECK(denial(access, app, request(Method::kImportKey)) == "permission denied: import_key");
}

TEST_CASE("a denial names the method and kid, never the rule") {
  const auto access = policy(kAppSigners);
  const auto message = denial(access, caller(10001, 10001), request(Method::kSign, "admin-key"));
  CHECK_THAT(message, !Catch::Contains("app-signers"));
  CHECK_THAT(message, !Catch::Contains("rule"));
  const auto operator_message =
      denial(access, caller(65532, 65532), request(Method::kSign, "app-1"));
  CHECK_THAT(operator_message, !Catch::Contains("operator-health"));
}

TEST_CASE("a caller that no rule selects is refused at accept, and every request denied") {
  const auto access = policy(kAppSigners);
  const auto stranger = caller(10002, 10001);  // same gid as the app, other uid
  CHECK_FALSE(access.admits(stranger));
  CHECK(access.rule_for(stranger) == nullptr);
  // root and the agent's own uid get nothing a policy does not give them.
  CHECK_FALSE(access.admits(caller(0, 0)));
  CHECK(access.admits(caller(65532, 65532)));
  CHECK_FALSE(allowed(access, caller(0, 0), request(Method::kHealth)));
  CHECK(denial(access, stranger, request(Method::kSign, "app-1")) ==
        "permission denied: sign on kid 'app-1'");
}

TEST_CASE("first match wins: the first rule that selects a caller is all it gets") {
  // uid 10002 is in group 3000, but its own rule comes first: health only.
  const char* const narrow_first = R"(
rules:
  - name: restricted-member
    match: { uids: [10002] }
    methods: [health]
  - name: team
    match: { gids: [3000] }
    methods: [sign, health]
    kids: ["team-*"]
  - name: everyone-else
    match: { any: true }
    methods: [capabilities]
)";
  const auto access = policy(narrow_first);
  const auto restricted = caller(10002, 3000);
  const auto member = caller(10003, 3000);
  const auto outsider = caller(20000, 20000);

  CHECK(access.rule_for(restricted)->name == "restricted-member");
  CHECK(allowed(access, restricted, request(Method::kHealth)));
  CHECK_FALSE(allowed(access, restricted, request(Method::kSign, "team-1")));
  // Grants do not add up across rules: the team's member has no capabilities.
  CHECK(access.rule_for(member)->name == "team");
  CHECK(allowed(access, member, request(Method::kSign, "team-1")));
  CHECK_FALSE(allowed(access, member, request(Method::kCapabilities)));
  // `any: true` catches everyone the earlier rules did not.
  CHECK(access.rule_for(outsider)->name == "everyone-else");
  CHECK(allowed(access, outsider, request(Method::kCapabilities)));
  CHECK_FALSE(allowed(access, outsider, request(Method::kHealth)));

  SECTION("the same rules in another order decide otherwise") {
    const auto reordered = policy(R"(
rules:
  - name: team
    match: { gids: [3000] }
    methods: [sign, health]
    kids: ["team-*"]
  - name: restricted-member
    match: { uids: [10002] }
    methods: [health]
)");
    CHECK(reordered.rule_for(restricted)->name == "team");
    CHECK(allowed(reordered, restricted, request(Method::kSign, "team-1")));
  }
  SECTION("an `any` rule first shadows everything after it") {
    const auto shadowed = policy(R"(
rules:
  - match: { any: true }
    methods: [health]
  - match: { uids: [10002] }
    methods: [sign]
    kids: ["*"]
)");
    CHECK_FALSE(allowed(shadowed, restricted, request(Method::kSign, "team-1")));
    CHECK(allowed(shadowed, caller(1, 1), request(Method::kHealth)));
  }
}

TEST_CASE("uids match the caller's uid, gids its primary gid, either one selects") {
  const auto access = policy(R"(
rules:
  - match: { uids: [10001], gids: [4000] }
    methods: [health]
)");
  CHECK(access.admits(caller(10001, 1)));           // by uid, whatever the gid
  CHECK(access.admits(caller(5, 4000)));            // by gid, whatever the uid
  CHECK_FALSE(access.admits(caller(4000, 10001)));  // uid and gid are not interchangeable
  CHECK_FALSE(access.admits(caller(5, 5)));

  const auto any = policy("rules:\n- match: {any: true}\n  methods: [health]\n");
  CHECK(any.admits(caller(0, 0)));
  CHECK(any.admits(caller(123456, 654321)));
}

TEST_CASE("methods are granted one by one, or all with \"*\"") {
  const auto access = policy(R"(
rules:
  - match: { uids: [1] }
    methods: [get_public_key]
    kids: ["*"]
  - match: { uids: [2] }
    methods: ["*"]
    kids: ["*"]
)");
  for (const auto method : protocol::all_methods()) {
    CAPTURE(protocol::to_string(method));
    const auto r = method_takes_kid(method) ? request(method, "k") : request(method);
    CHECK(allowed(access, caller(1, 1), r) == (method == Method::kGetPublicKey));
    CHECK(allowed(access, caller(2, 2), r));
  }
}

TEST_CASE("kid globs decide which keys a kid-taking method may use") {
  const auto access = policy(R"(
rules:
  - match: { uids: [1] }
    methods: [sign, generate_key, delete_key]
    kids: ["app-*", "shared", "tenant-?-[0-9]"]
)");
  const auto who = caller(1, 1);
  CHECK(allowed(access, who, request(Method::kSign, "app-1")));
  CHECK(allowed(access, who, request(Method::kSign, "shared")));
  CHECK(allowed(access, who, request(Method::kSign, "tenant-a-7")));
  CHECK_FALSE(allowed(access, who, request(Method::kSign, "admin-key")));
  CHECK_FALSE(allowed(access, who, request(Method::kSign, "shared2")));
  CHECK_FALSE(allowed(access, who, request(Method::kSign, "tenant-ab-7")));
  // generate_key's kid is the key to create: the caller may create only matching names.
  CHECK(allowed(access, who, request(Method::kGenerateKey, "app-new")));
  CHECK(denial(access, who, request(Method::kGenerateKey, "root-ca")) ==
        "permission denied: generate_key on kid 'root-ca'");
  CHECK_FALSE(allowed(access, who, request(Method::kDeleteKey, "other")));
}

TEST_CASE("sign_batch needs every item's kid; the denial names the first refused") {
  const auto access = policy(R"(
rules:
  - match: { uids: [1] }
    methods: [sign_batch]
    kids: ["app-*"]
)");
  const auto who = caller(1, 1);
  CHECK(allowed(access, who, test::sign_batch({"app-1", "app-2", "app-1"})));
  CHECK(denial(access, who, test::sign_batch({"app-1", "admin-key", "other"})) ==
        "permission denied: sign_batch on kid 'admin-key'");
  // sign_batch does not imply sign, nor the reverse.
  CHECK_FALSE(allowed(access, who, request(Method::kSign, "app-1")));
}

TEST_CASE("read-only (--read-only) removes generate_key and delete_key even from \"*\"") {
  const auto access = policy("rules:\n- match: {uids: [1]}\n  methods: ['*']\n  kids: ['*']\n",
                             /*read_only=*/true);
  const auto who = caller(1, 1);
  CHECK(access.read_only());
  CHECK(denial(access, who, request(Method::kGenerateKey, "k")) ==
        "permission denied: generate_key on kid 'k' (the agent is read-only)");
  CHECK(denial(access, who, request(Method::kDeleteKey, "k")) ==
        "permission denied: delete_key on kid 'k' (the agent is read-only)");
  CHECK(allowed(access, who, request(Method::kSign, "k")));
  CHECK(allowed(access, who, request(Method::kListKeys)));
}

// ---- the default policy (no --policy) --------------------------------------------------------

TEST_CASE("default policy: only the agent's uid and root, with every method") {
  const AccessControl access(AccessConfig{}, false, kAgentUid);
  CHECK(access.description() == "default policy");
  for (const auto& admin : {caller(kAgentUid, 12345), caller(0, 0)}) {
    CHECK(access.admits(admin));
    CHECK(allowed(access, admin, request(Method::kSign, "any-key")));
    CHECK(allowed(access, admin, request(Method::kGenerateKey, "new")));
    CHECK(allowed(access, admin, request(Method::kDeleteKey, "old")));
  }
  CHECK_FALSE(access.admits(caller(10001, 10001)));
  CHECK_FALSE(access.admits(caller(10001, kAgentUid)));  // the agent's gid is not enough
  CHECK(denial(access, caller(10001, 10001), request(Method::kSign, "k")) ==
        "permission denied: sign on kid 'k'");
}

TEST_CASE("default policy: --allow-uid and --allow-gid get every method but create and delete") {
  AccessConfig config;
  config.allow_uids = {10001};
  config.allow_gids = {3000};
  const AccessControl access(config, false, kAgentUid);
  for (const auto& user : {caller(10001, 1), caller(777, 3000)}) {
    CHECK(access.admits(user));
    CHECK(allowed(access, user, request(Method::kSign, "any-key")));
    CHECK(allowed(access, user, request(Method::kVerify, "any-key")));
    CHECK(allowed(access, user, request(Method::kGetPublicKey, "any-key")));
    CHECK(allowed(access, user, test::sign_batch({"a", "b"})));
    CHECK(allowed(access, user, request(Method::kListKeys)));
    CHECK(allowed(access, user, request(Method::kGetJwks)));
    CHECK(allowed(access, user, request(Method::kHealth)));
    CHECK(allowed(access, user, request(Method::kCapabilities)));
    CHECK(denial(access, user, request(Method::kGenerateKey, "k")) ==
          "permission denied: generate_key on kid 'k'");
    CHECK(denial(access, user, request(Method::kDeleteKey, "k")) ==
          "permission denied: delete_key on kid 'k'");
  }
  CHECK_FALSE(access.admits(caller(10002, 10002)));
  // Still the agent's own uid and root first.
  CHECK(allowed(access, caller(0, 3000), request(Method::kGenerateKey, "k")));
}

TEST_CASE("default policy: --admin-uid may also create and delete keys") {
  AccessConfig config;
  config.admin_uids = {5000};
  config.allow_uids = {5000, 10001};  // admin wins: its rule comes first
  const AccessControl access(config, false, kAgentUid);
  CHECK(allowed(access, caller(5000, 5000), request(Method::kGenerateKey, "k")));
  CHECK(allowed(access, caller(5000, 5000), request(Method::kDeleteKey, "k")));
  CHECK_FALSE(allowed(access, caller(10001, 10001), request(Method::kGenerateKey, "k")));
}

TEST_CASE("default policy: --read-only removes create and delete from everyone") {
  AccessConfig config;
  config.admin_uids = {5000};
  const AccessControl access(config, true, kAgentUid);
  for (const auto& admin : {caller(5000, 5000), caller(0, 0), caller(kAgentUid, kAgentUid)}) {
    CHECK(denial(access, admin, request(Method::kGenerateKey, "k")) ==
          "permission denied: generate_key on kid 'k' (the agent is read-only)");
    CHECK_FALSE(allowed(access, admin, request(Method::kDeleteKey, "k")));
    CHECK(allowed(access, admin, request(Method::kSign, "k")));
  }
  // Without a policy file there is nothing to reload.
  AccessControl reloadable(config, true, kAgentUid);
  CHECK_FALSE(reloadable.reload().has_value());
  CHECK(reloadable.rules()->size() == 1);
}

TEST_CASE("default_policy_rules are the two documented rules") {
  AccessConfig config;
  config.admin_uids = {5000};
  config.allow_gids = {3000};
  const auto rules = default_policy_rules(config, kAgentUid);
  REQUIRE(rules.size() == 2);
  CHECK(rules[0].match.uids == std::vector<uid_t>{5000, kAgentUid, 0});
  CHECK(rules[0].methods == MethodSet::all());
  CHECK(rules[1].match.gids == std::vector<gid_t>{3000});
  CHECK_FALSE(rules[1].methods.contains(Method::kGenerateKey));
  CHECK_FALSE(rules[1].methods.contains(Method::kDeleteKey));
  CHECK(rules[1].methods.contains(Method::kSignBatch));
  CHECK(default_policy_rules(AccessConfig{}, kAgentUid).size() == 1);
}

// ---- policy files and reload -------------------------------------------------------------------

TEST_CASE("with --policy the file alone decides") {
  test::TempDir dir;
  AccessConfig config;
  config.policy_path = dir.write("policy.yaml", kAppSigners);
  const AccessControl access(config, false, kAgentUid);
  CHECK(access.description() == "policy file " + *config.policy_path);
  CHECK(access.rules()->size() == 2);
  CHECK(access.admits(caller(10001, 10001)));
  CHECK_FALSE(access.admits(caller(0, 0)));  // root is not implied

  SECTION("a bad file stops the agent from starting") {
    config.policy_path =
        dir.write("bad.yaml", "rules:\n- match: {uids: [x]}\n  methods: [health]\n");
    CHECK_THROWS_AS(AccessControl(config, false, kAgentUid), PolicyError);
    CHECK_THROWS_WITH(AccessControl(config, false, kAgentUid),
                      Catch::StartsWith(*config.policy_path + ":2:"));
  }
  SECTION("together with --allow-uid / --allow-gid / --admin-uid it is refused") {
    AccessConfig with_uid = config;
    with_uid.allow_uids = {1};
    CHECK_THROWS_WITH(AccessControl(with_uid, false, kAgentUid),
                      Catch::Contains("apply only without --policy"));
    AccessConfig with_gid = config;
    with_gid.allow_gids = {1};
    CHECK_THROWS_AS(AccessControl(with_gid, false, kAgentUid), PolicyError);
    AccessConfig with_admin = config;
    with_admin.admin_uids = {1};
    CHECK_THROWS_AS(AccessControl(with_admin, false, kAgentUid), PolicyError);
  }
}

TEST_CASE("reload swaps in a good policy and keeps the old one when the new one is bad") {
  test::TempDir dir;
  AccessConfig config;
  config.policy_path = dir.write("policy.yaml", kAppSigners);
  AccessControl access(config, false, kAgentUid);
  const auto app = caller(10001, 10001);
  const auto newcomer = caller(10002, 10002);
  REQUIRE(allowed(access, app, request(Method::kSign, "app-1")));
  REQUIRE_FALSE(access.admits(newcomer));

  // A typo in the new file: the error says where, and nothing changes.
  (void)dir.write("policy.yaml", R"(rules:
  - match: { uids: [10002] }
    methods: [sign, delete-key]
    kids: ["*"]
)");
  const auto error = access.reload();
  REQUIRE(error.has_value());
  CHECK(error->line() == 3);
  CHECK_THAT(error->what(), Catch::StartsWith(*config.policy_path + ":3:"));
  CHECK_THAT(error->what(), Catch::Contains("unknown method 'delete-key'"));
  CHECK(allowed(access, app, request(Method::kSign, "app-1")));
  CHECK_FALSE(access.admits(newcomer));

  SECTION("a vanished file keeps the old policy too") {
    std::filesystem::remove(*config.policy_path);
    const auto missing = access.reload();
    REQUIRE(missing.has_value());
    CHECK_THAT(missing->what(), Catch::Contains("cannot open"));
    CHECK(allowed(access, app, request(Method::kSign, "app-1")));
  }
  SECTION("a world-writable file keeps the old policy too") {
    ::chmod(config.policy_path->c_str(), 0666);
    CHECK(access.reload().has_value());
    CHECK(access.admits(app));
  }
  SECTION("a good file replaces the rules") {
    (void)dir.write("policy.yaml", R"(rules:
  - match: { uids: [10002] }
    methods: [sign]
    kids: ["*"]
)");
    CHECK_FALSE(access.reload().has_value());
    CHECK(access.admits(newcomer));
    CHECK(allowed(access, newcomer, request(Method::kSign, "admin-key")));
    // The old caller is out: its open connection now gets permission_denied.
    CHECK_FALSE(access.admits(app));
    CHECK(denial(access, app, request(Method::kSign, "app-1")) ==
          "permission denied: sign on kid 'app-1'");
  }
}

TEST_CASE("reload on its own thread while requests are decided: each sees one whole policy",
          "[concurrency]") {
  // Run under TSan (scripts/test-extra.sh): a rule list replaced under a reader is a data race.
  test::TempDir dir;
  const std::string kids_app =
      "rules:\n- match: {uids: [10001]}\n  methods: [sign]\n  kids: [\"app-*\"]\n";
  const std::string kids_other =
      "rules:\n- match: {uids: [10001]}\n  methods: [sign]\n  kids: [\"other-*\"]\n"
      "- match: {uids: [10002]}\n  methods: [health]\n";
  AccessConfig config;
  config.policy_path = dir.write("policy.yaml", kids_app);
  AccessControl access(config, false, kAgentUid);
  constexpr int kReloads = 200;

  std::atomic<bool> reloading{true};
  std::atomic<int> failed_reloads{0};
  std::thread reloader([&] {
    for (int i = 0; i < kReloads; ++i) {
      // Replaced whole, as an editor or a ConfigMap update does.
      const auto next = dir.write("next.yaml", i % 2 == 0 ? kids_other : kids_app);
      std::filesystem::rename(next, *config.policy_path);
      if (access.reload()) ++failed_reloads;
    }
    reloading = false;
  });
  const auto app = caller(10001, 10001);
  std::atomic<long> decisions{0};
  std::atomic<long> inconsistent{0};
  std::vector<std::thread> deciders;
  for (int t = 0; t < 2; ++t) {
    deciders.emplace_back([&] {
      while (reloading) {
        const bool app_key = allowed(access, app, request(Method::kSign, "app-1"));
        const bool other_key = allowed(access, app, request(Method::kSign, "other-1"));
        const auto rule = access.rule_for(app);  // stays valid whatever reload does
        if (!access.admits(app) || rule == nullptr || rule->kids.size() != 1) ++inconsistent;
        decisions += (app_key ? 1 : 0) + (other_key ? 1 : 0) + 1;
      }
    });
  }
  reloader.join();
  for (auto& decider : deciders) decider.join();
  CHECK(failed_reloads == 0);
  CHECK(inconsistent == 0);
  CHECK(decisions > 0);
  CHECK(access.rules()->size() == 1);  // the last one written: kids_app
  CHECK(allowed(access, app, request(Method::kSign, "app-1")));
}

}  // namespace
}  // namespace hsm::agent
