// ECDSA signatures in their two encodings: JOSE's and PKCS#11's raw r||s (each half as long as
// the curve's field) and the DER ECDSA-Sig-Value OpenSSL signs and verifies. Pure functions
// over bytes; DER is parsed and written by OpenSSL.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <vector>

namespace hsm::common {

/// r||s (each half field_bytes long) as DER ECDSA-Sig-Value; nullopt when the length is wrong.
[[nodiscard]] std::optional<std::vector<std::uint8_t>> ecdsa_raw_to_der(
    std::span<const std::uint8_t> raw, std::size_t field_bytes);

/// DER ECDSA-Sig-Value as r||s with each half left-padded to field_bytes; nullopt when the bytes
/// are not exactly one DER ECDSA-Sig-Value or r/s do not fit.
[[nodiscard]] std::optional<std::vector<std::uint8_t>> ecdsa_der_to_raw(
    std::span<const std::uint8_t> der, std::size_t field_bytes);

}  // namespace hsm::common
