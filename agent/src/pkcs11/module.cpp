#include "pkcs11/module.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <utility>

#include "service/key_service.hpp"

namespace hsm::agent::pkcs11 {
namespace {

constexpr std::array<std::string_view, kFunctionCount> kFunctionNames = {
#define HSM_PKCS11_NAME(member, enumerator, access) #member,
    HSM_PKCS11_FUNCTIONS(HSM_PKCS11_NAME)
#undef HSM_PKCS11_NAME
};

std::string last_dl_error() {
  const char* message = ::dlerror();
  return message != nullptr ? std::string{message} : std::string{"unknown dlopen error"};
}

}  // namespace

std::string_view function_name(Function function) noexcept {
  return kFunctionNames[static_cast<std::size_t>(function)];
}

Library::Library(std::string path) : path_(std::move(path)) {
  // RTLD_LOCAL: the vendor library's symbols must not interpose on ours (or OpenSSL's).
  handle_.reset(::dlopen(path_.c_str(), RTLD_NOW | RTLD_LOCAL));
  if (!handle_) {
    throw StartupError("cannot load PKCS#11 module " + path_ + ": " + last_dl_error());
  }
  // dlsym returns void*; the PKCS#11 ABI defines C_GetFunctionList's type, so this conversion
  // is the one unavoidable cast of a data pointer to a function pointer.
  void* symbol = ::dlsym(handle_.get(), "C_GetFunctionList");
  if (symbol == nullptr) {
    throw StartupError("cannot load PKCS#11 module " + path_ +
                       ": no C_GetFunctionList (not a PKCS#11 module?)");
  }
  CK_C_GetFunctionList get_function_list = nullptr;
  static_assert(sizeof(get_function_list) == sizeof(symbol));
  std::memcpy(&get_function_list, &symbol, sizeof(symbol));
  if (const CK_RV rv = get_function_list(&functions_); rv != CKR_OK || functions_ == nullptr) {
    throw StartupError("cannot load PKCS#11 module " + path_ +
                       ": C_GetFunctionList failed: " + describe_rv(rv));
  }
}

Module::Module(std::shared_ptr<const Library> library, Pkcs11Stats& stats)
    : library_(std::move(library)), stats_(stats), functions_(library_->functions()) {
  for (std::size_t i = 0; i < kFunctionCount; ++i) {
    const prometheus::Labels labels{{"function", std::string{kFunctionNames[i]}}};
    calls_[i] = &stats_.calls_total.Add(labels);
    const bool timed =
        stats_.all_call_histograms || std::find(kTimedFunctions.begin(), kTimedFunctions.end(),
                                                static_cast<Function>(i)) != kTimedFunctions.end();
    if (timed) durations_[i] = &stats_.call_duration_seconds.Add(labels, stats_.latency_buckets);
  }
  // The agent calls the library from several worker threads: ask it to use OS locking.
  CK_C_INITIALIZE_ARGS args{};
  args.flags = CKF_OS_LOCKING_OK;
  const CK_RV rv = call_accepting<Function::kInitialize>({CKR_CRYPTOKI_ALREADY_INITIALIZED}, &args);
  if (rv == CKR_CRYPTOKI_ALREADY_INITIALIZED) {
    // Someone else in this process owns the initialisation; finalising would pull the library
    // out from under them.
    spdlog::warn("PKCS#11 module {} was already initialised in this process", path());
  } else {
    finalize_on_destruction_ = true;
  }
}

Module::~Module() {
  if (finalize_on_destruction_) {
    const CK_RV rv = invoke<Function::kFinalize>(nullptr);
    if (rv != CKR_OK) spdlog::warn("C_Finalize failed: {}", describe_rv(rv));
  }
}

void Module::observe(Function function,
                     std::chrono::steady_clock::duration elapsed) const noexcept {
  const auto i = static_cast<std::size_t>(function);
  calls_[i]->Increment();
  if (durations_[i] != nullptr)
    durations_[i]->Observe(std::chrono::duration<double>(elapsed).count());
}

void Module::fail(Function function, CK_RV rv) const {
  const std::string_view name = function_name(function);
  stats_.errors_total.Add({{"function", std::string{name}}, {"ckr", std::string{ckr_name(rv)}}})
      .Increment();
  throw Pkcs11Error(name, rv);
}

}  // namespace hsm::agent::pkcs11
