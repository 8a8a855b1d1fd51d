#include "encoding.hpp"

#include <openssl/bio.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/pem.h>

#include <algorithm>
#include <fstream>
#include <iostream>
#include <iterator>
#include <limits>
#include <memory>

namespace hsm::hsmctl {
namespace {

struct BioFree {
  void operator()(BIO* bio) const noexcept { BIO_free(bio); }
};
using BioPtr = std::unique_ptr<BIO, BioFree>;

struct OpensslFree {
  void operator()(unsigned char* p) const noexcept { OPENSSL_free(p); }
};

std::string_view trim(std::string_view text) {
  constexpr std::string_view kSpace = " \t\r\n";
  const auto begin = text.find_first_not_of(kSpace);
  if (begin == std::string_view::npos) {
    return {};
  }
  return text.substr(begin, text.find_last_not_of(kSpace) - begin + 1);
}

Bytes read_stream(std::istream& in, const std::string& name, std::size_t max_bytes) {
  Bytes bytes;
  std::vector<char> chunk(std::size_t{64} * 1024);
  while (in) {
    in.read(chunk.data(), static_cast<std::streamsize>(chunk.size()));
    const auto got = static_cast<std::size_t>(in.gcount());
    if (bytes.size() + got > max_bytes) {
      throw UsageError(name + " has more than " + std::to_string(max_bytes) +
                       " bytes (the agent's message limit); sign a digest instead (--digest)");
    }
    bytes.insert(bytes.end(), chunk.begin(), chunk.begin() + static_cast<std::ptrdiff_t>(got));
  }
  if (in.bad()) {
    throw UsageError("cannot read " + name);
  }
  return bytes;
}

}  // namespace

Bytes decode_hex(std::string_view hex) {
  const std::string text(trim(hex));
  if (text.empty()) {
    throw UsageError("empty hex string");
  }
  long length = 0;
  std::unique_ptr<unsigned char, OpensslFree> buffer(OPENSSL_hexstr2buf(text.c_str(), &length));
  if (!buffer || length <= 0) {
    throw UsageError("not a hex string: '" + text + "' (expected pairs of hex digits)");
  }
  return Bytes(buffer.get(), buffer.get() + length);
}

std::string encode_base64url(std::span<const std::uint8_t> bytes) {
  if (bytes.empty()) {
    return {};
  }
  if (bytes.size() > static_cast<std::size_t>(std::numeric_limits<int>::max() / 4 * 3 - 3)) {
    throw UsageError("too many bytes to encode");
  }
  std::string text(4 * ((bytes.size() + 2) / 3) + 1, '\0');
  // NOLINTNEXTLINE(cppcoreguidelines-pro-type-reinterpret-cast): OpenSSL takes unsigned char
  const int written = EVP_EncodeBlock(reinterpret_cast<unsigned char*>(text.data()), bytes.data(),
                                      static_cast<int>(bytes.size()));
  text.resize(static_cast<std::size_t>(written));
  while (!text.empty() && text.back() == '=') {
    text.pop_back();
  }
  std::replace(text.begin(), text.end(), '+', '-');
  std::replace(text.begin(), text.end(), '/', '_');
  return text;
}

Bytes decode_base64url(std::string_view input) {
  std::string text(trim(input));
  while (!text.empty() && text.back() == '=') {
    text.pop_back();
  }
  if (text.empty()) {
    throw UsageError("empty base64url string");
  }
  for (char& c : text) {
    const bool plain = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9');
    if (c == '-') {
      c = '+';
    } else if (c == '_') {
      c = '/';
    } else if (!plain) {
      throw UsageError("not base64url: unexpected character '" + std::string(1, c) + "'");
    }
  }
  if (text.size() % 4 == 1) {
    throw UsageError("not base64url: impossible length");
  }
  const std::size_t padding = (4 - text.size() % 4) % 4;
  text.append(padding, '=');
  if (text.size() > static_cast<std::size_t>(std::numeric_limits<int>::max())) {
    throw UsageError("base64url string too long");
  }
  Bytes bytes(text.size() / 4 * 3);
  // NOLINTNEXTLINE(cppcoreguidelines-pro-type-reinterpret-cast): OpenSSL takes unsigned char
  const int decoded =
      EVP_DecodeBlock(bytes.data(), reinterpret_cast<const unsigned char*>(text.data()),
                      static_cast<int>(text.size()));
  if (decoded < 0) {
    throw UsageError("not base64url");
  }
  // EVP_DecodeBlock counts the zero bytes that stand for the padding; drop them.
  bytes.resize(static_cast<std::size_t>(decoded) - padding);
  return bytes;
}

std::string spki_to_pem(std::span<const std::uint8_t> spki_der) {
  BioPtr bio(BIO_new(BIO_s_mem()));
  if (!bio || spki_der.size() > static_cast<std::size_t>(std::numeric_limits<long>::max()) ||
      PEM_write_bio(bio.get(), "PUBLIC KEY", "", spki_der.data(),
                    static_cast<long>(spki_der.size())) <= 0) {
    throw std::runtime_error("cannot encode the public key as PEM");
  }
  char* data = nullptr;
  const long size = BIO_get_mem_data(bio.get(), &data);
  return std::string(data, static_cast<std::size_t>(size));
}

Bytes read_file(const std::string& path, std::size_t max_bytes) {
  if (path == "-") {
    return read_stream(std::cin, "standard input", max_bytes);
  }
  std::ifstream file(path, std::ios::binary);
  if (!file) {
    throw UsageError("cannot open " + path);
  }
  return read_stream(file, path, max_bytes);
}

void write_file(const std::string& path, std::span<const std::uint8_t> bytes) {
  std::ofstream file(path, std::ios::binary | std::ios::trunc);
  // NOLINTNEXTLINE(cppcoreguidelines-pro-type-reinterpret-cast): bytes as chars for ostream
  file.write(reinterpret_cast<const char*>(bytes.data()),
             static_cast<std::streamsize>(bytes.size()));
  file.close();
  if (!file) {
    throw UsageError("cannot write " + path);
  }
}

}  // namespace hsm::hsmctl
