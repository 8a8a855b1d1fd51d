#include "key.hpp"

#include <openssl/x509.h>

#include <hsm/client.hpp>

namespace hsm::provider {
namespace {

constexpr std::string_view kScheme = "hsm:";
// Longer than any kid the agent accepts plus a socket path; bounds what is decoded.
constexpr std::size_t kMaxUriBytes = 4096;

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

/// %XX-decodes `text`; nullopt on a broken escape.
std::optional<std::string> percent_decode(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  for (std::size_t i = 0; i < text.size(); ++i) {
    if (text[i] != '%') {
      out.push_back(text[i]);
      continue;
    }
    if (i + 2 >= text.size()) return std::nullopt;
    const int high = hex_value(text[i + 1]);
    const int low = hex_value(text[i + 2]);
    if (high < 0 || low < 0) return std::nullopt;
    out.push_back(static_cast<char>(high * 16 + low));
    i += 2;
  }
  return out;
}

}  // namespace

std::optional<KeyUri> parse_key_uri(std::string_view uri, std::string& why) {
  if (uri.size() > kMaxUriBytes) {
    why = "longer than " + std::to_string(kMaxUriBytes) + " bytes";
    return std::nullopt;
  }
  if (uri.substr(0, kScheme.size()) != kScheme) {
    why = "does not start with hsm:";
    return std::nullopt;
  }
  uri.remove_prefix(kScheme.size());
  const auto query_at = uri.find('?');
  KeyUri parsed;
  const auto kid = percent_decode(uri.substr(0, query_at));
  if (!kid || kid->empty()) {
    why = kid ? "names no kid (hsm:<kid>)" : "has a broken %-escape in the kid";
    return std::nullopt;
  }
  parsed.kid = *kid;
  if (query_at == std::string_view::npos) return parsed;
  std::string_view query = uri.substr(query_at + 1);
  while (!query.empty()) {
    const auto end = query.find('&');
    const auto item = query.substr(0, end);
    query = end == std::string_view::npos ? std::string_view{} : query.substr(end + 1);
    constexpr std::string_view kSocket = "socket=";
    if (item.substr(0, kSocket.size()) != kSocket) {
      why = "has an unknown attribute '" + std::string(item.substr(0, item.find('='))) +
            "' (only socket=)";
      return std::nullopt;
    }
    const auto socket = percent_decode(item.substr(kSocket.size()));
    if (!socket || socket->empty()) {
      why = "has an empty or broken socket=";
      return std::nullopt;
    }
    parsed.socket = *socket;
  }
  return parsed;
}

EvpPkeyPtr decode_spki(const ProviderContext& provider, std::span<const std::uint8_t> spki) {
  const unsigned char* at = spki.data();
  EvpPkeyPtr key(
      d2i_PUBKEY_ex(nullptr, &at, static_cast<long>(spki.size()), provider.libctx(), nullptr));
  if (!key || at != spki.data() + spki.size() || !kind_of(key.get())) return nullptr;
  return key;
}

std::optional<KeyKind> kind_of(const EVP_PKEY* key) {
  for (const auto& kind : kKeyKinds) {
    if (EVP_PKEY_is_a(key, kind.type) != 0) return kind.kind;
  }
  return std::nullopt;
}

std::shared_ptr<const HsmKey> fetch_key(ProviderContext& provider, const KeyUri& uri) {
  hsm::PublicKey answer;
  try {
    answer = provider.client(uri.socket)->get_public_key(uri.kid);
  } catch (const hsm::Error& error) {
    if (error.errc() == hsm::Errc::kNotFound) {
      provider.raise(kReasonAgent, "no key 'hsm:%s' on hsm-agent at %s: %s", uri.kid.c_str(),
                     (uri.socket.empty() ? provider.default_socket() : uri.socket).c_str(),
                     error.what());
    } else {
      provider.raise_agent_error(error, "loading key 'hsm:" + uri.kid + "'", uri.socket);
    }
    return nullptr;
  }
  auto pub = decode_spki(provider, answer.spki);
  if (!pub) {
    provider.raise(kReasonNotSupported,
                   "key 'hsm:%s' (%s): the agent's public key is not an EC, RSA or Ed25519 key",
                   uri.kid.c_str(), answer.alg.c_str());
    return nullptr;
  }
  const KeyKind kind = *kind_of(pub.get());
  return std::make_shared<const HsmKey>(
      HsmKey{kind, uri.kid, uri.socket, std::move(answer.alg), std::move(pub)});
}

std::optional<std::vector<std::uint8_t>> sign_with_agent(ProviderContext& provider,
                                                         const HsmKey& key,
                                                         const SignRequest& request) {
  if (!key.can_sign()) {
    provider.raise(kReasonNoPrivateKey, "a public key cannot sign: load the key as hsm:<kid>");
    return std::nullopt;
  }
  hsm::SignOptions options;
  options.alg = request.alg;
  if (request.der) options.format = "der";
  try {
    auto client = provider.client(key.socket);
    auto answer = request.is_digest ? client->sign_digest_detailed(key.kid, request.input, options)
                                    : client->sign_detailed(key.kid, request.input, options);
    return std::move(answer.signature);
  } catch (const hsm::Error& error) {
    provider.raise_agent_error(error, "signing with 'hsm:" + key.kid + "' as " + request.alg,
                               key.socket);
    return std::nullopt;
  }
}

}  // namespace hsm::provider

namespace hsm::provider {

const char* hash_of_alg(std::string_view alg) {
  if (alg.ends_with("256") || alg == "ES256K") return "SHA256";
  if (alg.ends_with("384")) return "SHA384";
  if (alg.ends_with("512")) return "SHA512";
  return nullptr;
}

}  // namespace hsm::provider
