// The function tables of hsm-provider's algorithms (keymgmt.cpp, signature.cpp, store.cpp),
// listed by query_operation in provider.cpp.
#pragma once

#include <openssl/core.h>

// OpenSSL's dispatch tables hold untyped function pointers.
#define HSM_FN(f) reinterpret_cast<void (*)()>(f)  // NOLINT

namespace hsm::provider {

extern const OSSL_DISPATCH kEcKeymgmt[];
extern const OSSL_DISPATCH kRsaKeymgmt[];
extern const OSSL_DISPATCH kEd25519Keymgmt[];

extern const OSSL_DISPATCH kEcdsaSignature[];
extern const OSSL_DISPATCH kRsaSignature[];
extern const OSSL_DISPATCH kEd25519Signature[];

extern const OSSL_DISPATCH kStoreLoader[];

}  // namespace hsm::provider
