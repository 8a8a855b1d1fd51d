#include "es256_token.hpp"

#include <dlfcn.h>
#include <openssl/crypto.h>
#include <openssl/sha.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string_view>
#include <utility>
#include <vector>

namespace hsm::bench {
namespace {

// ---- Errors ----------------------------------------------------------------------------------

/// The few CK_RV names a benchmark run is likely to meet; others print as hex.
constexpr std::pair<CK_RV, std::string_view> kRvNames[] = {
    {CKR_OK, "CKR_OK"},
    {CKR_GENERAL_ERROR, "CKR_GENERAL_ERROR"},
    {CKR_FUNCTION_FAILED, "CKR_FUNCTION_FAILED"},
    {CKR_ARGUMENTS_BAD, "CKR_ARGUMENTS_BAD"},
    {CKR_DEVICE_ERROR, "CKR_DEVICE_ERROR"},
    {CKR_DEVICE_REMOVED, "CKR_DEVICE_REMOVED"},
    {CKR_KEY_HANDLE_INVALID, "CKR_KEY_HANDLE_INVALID"},
    {CKR_MECHANISM_INVALID, "CKR_MECHANISM_INVALID"},
    {CKR_OPERATION_ACTIVE, "CKR_OPERATION_ACTIVE"},
    {CKR_PIN_INCORRECT, "CKR_PIN_INCORRECT"},
    {CKR_PIN_LOCKED, "CKR_PIN_LOCKED"},
    {CKR_SESSION_COUNT, "CKR_SESSION_COUNT"},
    {CKR_SESSION_HANDLE_INVALID, "CKR_SESSION_HANDLE_INVALID"},
    {CKR_TOKEN_NOT_PRESENT, "CKR_TOKEN_NOT_PRESENT"},
    {CKR_USER_NOT_LOGGED_IN, "CKR_USER_NOT_LOGGED_IN"},
    {CKR_BUFFER_TOO_SMALL, "CKR_BUFFER_TOO_SMALL"},
    {CKR_CRYPTOKI_NOT_INITIALIZED, "CKR_CRYPTOKI_NOT_INITIALIZED"},
};

std::string rv_name(CK_RV rv) {
  for (const auto& [value, name] : kRvNames) {
    if (value == rv) return std::string(name);
  }
  char hex[32];
  std::snprintf(hex, sizeof hex, "CKR 0x%08lx", rv);
  return hex;
}

/// A failed PKCS#11 call during set-up: "C_Login: CKR_PIN_INCORRECT".
class Pkcs11Failure : public std::runtime_error {
 public:
  Pkcs11Failure(std::string_view function, CK_RV rv)
      : std::runtime_error(std::string(function) + ": " + rv_name(rv)) {}
};

void check(CK_RV rv, std::string_view function) {
  if (rv != CKR_OK) throw Pkcs11Failure(function, rv);
}

// ---- The PIN ---------------------------------------------------------------------------------

/// The PIN bytes, wiped on destruction.
class SecretBytes {
 public:
  explicit SecretBytes(std::vector<char> bytes) : bytes_(std::move(bytes)) {}
  ~SecretBytes() { OPENSSL_cleanse(bytes_.data(), bytes_.size()); }
  SecretBytes(const SecretBytes&) = delete;
  SecretBytes& operator=(const SecretBytes&) = delete;

  /// The first line of `path` (a trailing newline is not part of the PIN).
  [[nodiscard]] static SecretBytes from_file(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw std::runtime_error("cannot read the PIN file " + path);
    std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    const auto end =
        std::find_if(bytes.begin(), bytes.end(), [](char c) { return c == '\n' || c == '\r'; });
    std::fill(end, bytes.end(), '\0');
    bytes.resize(static_cast<std::size_t>(end - bytes.begin()));
    return SecretBytes(std::move(bytes));
  }

  [[nodiscard]] CK_UTF8CHAR_PTR data() noexcept {
    return reinterpret_cast<CK_UTF8CHAR_PTR>(bytes_.data());
  }
  [[nodiscard]] CK_ULONG size() const noexcept { return static_cast<CK_ULONG>(bytes_.size()); }

