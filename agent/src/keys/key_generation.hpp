// C_GenerateKeyPair with the agent's templates (issue 2), for every algorithm row.
//   private: CKA_CLASS, CKA_KEY_TYPE, CKA_TOKEN, CKA_PRIVATE=true, CKA_SIGN=true,
//            CKA_SENSITIVE=true, CKA_EXTRACTABLE=false, CKA_LABEL=kid, CKA_ID=kid bytes,
//            CKA_ALLOWED_MECHANISMS=allowed_mechanisms(alg) (records the alg; see record_alg)
//   public:  CKA_CLASS, CKA_KEY_TYPE, CKA_TOKEN, CKA_VERIFY=true, CKA_LABEL=kid, CKA_ID=kid bytes,
//            plus CKA_EC_PARAMS (EC, Ed25519) or CKA_MODULUS_BITS + CKA_PUBLIC_EXPONENT (RSA)
#pragma once

#include <p11-kit/pkcs11.h>

#include <cstdint>
#include <initializer_list>
#include <string_view>

#include "keys/algorithm.hpp"

namespace hsm::agent::pkcs11 {
class Session;
}

namespace hsm::agent::keys {

struct KeyPairHandles {
  CK_OBJECT_HANDLE public_key = CK_INVALID_HANDLE;
  CK_OBJECT_HANDLE private_key = CK_INVALID_HANDLE;
};

struct KeyPairSpec {
  const Algorithm* alg = nullptr;
  std::string_view kid;  // CKA_LABEL and CKA_ID
  std::uint32_t rsa_bits = kDefaultRsaBits;
  bool token_objects = true;  // false: session objects (the start-up curve probe)
  // Sets CKA_ALLOWED_MECHANISMS on the private key. false for the probe (whose keys are
  // destroyed at once) and for a token that rejects the attribute (CKR_ATTRIBUTE_TYPE_INVALID).
  bool record_alg = true;
};

/// Generates the key pair into `out`. Returns CKR_OK or one of `accepted`; throws Pkcs11Error
/// for anything else.
[[nodiscard]] CK_RV generate_key_pair(pkcs11::Session& session, const KeyPairSpec& spec,
                                      KeyPairHandles& out,
                                      std::initializer_list<CK_RV> accepted = {});

}  // namespace hsm::agent::keys
