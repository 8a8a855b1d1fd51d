#include "hsm/common/ecdsa_signature.hpp"

#include <openssl/ecdsa.h>

#include "hsm/common/openssl_ptr.hpp"

namespace hsm::common {

std::optional<std::vector<std::uint8_t>> ecdsa_raw_to_der(std::span<const std::uint8_t> raw,
                                                          std::size_t field_bytes) {
  if (raw.size() != 2 * field_bytes) return std::nullopt;
  const int half = static_cast<int>(field_bytes);
  BignumPtr r(BN_bin2bn(raw.data(), half, nullptr));
  BignumPtr s(BN_bin2bn(raw.data() + field_bytes, half, nullptr));
  EcdsaSigPtr sig(ECDSA_SIG_new());
  if (!r || !s || !sig || ECDSA_SIG_set0(sig.get(), r.get(), s.get()) != 1) return std::nullopt;
  (void)r.release();  // owned by sig now
  (void)s.release();
  const int length = i2d_ECDSA_SIG(sig.get(), nullptr);
  if (length <= 0) return std::nullopt;
  std::vector<std::uint8_t> der(static_cast<std::size_t>(length));
  unsigned char* out = der.data();
  if (i2d_ECDSA_SIG(sig.get(), &out) != length) return std::nullopt;
  return der;
}

std::optional<std::vector<std::uint8_t>> ecdsa_der_to_raw(std::span<const std::uint8_t> der,
                                                          std::size_t field_bytes) {
  const unsigned char* cursor = der.data();
  EcdsaSigPtr sig(d2i_ECDSA_SIG(nullptr, &cursor, static_cast<long>(der.size())));
  if (!sig || cursor != der.data() + der.size()) return std::nullopt;
  const BIGNUM* r = ECDSA_SIG_get0_r(sig.get());
  const BIGNUM* s = ECDSA_SIG_get0_s(sig.get());
  const int half = static_cast<int>(field_bytes);
  if (BN_is_negative(r) || BN_is_negative(s) || BN_num_bytes(r) > half || BN_num_bytes(s) > half) {
    return std::nullopt;
  }
  std::vector<std::uint8_t> raw(2 * field_bytes);
  if (BN_bn2binpad(r, raw.data(), half) != half ||
      BN_bn2binpad(s, raw.data() + field_bytes, half) != half) {
    return std::nullopt;
  }
  return raw;
}

}  // namespace hsm::common