 private:
  std::vector<char> bytes_;
};

// ---- Token and key ---------------------------------------------------------------------------

/// DER of the OID prime256v1 (P-256), as CKA_EC_PARAMS holds it.
constexpr std::array<CK_BYTE, 10> kP256Params = {0x06, 0x08, 0x2a, 0x86, 0x48,
                                                 0xce, 0x3d, 0x03, 0x01, 0x07};

template <typename T>
CK_ATTRIBUTE attribute(CK_ATTRIBUTE_TYPE type, T& value) {
  return {type, &value, sizeof value};
}
CK_ATTRIBUTE bytes_attribute(CK_ATTRIBUTE_TYPE type, std::string_view bytes) {
  return {type, const_cast<char*>(bytes.data()), static_cast<CK_ULONG>(bytes.size())};
}

/// The slot whose token has `label` (blank-padded in CK_TOKEN_INFO); the first slot with a
/// token when `label` is empty.
CK_SLOT_ID find_slot(const CK_FUNCTION_LIST& api, const std::string& label) {
  CK_ULONG count = 0;
  check(api.C_GetSlotList(CK_TRUE, nullptr, &count), "C_GetSlotList");
  std::vector<CK_SLOT_ID> slots(count);
  check(api.C_GetSlotList(CK_TRUE, slots.data(), &count), "C_GetSlotList");
  slots.resize(count);
  for (const CK_SLOT_ID slot : slots) {
    CK_TOKEN_INFO info{};
    if (api.C_GetTokenInfo(slot, &info) != CKR_OK) continue;
    std::string_view found(reinterpret_cast<const char*>(info.label), sizeof info.label);
    found = found.substr(0, found.find_last_not_of(' ') + 1);
    if (label.empty() || found == label) return slot;
  }
  throw std::runtime_error(label.empty() ? "no slot has a token"
                                         : "no token labelled '" + label + "'");
}

/// Private-key objects labelled `label` (at most two: enough to tell "ambiguous").
std::vector<CK_OBJECT_HANDLE> find_private_keys(const Session& session, const std::string& label) {
  CK_OBJECT_CLASS key_class = CKO_PRIVATE_KEY;
  std::array<CK_ATTRIBUTE, 2> query = {attribute(CKA_CLASS, key_class),
                                       bytes_attribute(CKA_LABEL, label)};
  const CK_FUNCTION_LIST& api = session.api();
  check(api.C_FindObjectsInit(session.handle(), query.data(), query.size()), "C_FindObjectsInit");
  std::array<CK_OBJECT_HANDLE, 2> found{};
  CK_ULONG count = 0;
  const CK_RV rv = api.C_FindObjects(session.handle(), found.data(), found.size(), &count);
  check(api.C_FindObjectsFinal(session.handle()), "C_FindObjectsFinal");
  check(rv, "C_FindObjects");
  return {found.begin(), found.begin() + static_cast<std::ptrdiff_t>(count)};
}

/// Generates a P-256 key pair labelled `label`, with the attributes the agent gives its keys
/// (CKA_ID = label, sensitive, not extractable).
CK_OBJECT_HANDLE generate_es256_key(const Session& session, const std::string& label) {
  CK_OBJECT_CLASS public_class = CKO_PUBLIC_KEY, private_class = CKO_PRIVATE_KEY;
  CK_KEY_TYPE key_type = CKK_EC;
  CK_BBOOL yes = CK_TRUE, no = CK_FALSE;
  std::array<CK_BYTE, kP256Params.size()> params = kP256Params;
  std::array<CK_ATTRIBUTE, 7> public_template = {attribute(CKA_CLASS, public_class),
                                                 attribute(CKA_KEY_TYPE, key_type),
                                                 attribute(CKA_TOKEN, yes),
                                                 attribute(CKA_VERIFY, yes),
                                                 bytes_attribute(CKA_LABEL, label),
                                                 bytes_attribute(CKA_ID, label),
                                                 {CKA_EC_PARAMS, params.data(), params.size()}};
  std::array<CK_ATTRIBUTE, 9> private_template = {attribute(CKA_CLASS, private_class),
                                                  attribute(CKA_KEY_TYPE, key_type),
                                                  attribute(CKA_TOKEN, yes),
                                                  attribute(CKA_PRIVATE, yes),
                                                  attribute(CKA_SIGN, yes),
                                                  attribute(CKA_SENSITIVE, yes),
                                                  attribute(CKA_EXTRACTABLE, no),
                                                  bytes_attribute(CKA_LABEL, label),
                                                  bytes_attribute(CKA_ID, label)};
  CK_MECHANISM mechanism{CKM_EC_KEY_PAIR_GEN, nullptr, 0};
  CK_OBJECT_HANDLE public_key = CK_INVALID_HANDLE, private_key = CK_INVALID_HANDLE;
  check(session.api().C_GenerateKeyPair(session.handle(), &mechanism, public_template.data(),
                                        public_template.size(), private_template.data(),
                                        private_template.size(), &public_key, &private_key),
        "C_GenerateKeyPair");
  return private_key;
}

/// Fails unless `key` is a P-256 EC key (so that every mode measures ES256).
void check_es256(const Session& session, CK_OBJECT_HANDLE key) {
  CK_KEY_TYPE key_type = 0;
  std::array<CK_BYTE, 64> params{};
  std::array<CK_ATTRIBUTE, 2> attributes = {attribute(CKA_KEY_TYPE, key_type),
                                            {CKA_EC_PARAMS, params.data(), params.size()}};
  check(session.api().C_GetAttributeValue(session.handle(), key, attributes.data(),
                                          attributes.size()),
        "C_GetAttributeValue");
  const bool p256 = key_type == CKK_EC && attributes[1].ulValueLen == kP256Params.size() &&
                    std::equal(kP256Params.begin(), kP256Params.end(), params.begin());
  if (!p256) throw std::runtime_error("the key is not an EC P-256 (ES256) key");
}

}  // namespace

// ---- Pkcs11Library and Session ---------------------------------------------------------------

void Pkcs11Library::DlCloser::operator()(void* handle) const noexcept {
  ::dlclose(handle);
}

Pkcs11Library::Pkcs11Library(const std::string& path) {
  handle_.reset(::dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL));
  if (!handle_) {
    const char* why = ::dlerror();
    throw std::runtime_error("cannot load " + path + ": " + (why != nullptr ? why : "?"));
  }
  // POSIX: dlsym's void* converts to a function pointer (the one sanctioned use of this cast).
  auto* get_function_list =
      reinterpret_cast<CK_C_GetFunctionList>(::dlsym(handle_.get(), "C_GetFunctionList"));
  if (get_function_list == nullptr) throw std::runtime_error(path + ": no C_GetFunctionList");
  check(get_function_list(&api_), "C_GetFunctionList");
  CK_C_INITIALIZE_ARGS args{};
  args.flags = CKF_OS_LOCKING_OK;
  check(api_->C_Initialize(&args), "C_Initialize");
}

