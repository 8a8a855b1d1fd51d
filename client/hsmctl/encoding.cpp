#include "encoding.hpp"

#include <openssl/pem.h>

#include <algorithm>
#include <fstream>
#include <iostream>
#include <iterator>
#include <limits>

#include "hsm/common/openssl_ptr.hpp"
#include "hsm/jose.hpp"

namespace hsm::hsmctl {
namespace {

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
  common::OpenSslBuffer<unsigned char> buffer(OPENSSL_hexstr2buf(text.c_str(), &length));
  if (!buffer || length <= 0) {
    throw UsageError("not a hex string: '" + text + "' (expected pairs of hex digits)");
  }
  return Bytes(buffer.get(), buffer.get() + length);
}

std::string encode_base64url(std::span<const std::uint8_t> bytes) {
  return hsm::jose::base64url_encode(bytes);
}

Bytes decode_base64url(std::string_view input) {
  // Operators paste signatures from anywhere: surrounding blanks and '=' padding are accepted
  // here; the strict JOSE decoder does the rest.
  std::string_view text = trim(input);
  while (!text.empty() && text.back() == '=') text.remove_suffix(1);
  if (text.empty()) throw UsageError("empty base64url string");
  try {
    return hsm::jose::base64url_decode(text);
  } catch (const hsm::jose::Error& e) {
    throw UsageError(std::string("not base64url: ") + e.what());
  }
}

std::string spki_to_pem(std::span<const std::uint8_t> spki_der) {
  common::BioPtr bio(BIO_new(BIO_s_mem()));
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
