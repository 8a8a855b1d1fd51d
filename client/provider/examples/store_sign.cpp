// hsm_provider_store_sign: loads a key through OSSL_STORE (hsm:<kid>) and signs with
// EVP_DigestSign from several threads at once, checking every signature with the public key
// in the default provider. The providers come from openssl.cnf (OPENSSL_CONF), as they would
// for any application: this program names none of them.
//
//   hsm_provider_store_sign <uri> [--threads N] [--count N] [--seconds S] [--pss]
//
// --pss: RSA-PSS (salt = hash length, as TLS 1.3) instead of PKCS#1 v1.5, for an RSA key.
// --fork: sign once, then fork (as a server forks its workers after loading its key): parent
// and child then both sign and each prints its own "signed" line; the parent's exit status
// counts the child's too.
// --count: signatures per thread (default 8). --seconds: instead, sign for S seconds (or until
// SIGTERM) and print a line each time a thread's outcome changes ("ok" after errors, "error: ..."
// after success): what a test watches while it stops and restarts the agent. Exit status 0 when
// every signature of a --count run verified (a --seconds run: when the last signature of every
// thread did).
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/rsa.h>
#include <openssl/store.h>
#include <openssl/x509.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace {

struct PkeyFree {
  void operator()(EVP_PKEY* key) const noexcept { EVP_PKEY_free(key); }
};
struct MdCtxFree {
  void operator()(EVP_MD_CTX* ctx) const noexcept { EVP_MD_CTX_free(ctx); }
};
using Pkey = std::unique_ptr<EVP_PKEY, PkeyFree>;
using MdCtx = std::unique_ptr<EVP_MD_CTX, MdCtxFree>;

std::mutex output_mutex;
std::atomic<bool> stopping{false};  // set by SIGTERM (lock-free, so safe in a signal handler)

void on_signal(int /*signum*/) {
  stopping = true;
}

/// The first error of this thread's OpenSSL error queue as text (and clears the queue).
std::string take_error() {
  char text[512] = "unknown error";
  const unsigned long code = ERR_peek_error();
  // The data string carries the provider's message (agent code, socket, kid).
  const char* data = nullptr;
  int flags = 0;
  ERR_peek_error_data(&data, &flags);
  if (code != 0) ERR_error_string_n(code, text, sizeof(text));
  std::string message = text;
  if (data != nullptr && (flags & ERR_TXT_STRING) != 0) message += std::string(": ") + data;
  ERR_clear_error();
  return message;
}

Pkey load_key(const std::string& uri) {
  std::unique_ptr<OSSL_STORE_CTX, decltype(&OSSL_STORE_close)> store(
      OSSL_STORE_open(uri.c_str(), nullptr, nullptr, nullptr, nullptr), &OSSL_STORE_close);
  if (!store) return nullptr;
  while (OSSL_STORE_eof(store.get()) == 0) {
    std::unique_ptr<OSSL_STORE_INFO, decltype(&OSSL_STORE_INFO_free)> info(
        OSSL_STORE_load(store.get()), &OSSL_STORE_INFO_free);
    if (info && OSSL_STORE_INFO_get_type(info.get()) == OSSL_STORE_INFO_PKEY) {
      return Pkey(OSSL_STORE_INFO_get1_PKEY(info.get()));
    }
  }
  return nullptr;
}

/// The public key alone, as the default provider holds it (an independent verifier).
Pkey public_copy(EVP_PKEY* key) {
  unsigned char* der = nullptr;
  const int size = i2d_PUBKEY(key, &der);
  if (size <= 0) return nullptr;
  const unsigned char* at = der;
  Pkey copy(d2i_PUBKEY(nullptr, &at, size));
  OPENSSL_free(der);
  return copy;
}

