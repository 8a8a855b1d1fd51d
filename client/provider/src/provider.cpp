// hsm-provider's entry point: what OpenSSL 3 calls when it loads hsm.so (openssl.cnf or
// -provider hsm), the algorithms it offers and its reason strings.
//
// Offered: a store loader for the "hsm" scheme; keymgmt for EC, RSA and ED25519 (keys loaded
// from the store only: no key generation); signatures ECDSA, RSA (PKCS#1 v1.5, PSS) and
// ED25519. Every algorithm carries the property "provider=hsm", OpenSSL's own for a provider
// named hsm.
#include <openssl/core_dispatch.h>
#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/params.h>

#include <exception>
#include <new>

#include "dispatch.hpp"
#include "provider_context.hpp"

namespace hsm::provider {
namespace {

constexpr const char* kProperties = "provider=hsm";

const OSSL_ALGORITHM kKeymgmts[] = {
    {"EC:id-ecPublicKey:1.2.840.10045.2.1", kProperties, kEcKeymgmt, "hsm-agent EC key"},
    {"RSA:rsaEncryption:1.2.840.113549.1.1.1", kProperties, kRsaKeymgmt, "hsm-agent RSA key"},
    {"ED25519:1.3.101.112", kProperties, kEd25519Keymgmt, "hsm-agent Ed25519 key"},
    {nullptr, nullptr, nullptr, nullptr}};

const OSSL_ALGORITHM kSignatures[] = {
    {"ECDSA", kProperties, kEcdsaSignature, "ECDSA signed by hsm-agent"},
    {"RSA:rsaEncryption:1.2.840.113549.1.1.1", kProperties, kRsaSignature,
     "RSA signed by hsm-agent"},
    {"ED25519:1.3.101.112", kProperties, kEd25519Signature, "Ed25519 signed by hsm-agent"},
    {nullptr, nullptr, nullptr, nullptr}};

const OSSL_ALGORITHM kStores[] = {
    {"hsm", kProperties, kStoreLoader, "keys of hsm-agent: hsm:<kid>[?socket=<path>]"},
    {nullptr, nullptr, nullptr, nullptr}};

const OSSL_ALGORITHM* query_operation(void* /*provctx*/, int operation_id, int* no_cache) {
  *no_cache = 0;
  switch (operation_id) {
    case OSSL_OP_KEYMGMT:
      return kKeymgmts;
    case OSSL_OP_SIGNATURE:
      return kSignatures;
    case OSSL_OP_STORE:
      return kStores;
    default:
      return nullptr;
  }
}

const OSSL_PARAM* gettable_params(void* /*provctx*/) {
  static const OSSL_PARAM kGettable[] = {OSSL_PARAM_utf8_ptr(OSSL_PROV_PARAM_NAME, nullptr, 0),
                                         OSSL_PARAM_utf8_ptr(OSSL_PROV_PARAM_VERSION, nullptr, 0),
                                         OSSL_PARAM_utf8_ptr(OSSL_PROV_PARAM_BUILDINFO, nullptr, 0),
                                         OSSL_PARAM_int(OSSL_PROV_PARAM_STATUS, nullptr),
                                         OSSL_PARAM_END};
  return kGettable;
}

int get_params(void* /*provctx*/, OSSL_PARAM params[]) {
  if (auto* p = OSSL_PARAM_locate(params, OSSL_PROV_PARAM_NAME)) {
    if (OSSL_PARAM_set_utf8_ptr(p, "hsm-agent provider") == 0) return 0;
  }
  if (auto* p = OSSL_PARAM_locate(params, OSSL_PROV_PARAM_VERSION)) {
    if (OSSL_PARAM_set_utf8_ptr(p, HSM_PROVIDER_VERSION) == 0) return 0;
  }
  if (auto* p = OSSL_PARAM_locate(params, OSSL_PROV_PARAM_BUILDINFO)) {
    if (OSSL_PARAM_set_utf8_ptr(p, "hsm-sidecar " HSM_PROVIDER_VERSION) == 0) return 0;
  }
  if (auto* p = OSSL_PARAM_locate(params, OSSL_PROV_PARAM_STATUS)) {
    if (OSSL_PARAM_set_int(p, 1) == 0) return 0;
  }
  return 1;
}

const OSSL_ITEM* reason_strings(void* /*provctx*/) {
  static const OSSL_ITEM kReasons[] = {
      {kReasonAgent, const_cast<char*>("hsm-agent refused or failed")},
      {kReasonUnreachable, const_cast<char*>("hsm-agent unreachable")},
      {kReasonBadUri, const_cast<char*>("bad hsm key URI")},
      {kReasonNotSupported, const_cast<char*>("not supported with hsm keys")},
      {kReasonNoPrivateKey, const_cast<char*>("no private key")},
      {kReasonInternal, const_cast<char*>("hsm provider internal error")},
      {0, nullptr}};
  return kReasons;
}

// No TLS groups or sigalgs of its own; answering (with nothing) matters: libssl collects the
// TLS groups of every provider and stops at the first that does not answer, so without this
// `-provider hsm -provider default` would leave TLS 1.2 without EC groups.
int get_capabilities(void* /*provctx*/, const char* /*capability*/, OSSL_CALLBACK* /*cb*/,
                     void* /*arg*/) {
  return 1;
}

void teardown(void* provctx) {
  delete static_cast<ProviderContext*>(provctx);
}

const OSSL_DISPATCH kProviderFunctions[] = {
    {OSSL_FUNC_PROVIDER_TEARDOWN, HSM_FN(&teardown)},
    {OSSL_FUNC_PROVIDER_GETTABLE_PARAMS, HSM_FN(&gettable_params)},
    {OSSL_FUNC_PROVIDER_GET_PARAMS, HSM_FN(&get_params)},
    {OSSL_FUNC_PROVIDER_QUERY_OPERATION, HSM_FN(&query_operation)},
    {OSSL_FUNC_PROVIDER_GET_REASON_STRINGS, HSM_FN(&reason_strings)},
    {OSSL_FUNC_PROVIDER_GET_CAPABILITIES, HSM_FN(&get_capabilities)},
    {0, nullptr}};

}  // namespace
}  // namespace hsm::provider

extern "C" int OSSL_provider_init(const OSSL_CORE_HANDLE* handle, const OSSL_DISPATCH* in,
                                  const OSSL_DISPATCH** out, void** provctx) {
  try {
    *provctx = new hsm::provider::ProviderContext(handle, in);
  } catch (const std::exception& error) {
    // No provider context yet to raise through: OpenSSL reports the failed load itself; say why
    // on the error queue of libcrypto this module is linked to (the application's).
    ERR_raise_data(ERR_LIB_PROV, ERR_R_INIT_FAIL, "%s", error.what());
    return 0;
  }
  *out = hsm::provider::kProviderFunctions;
  return 1;
}
