// The policies this repository ships must parse and mean what their comments say: the
// ConfigMap in deploy/k8s, the Helm chart's default rules (values.yaml) and the README's example
// values, and every ```yaml example in docs/policy.md.
#include <yaml-cpp/yaml.h>

#include <catch2/catch.hpp>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "policy/access_control.hpp"
#include "policy_test_support.hpp"

namespace hsm::agent {
namespace {

using protocol::Method;
using test::caller;
using test::request;

const std::string kSourceDir = HSM_SOURCE_DIR;

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  REQUIRE(in.good());
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

/// What the Helm template renders: `toYaml (dict "rules" <rules>)`.
std::string render_rules(const YAML::Node& rules) {
  YAML::Node document;
  document["rules"] = rules;
  YAML::Emitter out;
  out << document;
  REQUIRE(out.good());
  return out.c_str();
}

/// The first `policy:` map holding `rules:` anywhere under `node` (values files nest it).
std::optional<YAML::Node> find_policy_rules(const YAML::Node& node) {
  if (!node.IsMap()) return std::nullopt;
  for (const auto& entry : node) {
    if (entry.first.Scalar() == "policy" && entry.second.IsMap() && entry.second["rules"]) {
      return entry.second["rules"];
    }
    if (auto found = find_policy_rules(entry.second)) return found;
  }
  return std::nullopt;
}

/// The app (uid 10001) signs with `kid_prefix`* keys and reads public keys; the agent's own uid
/// (65532) may check health; no one else connects, and no one creates or deletes keys.
void check_app_and_operator(const AccessControl& access, const std::string& kid_prefix) {
  const auto app = caller(10001, 10001);
  const auto operator_uid = caller(65532, 65532);
  const auto allowed = [&access](const Caller& who, const protocol::Request& r) {
    return !access.authorize(who, r).has_value();
  };
  CHECK(access.admits(app));
  CHECK(allowed(app, request(Method::kSign, kid_prefix + "1")));
  CHECK(allowed(app, request(Method::kVerify, kid_prefix + "1")));
  CHECK(allowed(app, request(Method::kGetPublicKey, kid_prefix + "1")));
  CHECK(allowed(app, request(Method::kGetJwks)));
  CHECK(allowed(app, request(Method::kListKeys)));
  CHECK(allowed(app, request(Method::kHealth)));
  CHECK_FALSE(allowed(app, request(Method::kSign, "admin-key")));
  CHECK_FALSE(allowed(app, request(Method::kGenerateKey, kid_prefix + "new")));
  CHECK_FALSE(allowed(app, request(Method::kDeleteKey, kid_prefix + "1")));
  CHECK(access.admits(operator_uid));
  CHECK(allowed(operator_uid, request(Method::kHealth)));
  CHECK_FALSE(allowed(operator_uid, request(Method::kSign, kid_prefix + "1")));
  CHECK_FALSE(access.admits(caller(0, 0)));
  CHECK_FALSE(access.admits(caller(10002, 65532)));
}

TEST_CASE("deploy/k8s/policy-configmap.yaml: its policy.yaml parses and means what it says") {
  const std::string path = kSourceDir + "/deploy/k8s/policy-configmap.yaml";
  const YAML::Node config_map = YAML::LoadFile(path);
  REQUIRE(config_map["data"]["policy.yaml"]);
  const auto text = config_map["data"]["policy.yaml"].as<std::string>();
  const auto access = AccessControl::from_policy_text(text, path + " data.policy.yaml", false);
  CHECK(access.rules()->size() == 2);
  check_app_and_operator(access, "app-");
}

TEST_CASE("helm/hsm-sidecar/values.yaml: the chart's default rules render to a valid policy") {
  const YAML::Node values = YAML::LoadFile(kSourceDir + "/helm/hsm-sidecar/values.yaml");
  REQUIRE(values["policy"]["rules"]);
  const auto access = AccessControl::from_policy_text(render_rules(values["policy"]["rules"]),
                                                      "values.yaml policy.rules", false);
  check_app_and_operator(access, "app-");
}

TEST_CASE("helm/hsm-sidecar/README.md: the example values' rules render to a valid policy") {
  const std::string readme = read_text(kSourceDir + "/helm/hsm-sidecar/README.md");
  std::optional<YAML::Node> rules;
  for (std::size_t at = readme.find("```yaml\n"); at != std::string::npos && !rules;
       at = readme.find("```yaml\n", at + 1)) {
    const auto begin = at + 8;
    const auto end = readme.find("```", begin);
    REQUIRE(end != std::string::npos);
    rules = find_policy_rules(YAML::Load(readme.substr(begin, end - begin)));
  }
  REQUIRE(rules.has_value());
  const auto access =
      AccessControl::from_policy_text(render_rules(*rules), "README.md example", false);
  check_app_and_operator(access, "myapp-");
}

TEST_CASE("docs/policy.md: every yaml example is a valid policy") {
  const std::string path = kSourceDir + "/docs/policy.md";
  const std::string doc = read_text(path);
  int examples = 0;
  std::size_t line = 1;
  std::size_t scanned = 0;
  for (std::size_t at = doc.find("```yaml\n"); at != std::string::npos;
       at = doc.find("```yaml\n", at + 1)) {
    const auto begin = at + 8;
    const auto end = doc.find("```", begin);
    REQUIRE(end != std::string::npos);
    for (; scanned < begin; ++scanned) line += doc[scanned] == '\n' ? 1U : 0U;
    const std::string source = path + " (example at line " + std::to_string(line) + ")";
    CAPTURE(source);
    CHECK_NOTHROW(AccessControl::from_policy_text(doc.substr(begin, end - begin), source, false));
    ++examples;
  }
  CHECK(examples >= 4);
}

}  // namespace
}  // namespace hsm::agent