/// Signs `message` with `key` (SHA-256 for ECDSA/RSA, none for Ed25519) and verifies the result
/// with `verifier`. Empty string on success, else the error.
std::string sign_and_verify(EVP_PKEY* key, EVP_PKEY* verifier, const std::string& message,
                            bool pss) {
  const char* md = EVP_PKEY_is_a(key, "ED25519") != 0 ? nullptr : "SHA256";
  const auto set_pss = [pss](EVP_PKEY_CTX* pctx) {
    return !pss || (EVP_PKEY_CTX_set_rsa_padding(pctx, RSA_PKCS1_PSS_PADDING) == 1 &&
                    EVP_PKEY_CTX_set_rsa_pss_saltlen(pctx, RSA_PSS_SALTLEN_DIGEST) == 1);
  };
  EVP_PKEY_CTX* pctx = nullptr;
  MdCtx ctx(EVP_MD_CTX_new());
  std::vector<unsigned char> signature(static_cast<std::size_t>(EVP_PKEY_get_size(key)));
  std::size_t length = signature.size();
  const auto* data = reinterpret_cast<const unsigned char*>(message.data());
  if (EVP_DigestSignInit_ex(ctx.get(), &pctx, md, nullptr, nullptr, key, nullptr) != 1 ||
      !set_pss(pctx) ||
      EVP_DigestSign(ctx.get(), signature.data(), &length, data, message.size()) != 1) {
    return take_error();
  }
  MdCtx check(EVP_MD_CTX_new());
  if (EVP_DigestVerifyInit_ex(check.get(), &pctx, md, nullptr, nullptr, verifier, nullptr) != 1 ||
      !set_pss(pctx) ||
      EVP_DigestVerify(check.get(), signature.data(), length, data, message.size()) != 1) {
    ERR_clear_error();
    return "signature does not verify";
  }
  return {};
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s <uri> [--threads N] [--count N] [--seconds S] [--pss]\n",
                 argv[0]);
    return 2;
  }
  const std::string uri = argv[1];
  int threads = 4;
  int count = 8;
  double seconds = 0;
  bool pss = false;
  bool fork_after_load = false;
  for (int i = 2; i < argc; ++i) {
    if (std::strcmp(argv[i], "--pss") == 0 || std::strcmp(argv[i], "--fork") == 0) {
      (argv[i][2] == 'p' ? pss : fork_after_load) = true;
      continue;
    }
    if (i + 1 == argc) break;
    if (std::strcmp(argv[i], "--threads") == 0) threads = std::atoi(argv[i + 1]);
    if (std::strcmp(argv[i], "--count") == 0) count = std::atoi(argv[i + 1]);
    if (std::strcmp(argv[i], "--seconds") == 0) seconds = std::atof(argv[i + 1]);
    ++i;
  }
  Pkey key = load_key(uri);
  if (!key) {
    std::fprintf(stderr, "cannot load %s: %s\n", uri.c_str(), take_error().c_str());
    return 1;
  }
  Pkey verifier = public_copy(key.get());
  if (!verifier) {
    std::fprintf(stderr, "cannot export the public key: %s\n", take_error().c_str());
    return 1;
  }

  pid_t child = -1;
  if (fork_after_load) {
    // The provider's connection now exists in this process; the child must not share it.
    if (const auto error = sign_and_verify(key.get(), verifier.get(), "before fork", pss);
        !error.empty()) {
      std::fprintf(stderr, "signing before fork: %s\n", error.c_str());
      return 1;
    }
    std::fflush(stdout);
    child = ::fork();
    if (child < 0) return 1;
  }

  std::signal(SIGTERM, on_signal);
  std::atomic<int> signed_ok{0};
  std::atomic<int> failed{0};
  std::atomic<int> last_failed{0};  // threads whose last signature failed
  const auto until = std::chrono::steady_clock::now() +
                     std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                         std::chrono::duration<double>(seconds));
  std::vector<std::thread> workers;
  for (int t = 0; t < threads; ++t) {
    workers.emplace_back([&, t] {
      bool was_ok = true;
      for (int n = 0;
           seconds > 0 ? !stopping && std::chrono::steady_clock::now() < until : n < count; ++n) {
        const std::string error =
            sign_and_verify(key.get(), verifier.get(),
                            "thread " + std::to_string(t) + " message " + std::to_string(n), pss);
        const bool ok = error.empty();
        (ok ? signed_ok : failed)++;
        if (ok != was_ok) {
          std::lock_guard lock(output_mutex);
          std::printf("thread %d: %s\n", t, ok ? "ok" : ("error: " + error).c_str());
          std::fflush(stdout);
        }
        was_ok = ok;
      }
      if (!was_ok) last_failed++;
    });
  }
  for (auto& worker : workers) worker.join();
  std::printf("%ssigned %d, failed %d\n", child == 0 ? "child: " : "", signed_ok.load(),
              failed.load());
  std::fflush(stdout);
  int status = 0;
  if (seconds > 0) {
    status = last_failed == 0 ? 0 : 1;
  } else {
    status = failed == 0 ? 0 : 1;
  }
  if (child > 0) {
    int child_status = 0;
    if (::waitpid(child, &child_status, 0) != child || !WIFEXITED(child_status) ||
        WEXITSTATUS(child_status) != 0) {
      status = 1;
    }
  }
  return status;
}
