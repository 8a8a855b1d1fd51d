// SecretString: the PIN's container.
#include "pkcs11/secret.hpp"

#include <unistd.h>

#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>

using hsm::agent::SecretString;

namespace {

std::string as_text(const SecretString& secret) {
  const auto bytes = secret.bytes();
  return std::string(bytes.begin(), bytes.end());
}

struct TempFile {
  std::filesystem::path path;
  explicit TempFile(const std::string& content) {
    char name[] = "/tmp/hsm-secret-test-XXXXXX";
    const int fd = ::mkstemp(name);
    REQUIRE(fd >= 0);
    ::close(fd);
    path = name;
    std::ofstream(path, std::ios::binary) << content;
  }
  ~TempFile() { std::filesystem::remove(path); }
};

}  // namespace

TEST_CASE("SecretString holds its bytes and moves them out", "[secret]") {
  SecretString pin("1234");
  CHECK(pin.size() == 4);
  CHECK(as_text(pin) == "1234");
  SecretString moved(std::move(pin));
  CHECK(as_text(moved) == "1234");
  CHECK(pin.empty());  // NOLINT(bugprone-use-after-move): moved-from is documented as empty
  SecretString assigned;
  assigned = std::move(moved);
  CHECK(as_text(assigned) == "1234");
  CHECK(moved.empty());  // NOLINT(bugprone-use-after-move)
}

TEST_CASE("SecretString::from_file drops one trailing newline", "[secret]") {
  {
    TempFile file("s3cret\n");
    CHECK(as_text(SecretString::from_file(file.path)) == "s3cret");
  }
  {
    TempFile file("s3cret\r\n");
    CHECK(as_text(SecretString::from_file(file.path)) == "s3cret");
  }
  {
    TempFile file("s3cret\n\n");
    CHECK(as_text(SecretString::from_file(file.path)) == "s3cret\n");
  }
  {
    TempFile file("no-newline");
    CHECK(as_text(SecretString::from_file(file.path)) == "no-newline");
  }
}

TEST_CASE("SecretString::from_file errors name the path, never the content", "[secret]") {
  CHECK_THROWS_WITH(SecretString::from_file("/nonexistent/pin"),
                    Catch::Contains("/nonexistent/pin"));
  TempFile big(std::string(5000, 'x'));
  try {
    (void)SecretString::from_file(big.path);
    FAIL("an oversized secret file was accepted");
  } catch (const std::runtime_error& e) {
    CHECK(std::string(e.what()).find(big.path.string()) != std::string::npos);
    CHECK(std::string(e.what()).find("xxxx") == std::string::npos);
  }
}
