#include "keys/ec_encoding.hpp"

#include <openssl/asn1.h>
#include <openssl/objects.h>

#include <algorithm>
#include <cstring>
#include <string_view>

#include "hsm/common/ecdsa_signature.hpp"
#include "hsm/common/openssl_ptr.hpp"

namespace hsm::agent::keys {
namespace {

using Asn1OctetStringPtr = common::OpenSslPtr<ASN1_OCTET_STRING, ASN1_OCTET_STRING_free>;
using Asn1TypePtr = common::OpenSslPtr<ASN1_TYPE, ASN1_TYPE_free>;

// A bare point of the right size and shape for `curve`.
bool is_bare_point(std::span<const std::uint8_t> point, const Curve& curve) {
  if (curve.key_type == KeyType::kEdwards) return point.size() == curve.field_bytes;
  if (point.empty()) return false;
  if (point.size() == 1 + 2 * curve.field_bytes) return point[0] == 0x04;
  if (point.size() == 1 + curve.field_bytes) return point[0] == 0x02 || point[0] == 0x03;
  return false;
}

}  // namespace

std::optional<Bytes> unwrap_ec_point(std::span<const std::uint8_t> value, const Curve& curve) {
  // The bare form first: its length is exactly what the curve needs, which a DER wrapping (at
  // least 2 bytes longer) never is.
  if (is_bare_point(value, curve)) return Bytes(value.begin(), value.end());

  const unsigned char* cursor = value.data();
  Asn1OctetStringPtr octets(
      d2i_ASN1_OCTET_STRING(nullptr, &cursor, static_cast<long>(value.size())));
  if (!octets || cursor != value.data() + value.size()) return std::nullopt;  // trailing bytes
  const std::span<const std::uint8_t> inner(
      ASN1_STRING_get0_data(octets.get()),
      static_cast<std::size_t>(ASN1_STRING_length(octets.get())));
  if (!is_bare_point(inner, curve)) return std::nullopt;
  return Bytes(inner.begin(), inner.end());
}

const Curve* parse_ec_params(std::span<const std::uint8_t> value) {
  const unsigned char* cursor = value.data();
  Asn1TypePtr parsed(d2i_ASN1_TYPE(nullptr, &cursor, static_cast<long>(value.size())));
  if (!parsed || cursor != value.data() + value.size()) return nullptr;
  switch (ASN1_TYPE_get(parsed.get())) {
    case V_ASN1_OBJECT:
      return find_curve_by_nid(OBJ_obj2nid(parsed->value.object));
    case V_ASN1_PRINTABLESTRING: {
      // RFC 8410 predates PKCS#11 3.0's OIDs; tokens of that era name the curve in text.
      const ASN1_STRING* text = parsed->value.printablestring;
      const std::string_view name(reinterpret_cast<const char*>(ASN1_STRING_get0_data(text)),
                                  static_cast<std::size_t>(ASN1_STRING_length(text)));
      if (name == "edwards25519") return find_curve_by_nid(NID_ED25519);
      return nullptr;
    }
    default:
      return nullptr;
  }
}

bool normalize_ecdsa_signature(Bytes& signature, std::size_t field_bytes) {
  const std::size_t expected = 2 * field_bytes;
  if (signature.size() == expected) return true;
  if (!signature.empty() && signature[0] == 0x30) {
    if (auto raw = common::ecdsa_der_to_raw(signature, field_bytes)) {
      signature.assign(raw->begin(), raw->end());
      return true;
    }
  }
  // r||s short of the curve size: PKCS#11 defines the signature as two equal halves, and a token
  // that sizes them wrongly (P-521 as 65 bytes, or dropping leading zero bytes of both) still
  // returns two equal halves. Split in the middle and left-pad each back to the curve size.
  if (signature.empty() || signature.size() % 2 != 0 || signature.size() > expected) return false;
  const std::size_t half = signature.size() / 2;
  const std::size_t pad = field_bytes - half;
  signature.resize(expected);  // within the capacity the caller reserved
  // Move s to its padded place first (it moves right, so copy backwards), then r.
  std::memmove(signature.data() + field_bytes + pad, signature.data() + half, half);
  std::memset(signature.data() + field_bytes, 0, pad);
  std::memmove(signature.data() + pad, signature.data(), half);
  std::memset(signature.data(), 0, pad);
  return true;
}

}  // namespace hsm::agent::keys
