#include "pkcs11/session.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstring>
#include <utility>

#include "pkcs11/module.hpp"

namespace hsm::agent::pkcs11 {
namespace {

// Ends a find operation on every path (C_FindObjectsFinal), so the session can start another.
class FindOperation {
 public:
  FindOperation(const Module& module, CK_SESSION_HANDLE session, std::span<CK_ATTRIBUTE> attrs)
      : module_(module), session_(session) {
    module_.call<Function::kFindObjectsInit>(session_, attrs.data(),
                                             static_cast<CK_ULONG>(attrs.size()));
  }
  ~FindOperation() {
    try {
      module_.call<Function::kFindObjectsFinal>(session_);
    } catch (const Pkcs11Error& e) {
      spdlog::debug("{}", e.what());
    }
  }
  FindOperation(const FindOperation&) = delete;
  FindOperation& operator=(const FindOperation&) = delete;

 private:
  const Module& module_;
  CK_SESSION_HANDLE session_;
};

}  // namespace

Session::Session(const Module& module, CK_SLOT_ID slot, bool read_write) : module_(&module) {
  const CK_FLAGS flags = CKF_SERIAL_SESSION | (read_write ? CKF_RW_SESSION : 0);
  module.call<Function::kOpenSession>(slot, flags, nullptr, nullptr, &handle_);
}

Session::~Session() {
  close();
}

Session::Session(Session&& other) noexcept
    : module_(other.module_), handle_(std::exchange(other.handle_, CK_INVALID_HANDLE)) {}

Session& Session::operator=(Session&& other) noexcept {
  if (this != &other) {
    close();
    module_ = other.module_;
    handle_ = std::exchange(other.handle_, CK_INVALID_HANDLE);
  }
  return *this;
}

void Session::close() noexcept {
  if (handle_ == CK_INVALID_HANDLE) return;
  try {
    // A session the token already dropped is closed as far as we are concerned.
    (void)module_->call_accepting<Function::kCloseSession>(
        {CKR_SESSION_HANDLE_INVALID, CKR_SESSION_CLOSED}, handle_);
  } catch (const Pkcs11Error& e) {
    // A token that is down fails every close; that fault is reported where it was first seen.
    if (e.error_class() == ErrorClass::kToken) {
      spdlog::debug("closing a PKCS#11 session: {}", e.what());
    } else {
      spdlog::warn("closing a PKCS#11 session: {}", e.what());
    }
  } catch (const std::exception& e) {
    spdlog::warn("closing a PKCS#11 session: {}", e.what());
  }
  handle_ = CK_INVALID_HANDLE;
}

CK_SESSION_INFO Session::info() const {
  CK_SESSION_INFO info{};
  module_->call<Function::kGetSessionInfo>(handle_, &info);
  return info;
}

std::vector<CK_OBJECT_HANDLE> Session::find_objects(std::span<CK_ATTRIBUTE> attributes,
                                                    std::size_t max_objects) const {
  constexpr std::size_t kBatch = 64;
  std::vector<CK_OBJECT_HANDLE> found;
  FindOperation operation(*module_, handle_, attributes);
  while (found.size() < max_objects) {
    const std::size_t want = std::min(kBatch, max_objects - found.size());
    const std::size_t before = found.size();
    found.resize(before + want);
    CK_ULONG count = 0;
    module_->call<Function::kFindObjects>(handle_, found.data() + before,
                                          static_cast<CK_ULONG>(want), &count);
    found.resize(before + std::min<std::size_t>(count, want));
    if (count < want) break;
  }
  return found;
}

std::vector<std::optional<Bytes>> Session::get_attributes(CK_OBJECT_HANDLE object,
                                                          std::span<const CK_ATTRIBUTE_TYPE> types,
                                                          std::size_t max_value_bytes) const {
  std::vector<CK_ATTRIBUTE> query(types.size());
  for (std::size_t i = 0; i < types.size(); ++i) query[i] = CK_ATTRIBUTE{types[i], nullptr, 0};

  // Pass 1: lengths. Unavailable attributes come back as CK_UNAVAILABLE_INFORMATION together
  // with one of the accepted return values; the others are still filled in.
  (void)module_->call_accepting<Function::kGetAttributeValue>(
      {CKR_ATTRIBUTE_TYPE_INVALID, CKR_ATTRIBUTE_SENSITIVE}, handle_, object, query.data(),
      static_cast<CK_ULONG>(query.size()));

  std::vector<std::optional<Bytes>> values(types.size());
  std::vector<CK_ATTRIBUTE> fetch;
  std::vector<std::size_t> index;
  fetch.reserve(types.size());
  for (std::size_t i = 0; i < query.size(); ++i) {
    const CK_ULONG length = query[i].ulValueLen;
    if (length == CK_UNAVAILABLE_INFORMATION || length > max_value_bytes) continue;
    values[i].emplace(length);
    fetch.push_back(CK_ATTRIBUTE{types[i], values[i]->data(), length});
    index.push_back(i);
  }
  if (fetch.empty()) return values;

  // Pass 2: the values of the attributes that exist.
  const CK_RV rv = module_->call_accepting<Function::kGetAttributeValue>(
      {CKR_ATTRIBUTE_TYPE_INVALID, CKR_ATTRIBUTE_SENSITIVE, CKR_BUFFER_TOO_SMALL}, handle_, object,
      fetch.data(), static_cast<CK_ULONG>(fetch.size()));
  for (std::size_t j = 0; j < fetch.size(); ++j) {
    auto& value = values[index[j]];
    const CK_ULONG length = fetch[j].ulValueLen;
    if (length == CK_UNAVAILABLE_INFORMATION || length > value->size()) {
      value.reset();  // changed between the passes, or refused: treat as unavailable
    } else {
      value->resize(length);
    }
  }
  if (rv == CKR_BUFFER_TOO_SMALL) spdlog::debug("an attribute grew between two reads");
  return values;
}

std::optional<CK_ULONG> Session::get_ulong(CK_OBJECT_HANDLE object, CK_ATTRIBUTE_TYPE type) const {
  const CK_ATTRIBUTE_TYPE types[] = {type};
  auto values = get_attributes(object, types);
  if (!values[0] || values[0]->size() != sizeof(CK_ULONG)) return std::nullopt;
  CK_ULONG result = 0;
  std::memcpy(&result, values[0]->data(), sizeof(result));
  return result;
}

CK_RV Session::login(CK_USER_TYPE user, std::span<const std::uint8_t> pin,
                     std::initializer_list<CK_RV> accepted) const {
  // C_Login takes a non-const pointer for historical reasons; it only reads the PIN.
  return module_->call_accepting<Function::kLogin>(
      accepted, handle_, user, pin.empty() ? nullptr : const_cast<CK_UTF8CHAR_PTR>(pin.data()),
      static_cast<CK_ULONG>(pin.size()));
}

CK_RV Session::logout(std::initializer_list<CK_RV> accepted) const {
  return module_->call_accepting<Function::kLogout>(accepted, handle_);
}

CK_RV Session::generate_key_pair(const CK_MECHANISM& mechanism,
                                 std::span<CK_ATTRIBUTE> public_template,
                                 std::span<CK_ATTRIBUTE> private_template,
                                 CK_OBJECT_HANDLE& public_key, CK_OBJECT_HANDLE& private_key,
                                 std::initializer_list<CK_RV> accepted) const {
  // PKCS#11 takes a non-const CK_MECHANISM_PTR; the library only reads it.
  return module_->call_accepting<Function::kGenerateKeyPair>(
      accepted, handle_, const_cast<CK_MECHANISM_PTR>(&mechanism), public_template.data(),
      static_cast<CK_ULONG>(public_template.size()), private_template.data(),
      static_cast<CK_ULONG>(private_template.size()), &public_key, &private_key);
}

void Session::destroy_object(CK_OBJECT_HANDLE object) const {
  module_->call<Function::kDestroyObject>(handle_, object);
}

std::size_t Session::sign(const CK_MECHANISM& mechanism, CK_OBJECT_HANDLE key,
                          std::span<const std::uint8_t> input,
                          std::span<std::uint8_t> signature) const {
  // Non-const pointers for historical reasons: the library only reads the mechanism and input.
  module_->call<Function::kSignInit>(handle_, const_cast<CK_MECHANISM_PTR>(&mechanism), key);
  CK_ULONG length = static_cast<CK_ULONG>(signature.size());
  module_->call<Function::kSign>(handle_, const_cast<CK_BYTE_PTR>(input.data()),
                                 static_cast<CK_ULONG>(input.size()), signature.data(), &length);
  return std::min<std::size_t>(length, signature.size());
}

}  // namespace hsm::agent::pkcs11
