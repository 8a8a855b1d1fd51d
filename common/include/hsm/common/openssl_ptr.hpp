// Owning smart pointers for the OpenSSL objects agent, client and hsmctl use: one alias per C
// type, each freeing with its own free function (Envoy's c_smart_ptr.h pattern).
#pragma once

#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/crypto.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/param_build.h>
#include <openssl/params.h>

#include <memory>

namespace hsm::common {

template <typename T, void (*Free)(T*)>
struct OpenSslDeleter {
  void operator()(T* p) const noexcept { Free(p); }
};

template <typename T, void (*Free)(T*)>
using OpenSslPtr = std::unique_ptr<T, OpenSslDeleter<T, Free>>;

using EvpPkeyPtr = OpenSslPtr<EVP_PKEY, EVP_PKEY_free>;
using EvpPkeyCtxPtr = OpenSslPtr<EVP_PKEY_CTX, EVP_PKEY_CTX_free>;
using EvpMdCtxPtr = OpenSslPtr<EVP_MD_CTX, EVP_MD_CTX_free>;
using EvpMdPtr = OpenSslPtr<EVP_MD, EVP_MD_free>;
using BignumPtr = OpenSslPtr<BIGNUM, BN_free>;
using EcdsaSigPtr = OpenSslPtr<ECDSA_SIG, ECDSA_SIG_free>;
using ParamBldPtr = OpenSslPtr<OSSL_PARAM_BLD, OSSL_PARAM_BLD_free>;
using ParamPtr = OpenSslPtr<OSSL_PARAM, OSSL_PARAM_free>;
using BioPtr = OpenSslPtr<BIO, BIO_free_all>;

/// Memory OpenSSL allocated for the caller (i2d_* output, BIO_get_mem_data is not one).
struct OpenSslFree {
  void operator()(void* p) const noexcept { OPENSSL_free(p); }
};
template <typename T>
using OpenSslBuffer = std::unique_ptr<T, OpenSslFree>;

/// Shares an EVP_PKEY between owners (EVP_PKEY_up_ref); read-only use (verify, export) from
/// several threads is safe in OpenSSL 3.
using SharedPkey = std::shared_ptr<EVP_PKEY>;
[[nodiscard]] inline SharedPkey share(EvpPkeyPtr pkey) {
  return SharedPkey(pkey.release(), [](EVP_PKEY* p) { EVP_PKEY_free(p); });
}

}  // namespace hsm::common
