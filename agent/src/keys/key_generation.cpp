#include "keys/key_generation.hpp"

#include <array>
#include <span>
#include <vector>

#include "pkcs11/session.hpp"

namespace hsm::agent::keys {

CK_RV generate_key_pair(pkcs11::Session& session, const KeyPairSpec& spec, KeyPairHandles& out,
                        std::initializer_list<CK_RV> accepted) {
  using pkcs11::bytes_attribute;
  using pkcs11::scalar_attribute;
  const Algorithm& alg = *spec.alg;
  CK_BBOOL yes = CK_TRUE;
  CK_BBOOL no = CK_FALSE;
  CK_BBOOL token = spec.token_objects ? CK_TRUE : CK_FALSE;
  CK_OBJECT_CLASS public_class = CKO_PUBLIC_KEY;
  CK_OBJECT_CLASS private_class = CKO_PRIVATE_KEY;
  CK_KEY_TYPE key_type = alg.ckk;
  const std::span<const std::uint8_t> kid(reinterpret_cast<const std::uint8_t*>(spec.kid.data()),
                                          spec.kid.size());

  std::vector<CK_ATTRIBUTE> public_template = {
      scalar_attribute(CKA_CLASS, public_class), scalar_attribute(CKA_KEY_TYPE, key_type),
      scalar_attribute(CKA_TOKEN, token),        scalar_attribute(CKA_VERIFY, yes),
      bytes_attribute(CKA_LABEL, kid),           bytes_attribute(CKA_ID, kid),
  };
  std::vector<CK_ATTRIBUTE> private_template = {
      scalar_attribute(CKA_CLASS, private_class),
      scalar_attribute(CKA_KEY_TYPE, key_type),
      scalar_attribute(CKA_TOKEN, token),
      scalar_attribute(CKA_PRIVATE, yes),
      scalar_attribute(CKA_SIGN, yes),
      scalar_attribute(CKA_SENSITIVE, yes),
      scalar_attribute(CKA_EXTRACTABLE, no),
      bytes_attribute(CKA_LABEL, kid),
      bytes_attribute(CKA_ID, kid),
  };

  // PKCS#11 2.40 CKA_ALLOWED_MECHANISMS: a CK_MECHANISM_TYPE array.
  std::vector<CK_MECHANISM_TYPE> allowed = allowed_mechanisms(alg);
  if (spec.record_alg) {
    private_template.push_back(CK_ATTRIBUTE{CKA_ALLOWED_MECHANISMS, allowed.data(),
                                            allowed.size() * sizeof(CK_MECHANISM_TYPE)});
  }

  protocol::Bytes ec_params;
  CK_ULONG modulus_bits = spec.rsa_bits;
  static constexpr std::array<std::uint8_t, 3> kPublicExponent = {0x01, 0x00, 0x01};  // 65537
  if (alg.curve != nullptr) {
    ec_params = ec_params_der(*alg.curve);
    public_template.push_back(bytes_attribute(CKA_EC_PARAMS, ec_params));
  } else {
    public_template.push_back(scalar_attribute(CKA_MODULUS_BITS, modulus_bits));
    public_template.push_back(bytes_attribute(CKA_PUBLIC_EXPONENT, kPublicExponent));
  }

  CK_MECHANISM mechanism{alg.keygen_mechanism, nullptr, 0};
  return session.generate_key_pair(mechanism, public_template, private_template, out.public_key,
                                   out.private_key, accepted);
}

}  // namespace hsm::agent::keys
