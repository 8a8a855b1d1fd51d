// Session: one open PKCS#11 session (move-only RAII; C_CloseSession in a noexcept destructor),
// and every operation the agent performs on a session: find objects by template, read
// attributes, generate a key pair, destroy an object, sign. Callers (keys/) never reach the
// module or the raw handle: each PKCS#11 call is made here, through Module's one call wrapper.
//
// Thread-safety: a Session is used by one thread at a time (PKCS#11 sessions are not
// re-entrant); SessionPool hands them out one per worker.
#pragma once

#include <p11-kit/pkcs11.h>

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <span>
#include <type_traits>
#include <vector>

namespace hsm::agent::pkcs11 {

class Module;

using Bytes = std::vector<std::uint8_t>;

class Session {
 public:
  /// C_OpenSession on `slot` (CKF_SERIAL_SESSION, plus CKF_RW_SESSION when `read_write`).
  /// Throws Pkcs11Error.
  Session(const Module& module, CK_SLOT_ID slot, bool read_write);
  ~Session();
  Session(Session&& other) noexcept;
  Session& operator=(Session&& other) noexcept;
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  /// C_GetSessionInfo: the cheapest call that proves the session (and token) still answer.
  [[nodiscard]] CK_SESSION_INFO info() const;

  /// Up to `max_objects` handles of objects matching `attributes`: one C_FindObjectsInit, then
  /// C_FindObjects until `max_objects` or the end (one call when max_objects is small), then
  /// C_FindObjectsFinal. The template's pValue buffers are only read.
  [[nodiscard]] std::vector<CK_OBJECT_HANDLE> find_objects(std::span<CK_ATTRIBUTE> attributes,
                                                           std::size_t max_objects) const;

  /// The values of `types` on `object`, in order; nullopt for an attribute the object does not
  /// have or will not reveal (CKR_ATTRIBUTE_TYPE_INVALID / CKR_ATTRIBUTE_SENSITIVE). Two
  /// C_GetAttributeValue calls: lengths, then values. Values are bounded by `max_value_bytes`.
  [[nodiscard]] std::vector<std::optional<Bytes>> get_attributes(
      CK_OBJECT_HANDLE object, std::span<const CK_ATTRIBUTE_TYPE> types,
      std::size_t max_value_bytes = 16 * 1024) const;

  /// One CK_ULONG attribute (CKA_CLASS, CKA_KEY_TYPE, ...), nullopt when unavailable.
  [[nodiscard]] std::optional<CK_ULONG> get_ulong(CK_OBJECT_HANDLE object,
                                                  CK_ATTRIBUTE_TYPE type) const;

  /// C_Login as `user` with `pin` (only read; never copied or logged). Returns CKR_OK or one of
  /// `accepted`; throws Pkcs11Error for anything else.
  [[nodiscard]] CK_RV login(CK_USER_TYPE user, std::span<const std::uint8_t> pin,
                            std::initializer_list<CK_RV> accepted = {}) const;
  /// C_Logout. Returns CKR_OK or one of `accepted`; throws Pkcs11Error for anything else.
  [[nodiscard]] CK_RV logout(std::initializer_list<CK_RV> accepted = {}) const;

  /// C_GenerateKeyPair with `mechanism` and the two templates (only read) into `public_key`
  /// and `private_key`. Returns CKR_OK or one of `accepted` (then no key was made); throws
  /// Pkcs11Error for anything else.
  [[nodiscard]] CK_RV generate_key_pair(const CK_MECHANISM& mechanism,
                                        std::span<CK_ATTRIBUTE> public_template,
                                        std::span<CK_ATTRIBUTE> private_template,
                                        CK_OBJECT_HANDLE& public_key, CK_OBJECT_HANDLE& private_key,
                                        std::initializer_list<CK_RV> accepted = {}) const;

  /// C_DestroyObject. Throws Pkcs11Error.
  void destroy_object(CK_OBJECT_HANDLE object) const;

  /// C_SignInit with `mechanism` and `key`, then one C_Sign of `input` into `signature`, which
  /// must be large enough for the token's answer (a too-small buffer is a Pkcs11Error with
  /// CKR_BUFFER_TOO_SMALL, which leaves the operation active: mark the session broken). Returns
  /// the signature's length. Throws Pkcs11Error.
  [[nodiscard]] std::size_t sign(const CK_MECHANISM& mechanism, CK_OBJECT_HANDLE key,
                                 std::span<const std::uint8_t> input,
                                 std::span<std::uint8_t> signature) const;

 private:
  void close() noexcept;

  const Module* module_ = nullptr;
  CK_SESSION_HANDLE handle_ = CK_INVALID_HANDLE;
};

/// A CK_ATTRIBUTE pointing at a scalar (CK_BBOOL, CK_ULONG, ...) that must outlive the template.
template <typename T>
requires std::is_scalar_v<T> &&(!std::is_pointer_v<T>) [[nodiscard]] CK_ATTRIBUTE
    scalar_attribute(CK_ATTRIBUTE_TYPE type, T& value) noexcept {
  return CK_ATTRIBUTE{type, &value, sizeof(T)};
}
/// A CK_ATTRIBUTE pointing at a byte buffer (which must outlive the template).
[[nodiscard]] inline CK_ATTRIBUTE bytes_attribute(CK_ATTRIBUTE_TYPE type,
                                                  std::span<const std::uint8_t> bytes) noexcept {
  // PKCS#11 templates take a non-const void*; the library only reads input templates.
  return CK_ATTRIBUTE{type, const_cast<std::uint8_t*>(bytes.data()), bytes.size()};
}

}  // namespace hsm::agent::pkcs11
