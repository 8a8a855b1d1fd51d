// What this token can do, decided once at start (issue 3): for each algorithm row, whether the
// token can sign with it, whether it can generate its keys, and which mechanism signs a message
// (a combined hash-and-sign mechanism when the token lists one; CKM_EDDSA for EdDSA) and which
// signs a digest the agent computed (CKM_ECDSA, CKM_RSA_PKCS over a DigestInfo,
// CKM_RSA_PKCS_PSS).
//
// Thread-safety: immutable after probe(); share freely.
#pragma once

#include <p11-kit/pkcs11.h>

#include <string>
#include <vector>

#include "keys/algorithm.hpp"

namespace hsm::agent::pkcs11 {
class Session;
class Token;
}  // namespace hsm::agent::pkcs11

namespace hsm::agent::keys {

struct AlgorithmPlan {
  const Algorithm* alg = nullptr;
  bool supported = false;     // the token can sign with it (capabilities.supported_algs)
  bool can_generate = false;  // ... and generate its keys
  CK_MECHANISM_TYPE message_mechanism = kNoMechanism;  // signs the message itself
  CK_MECHANISM_TYPE digest_mechanism = kNoMechanism;   // signs a digest computed by the agent
};

class AlgorithmSupport {
 public:
  /// From C_GetMechanismList, and, per curve, a key generation of session objects (destroyed at
  /// once) that finds the curves the token rejects (CKR_CURVE_NOT_SUPPORTED, ...).
  /// Throws Pkcs11Error when the mechanism list cannot be read.
  [[nodiscard]] static AlgorithmSupport probe(const pkcs11::Token& token, pkcs11::Session& session);

  /// Every algorithm as supported as its mechanisms allow; for tests of the selection logic.
  [[nodiscard]] static AlgorithmSupport from_mechanisms(
      const std::vector<CK_MECHANISM_TYPE>& mechanisms,
      const std::vector<const Curve*>& rejected_curves = {});

  [[nodiscard]] const AlgorithmPlan& plan(const Algorithm& alg) const;
  /// Names of the supported algorithms, in table order.
  [[nodiscard]] std::vector<std::string> supported_names() const;
  /// ES256 when supported, else the first supported algorithm, else empty.
  [[nodiscard]] std::string default_name() const;

 private:
  std::vector<AlgorithmPlan> plans_;  // parallel to all_algorithms()
};

}  // namespace hsm::agent::keys