Pkcs11Library::~Pkcs11Library() {
  api_->C_Finalize(nullptr);
}

Session::Session(const CK_FUNCTION_LIST& api, CK_SLOT_ID slot) : api_(&api) {
  check(api.C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, nullptr, nullptr, &handle_),
        "C_OpenSession");
}

Session::~Session() {
  if (handle_ != CK_INVALID_HANDLE) api_->C_CloseSession(handle_);
}

// ---- Es256Token ------------------------------------------------------------------------------

Es256Token::Es256Token(const TokenSettings& settings) : library_(settings.module) {
  const CK_FUNCTION_LIST& api = library_.api();
  slot_ = find_slot(api, settings.token_label);
  login_session_ = std::make_unique<Session>(api, slot_);
  {
    SecretBytes pin = SecretBytes::from_file(settings.pin_file);
    const CK_RV rv = api.C_Login(login_session_->handle(), CKU_USER, pin.data(), pin.size());
    if (rv != CKR_USER_ALREADY_LOGGED_IN) check(rv, "C_Login");
  }

  const std::vector<CK_OBJECT_HANDLE> keys = find_private_keys(*login_session_, settings.kid);
  if (keys.size() > 1)
    throw std::runtime_error("more than one private key is labelled " + settings.kid);
  if (!keys.empty()) {
    key_ = keys.front();
  } else if (settings.create_key) {
    key_ = generate_es256_key(*login_session_, settings.kid);
  } else {
    throw std::runtime_error("no private key labelled '" + settings.kid +
                             "' (pass --create-key to make one)");
  }
  check_es256(*login_session_, key_);
}

Es256Token::~Es256Token() = default;

std::unique_ptr<Session> Es256Token::open_session() const {
  return std::make_unique<Session>(library_.api(), slot_);
}

// ---- One signature ---------------------------------------------------------------------------

std::optional<std::string> sign_es256(const Session& session, CK_OBJECT_HANDLE key,
                                      std::span<const unsigned char> message,
                                      std::span<CK_BYTE> signature) {
  const CK_FUNCTION_LIST& api = session.api();
  std::array<CK_BYTE, SHA256_DIGEST_LENGTH> digest{};
  SHA256(message.data(), message.size(), digest.data());
  CK_MECHANISM mechanism{CKM_ECDSA, nullptr, 0};
  CK_RV rv = api.C_SignInit(session.handle(), &mechanism, key);
  if (rv != CKR_OK) return "C_SignInit: " + rv_name(rv);
  CK_ULONG length = signature.size();
  rv = api.C_Sign(session.handle(), digest.data(), digest.size(), signature.data(), &length);
  if (rv != CKR_OK) return "C_Sign: " + rv_name(rv);
  if (length != kEs256SignatureBytes) {
    return "C_Sign returned " + std::to_string(length) + " bytes, not 64";
  }
  return std::nullopt;
}

}  // namespace hsm::bench
