#include "keys/algorithm_support.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>

#include "keys/key_generation.hpp"
#include "pkcs11/error.hpp"
#include "pkcs11/session.hpp"
#include "pkcs11/token.hpp"

namespace hsm::agent::keys {
namespace {

bool listed(const std::vector<CK_MECHANISM_TYPE>& mechanisms, CK_MECHANISM_TYPE mechanism) {
  return mechanism != kNoMechanism &&
         std::find(mechanisms.begin(), mechanisms.end(), mechanism) != mechanisms.end();
}

// A curve the token refuses outright. Other failures (a policy that forbids key generation for
// this user, ...) say nothing about the curve, so they leave it in.
bool curve_rejected(const pkcs11::Token& token, pkcs11::Session& session, const Curve& curve) {
  const Algorithm* alg = algorithm_for_curve(curve);
  KeyPairHandles handles;
  KeyPairSpec spec{alg, "hsm-agent-curve-probe", kDefaultRsaBits, /*token_objects=*/false,
                   /*record_alg=*/false};
  CK_RV rv = CKR_OK;
  try {
    rv = generate_key_pair(
        session, spec, handles,
        {CKR_CURVE_NOT_SUPPORTED, CKR_DOMAIN_PARAMS_INVALID, CKR_ATTRIBUTE_VALUE_INVALID,
         CKR_TEMPLATE_INCONSISTENT, CKR_MECHANISM_INVALID, CKR_MECHANISM_PARAM_INVALID});
  } catch (const pkcs11::Pkcs11Error& e) {
    spdlog::info("curve probe for {} on token '{}' inconclusive: {}", curve.jwk_crv,
                 token.description().label, e.what());
    return false;
  }
  if (rv != CKR_OK) {
    spdlog::info("token '{}' does not support curve {}: {}", token.description().label,
                 curve.jwk_crv, pkcs11::describe_rv(rv));
    return true;
  }
  // Session objects vanish with the session anyway; destroy them now to leave nothing behind.
  for (const CK_OBJECT_HANDLE object : {handles.private_key, handles.public_key}) {
    try {
      session.destroy_object(object);
    } catch (const pkcs11::Pkcs11Error& e) {
      spdlog::debug("destroying a probe key: {}", e.what());
    }
  }
  return false;
}

}  // namespace

AlgorithmSupport AlgorithmSupport::from_mechanisms(
    const std::vector<CK_MECHANISM_TYPE>& mechanisms,
    const std::vector<const Curve*>& rejected_curves) {
  AlgorithmSupport support;
  for (const Algorithm& alg : all_algorithms()) {
    AlgorithmPlan plan;
    plan.alg = &alg;
    if (alg.scheme == SignScheme::kEddsa) {
      if (listed(mechanisms, alg.digest_mechanism)) plan.message_mechanism = alg.digest_mechanism;
    } else {
      if (listed(mechanisms, alg.combined_mechanism))
        plan.message_mechanism = alg.combined_mechanism;
      if (listed(mechanisms, alg.digest_mechanism)) plan.digest_mechanism = alg.digest_mechanism;
    }
    const bool curve_ok = alg.curve == nullptr ||
                          std::find(rejected_curves.begin(), rejected_curves.end(), alg.curve) ==
                              rejected_curves.end();
    plan.supported = curve_ok && (plan.message_mechanism != kNoMechanism ||
                                  plan.digest_mechanism != kNoMechanism);
    plan.can_generate = plan.supported && listed(mechanisms, alg.keygen_mechanism);
    support.plans_.push_back(plan);
  }
  return support;
}

AlgorithmSupport AlgorithmSupport::probe(const pkcs11::Token& token, pkcs11::Session& session) {
  const std::vector<CK_MECHANISM_TYPE> mechanisms = token.mechanisms();
  std::vector<const Curve*> rejected;
  for (const Curve& curve : all_curves()) {
    const Algorithm* alg = algorithm_for_curve(curve);
    if (alg == nullptr || !listed(mechanisms, alg->keygen_mechanism)) continue;
    if (curve_rejected(token, session, curve)) rejected.push_back(&curve);
  }
  AlgorithmSupport support = from_mechanisms(mechanisms, rejected);
  for (const AlgorithmPlan& plan : support.plans_) {
    if (!plan.supported) continue;
    spdlog::debug("{}: message mechanism 0x{:x}, digest mechanism 0x{:x}{}", plan.alg->name,
                  plan.message_mechanism, plan.digest_mechanism,
                  plan.can_generate ? "" : " (cannot generate)");
  }
  return support;
}

const AlgorithmPlan& AlgorithmSupport::plan(const Algorithm& alg) const {
  return plans_.at(static_cast<std::size_t>(&alg - all_algorithms().data()));
}

std::vector<std::string> AlgorithmSupport::supported_names() const {
  std::vector<std::string> names;
  for (const AlgorithmPlan& plan : plans_) {
    if (plan.supported) names.emplace_back(plan.alg->name);
  }
  return names;
}

std::string AlgorithmSupport::default_name() const {
  if (const Algorithm* es256 = find_algorithm(kDefaultAlgorithm); plan(*es256).supported) {
    return std::string{kDefaultAlgorithm};
  }
  const auto names = supported_names();
  return names.empty() ? std::string{} : names.front();
}

}  // namespace hsm::agent::keys
