#include "provider_context.hpp"

#include <openssl/core_dispatch.h>
#include <openssl/params.h>
#include <openssl/provider.h>
#include <unistd.h>

#include <charconv>
#include <cstdint>
#include <hsm/client.hpp>
#include <stdexcept>

namespace hsm::provider {
namespace {

/// Keeps every client of `clients` alive for ever and empties the map. For a forked child: the
/// clients' reader threads live in the parent only, so destroying one would wait for threads
/// that do not exist here; their memory is the parent's copy, not a leak of this process's work.
void abandon(std::map<std::string, std::shared_ptr<hsm::Client>>& clients) {
  for (auto& entry : clients) {
    static_cast<void>(new std::shared_ptr<hsm::Client>(std::move(entry.second)));
  }
  clients.clear();
}

/// openssl.cnf's value of `name` in the provider's section, or "".
std::string config_value(const OSSL_CORE_HANDLE* handle, OSSL_FUNC_core_get_params_fn* get,
                         const char* name) {
  if (get == nullptr) return {};
  const char* value = nullptr;
  OSSL_PARAM params[] = {OSSL_PARAM_construct_utf8_ptr(name, const_cast<char**>(&value), 0),
                         OSSL_PARAM_construct_end()};
  if (get(handle, params) == 0 || value == nullptr) return {};
  return value;
}

}  // namespace

ProviderContext::ProviderContext(const OSSL_CORE_HANDLE* handle, const OSSL_DISPATCH* in)
    : handle_(handle), pid_(::getpid()) {
  OSSL_FUNC_core_get_params_fn* get_params = nullptr;
  for (; in != nullptr && in->function_id != 0; ++in) {
    switch (in->function_id) {
      case OSSL_FUNC_CORE_GET_PARAMS:
        get_params = OSSL_FUNC_core_get_params(in);
        break;
      case OSSL_FUNC_CORE_NEW_ERROR:
        new_error_ = OSSL_FUNC_core_new_error(in);
        break;
      case OSSL_FUNC_CORE_SET_ERROR_DEBUG:
        set_error_debug_ = OSSL_FUNC_core_set_error_debug(in);
        break;
      case OSSL_FUNC_CORE_VSET_ERROR:
        vset_error_ = OSSL_FUNC_core_vset_error(in);
        break;
      default:
        break;
    }
  }
  default_socket_ = config_value(handle, get_params, "socket");
  if (default_socket_.empty()) default_socket_ = hsm::default_socket_path();
  const auto timeout = config_value(handle, get_params, "timeout_ms");
  if (!timeout.empty()) {
    unsigned value = 0;
    const auto [end, ec] = std::from_chars(timeout.data(), timeout.data() + timeout.size(), value);
    if (ec != std::errc{} || end != timeout.data() + timeout.size() || value == 0) {
      throw std::invalid_argument("hsm provider: timeout_ms must be a positive integer, got '" +
                                  timeout + "'");
    }
    timeout_ = std::chrono::milliseconds(value);
  }
  libctx_ = OSSL_LIB_CTX_new();
  if (libctx_ == nullptr || OSSL_PROVIDER_load(libctx_, "default") == nullptr) {
    OSSL_LIB_CTX_free(libctx_);
    throw std::runtime_error("hsm provider: cannot load the default provider");
  }
}

ProviderContext::~ProviderContext() {
  {
    std::lock_guard lock(mutex_);
    if (pid_ != ::getpid()) abandon(clients_);
    clients_.clear();
  }
  // The default provider loaded into libctx_ is unloaded with it.
  OSSL_LIB_CTX_free(libctx_);
}

std::shared_ptr<hsm::Client> ProviderContext::client(const std::string& socket_path) {
  const std::string& path = socket_path.empty() ? default_socket_ : socket_path;
  std::lock_guard lock(mutex_);
  if (const pid_t now = ::getpid(); now != pid_) {
    // Forked since these clients were made: their sockets are shared with the parent, their
    // threads are the parent's. Connect afresh from this process.
    abandon(clients_);
    pid_ = now;
  }
  auto& client = clients_[path];
  if (!client) {
    hsm::ClientOptions options;
    options.socket_path = path;
    options.timeout = timeout_;
    client = std::make_shared<hsm::Client>(std::move(options));
  }
  return client;
}

void ProviderContext::raise(int reason, const char* format, ...) const {
  if (new_error_ == nullptr || vset_error_ == nullptr) return;
  new_error_(handle_);
  if (set_error_debug_ != nullptr)
    set_error_debug_(handle_, __FILE_NAME__, __LINE__, "hsm-provider");
  va_list args;
  va_start(args, format);
  vset_error_(handle_, static_cast<std::uint32_t>(reason), format, args);
  va_end(args);
}

void ProviderContext::raise_agent_error(const hsm::Error& error, const std::string& what,
                                        const std::string& socket_path) const {
  const std::string& socket = socket_path.empty() ? default_socket_ : socket_path;
  if (error.errc() == hsm::Errc::kConnectionFailed || error.errc() == hsm::Errc::kTimeout) {
    raise(kReasonUnreachable, "%s: no answer from hsm-agent at %s: %s", what.c_str(),
          socket.c_str(), error.what());
  } else {
    raise(kReasonAgent, "%s: hsm-agent at %s answered %s", what.c_str(), socket.c_str(),
          error.what());
  }
}

}  // namespace hsm::provider
