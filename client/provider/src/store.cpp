// The OSSL_STORE loader for the "hsm" scheme: hsm:<kid>[?socket=<path>] is one key whose public
// half comes from the agent's get_public_key (one round trip when loaded, none after: signing
// needs only the kid). Open checks the URI; load asks the agent and hands the key to
// OpenSSL by reference, which this provider's keymgmt load() takes over.
#include <openssl/core_dispatch.h>
#include <openssl/core_names.h>
#include <openssl/core_object.h>
#include <openssl/params.h>
#include <openssl/store.h>

#include <new>

#include "dispatch.hpp"
#include "key.hpp"

namespace hsm::provider {
namespace {

struct LoaderCtx {
  ProviderContext* provider;
  KeyUri uri;
  int expect = 0;  // OSSL_STORE_INFO_* the application asked for; 0 = anything
  bool done = false;
};

void* store_open(void* provctx, const char* uri) {
  auto* provider = static_cast<ProviderContext*>(provctx);
  std::string why;
  auto parsed = parse_key_uri(uri, why);
  if (!parsed) {
    provider->raise(kReasonBadUri, "'%s' is not an hsm key URI (hsm:<kid>[?socket=<path>]): %s",
                    uri, why.c_str());
    return nullptr;
  }
  return new (std::nothrow) LoaderCtx{provider, std::move(*parsed)};
}

const OSSL_PARAM* store_settable_ctx_params(void* /*provctx*/) {
  static const OSSL_PARAM kSettable[] = {OSSL_PARAM_int(OSSL_STORE_PARAM_EXPECT, nullptr),
                                         OSSL_PARAM_END};
  return kSettable;
}

int store_set_ctx_params(void* loaderctx, const OSSL_PARAM params[]) {
  auto* ctx = static_cast<LoaderCtx*>(loaderctx);
  if (const auto* p = OSSL_PARAM_locate_const(params, OSSL_STORE_PARAM_EXPECT)) {
    if (OSSL_PARAM_get_int(p, &ctx->expect) != 1) return 0;
  }
  return 1;
}

int store_load(void* loaderctx, OSSL_CALLBACK* object_cb, void* object_cbarg,
               OSSL_PASSPHRASE_CALLBACK* /*pw_cb*/, void* /*pw_cbarg*/) {
  auto* ctx = static_cast<LoaderCtx*>(loaderctx);
  ctx->done = true;
  // A URI names one key: asked for a certificate or a CRL, it has none (no error).
  if (ctx->expect != 0 && ctx->expect != OSSL_STORE_INFO_PKEY &&
      ctx->expect != OSSL_STORE_INFO_PUBKEY) {
    return 1;
  }
  auto key = fetch_key(*ctx->provider, ctx->uri);
  if (!key) return 0;
  KeyReference reference{KeyReference::kMagic, ctx->provider, key};
  int object_type = OSSL_OBJECT_PKEY;
  OSSL_PARAM params[] = {
      OSSL_PARAM_construct_int(OSSL_OBJECT_PARAM_TYPE, &object_type),
      OSSL_PARAM_construct_utf8_string(OSSL_OBJECT_PARAM_DATA_TYPE,
                                       const_cast<char*>(info(key->kind).type), 0),
      OSSL_PARAM_construct_octet_string(OSSL_OBJECT_PARAM_REFERENCE, &reference, sizeof(reference)),
      OSSL_PARAM_construct_end()};
  return object_cb(params, object_cbarg);
}

int store_eof(void* loaderctx) {
  return static_cast<LoaderCtx*>(loaderctx)->done ? 1 : 0;
}

int store_close(void* loaderctx) {
  delete static_cast<LoaderCtx*>(loaderctx);
  return 1;
}

}  // namespace

const OSSL_DISPATCH kStoreLoader[] = {
    {OSSL_FUNC_STORE_OPEN, HSM_FN(&store_open)},
    {OSSL_FUNC_STORE_SETTABLE_CTX_PARAMS, HSM_FN(&store_settable_ctx_params)},
    {OSSL_FUNC_STORE_SET_CTX_PARAMS, HSM_FN(&store_set_ctx_params)},
    {OSSL_FUNC_STORE_LOAD, HSM_FN(&store_load)},
    {OSSL_FUNC_STORE_EOF, HSM_FN(&store_eof)},
    {OSSL_FUNC_STORE_CLOSE, HSM_FN(&store_close)},
    {0, nullptr},
};

}  // namespace hsm::provider
