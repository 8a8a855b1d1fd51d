// Map keys of the wire protocol, spelled once for the encoder and both decoders.
// Private to hsm::protocol; protocol/README.md is the public description.
#pragma once

#include <string_view>

namespace hsm::protocol::wire {

// Request parameters.
inline constexpr std::string_view kKid = "kid";
inline constexpr std::string_view kAlg = "alg";
inline constexpr std::string_view kRsaBits = "rsa_bits";
inline constexpr std::string_view kData = "data";
inline constexpr std::string_view kDigest = "digest";
inline constexpr std::string_view kSignature = "signature";
inline constexpr std::string_view kFormat = "format";
inline constexpr std::string_view kTimeoutMs = "timeout_ms";
inline constexpr std::string_view kItems = "items";

// Error map.
inline constexpr std::string_view kCode = "code";
inline constexpr std::string_view kMessage = "message";
inline constexpr std::string_view kCkr = "ckr";

// Results.
inline constexpr std::string_view kProtocol = "protocol";
inline constexpr std::string_view kAgentVersion = "agent_version";
inline constexpr std::string_view kCanCreate = "can_create";
inline constexpr std::string_view kCanImport = "can_import";
inline constexpr std::string_view kCanDelete = "can_delete";
inline constexpr std::string_view kSupportedAlgs = "supported_algs";
inline constexpr std::string_view kDefaultAlg = "default_alg";
inline constexpr std::string_view kMaxMessageBytes = "max_message_bytes";
inline constexpr std::string_view kMetricsUrl = "metrics_url";
inline constexpr std::string_view kOk = "ok";
inline constexpr std::string_view kLatencyMs = "latency_ms";
inline constexpr std::string_view kError = "error";
inline constexpr std::string_view kToken = "token";
inline constexpr std::string_view kLabel = "label";
inline constexpr std::string_view kManufacturer = "manufacturer";
inline constexpr std::string_view kModel = "model";
inline constexpr std::string_view kSerial = "serial";
inline constexpr std::string_view kJwk = "jwk";
inline constexpr std::string_view kSpki = "spki";
inline constexpr std::string_view kValid = "valid";
inline constexpr std::string_view kKeys = "keys";
inline constexpr std::string_view kDeleted = "deleted";
inline constexpr std::string_view kResults = "results";

}  // namespace hsm::protocol::wire
