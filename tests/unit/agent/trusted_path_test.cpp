// resolve_trusted_path() and foreign_write_access() (config/trusted_path.hpp): who may own and
// write each component of the socket's and the policy's paths. The directories are made under
// the temporary directory (/tmp: root's and sticky, so a passage like any other). Changing an
// owner needs root, as the test runner is; without root those cases are skipped.
#include "config/trusted_path.hpp"

#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>
#include <system_error>

using namespace hsm::agent;

namespace {

constexpr uid_t kOtherUid = 10002;

class TempTree {
 public:
  TempTree() {
    std::string pattern = (std::filesystem::temp_directory_path() / "trusted-path-XXXXXX").string();
    REQUIRE(::mkdtemp(pattern.data()) != nullptr);
    // The resolved form: the temporary directory may itself be reached through a symlink.
    root_ = resolve_trusted_path(pattern, ::geteuid()).resolved;
    REQUIRE(::chmod(root_.c_str(), 0755) == 0);
  }
  ~TempTree() {
    std::error_code ignored;
    std::filesystem::remove_all(root_, ignored);
  }
  TempTree(const TempTree&) = delete;
  TempTree& operator=(const TempTree&) = delete;

  [[nodiscard]] std::string dir(const std::string& name, mode_t mode) const {
    const auto path = root_ / name;
    std::filesystem::create_directories(path);
    REQUIRE(::chmod(path.c_str(), mode) == 0);
    return path.string();
  }
  [[nodiscard]] std::string file(const std::string& name, mode_t mode = 0644) const {
    const auto path = root_ / name;
    std::filesystem::create_directories(path.parent_path());
    std::ofstream(path) << "x";
    REQUIRE(::chmod(path.c_str(), mode) == 0);
    return path.string();
  }
  [[nodiscard]] std::string path(const std::string& name) const { return (root_ / name).string(); }

 private:
  std::filesystem::path root_;
};

std::string untrusted(const std::string& path) {
  try {
    (void)resolve_trusted_path(path, ::geteuid());
  } catch (const UntrustedPathError& e) {
    return e.what();
  }
  return "trusted";
}

bool running_as_root() {
  if (::geteuid() == 0) return true;
  WARN("not root: cases that change owners are skipped");
  return false;
}

}  // namespace

TEST_CASE("a path of directories root and the agent own resolves, through symlinks and ..",
          "[trusted_path]") {
  TempTree tree;
  const auto real = tree.dir("a/b", 0755);
  const auto file = tree.file("a/b/policy.yaml");
  std::filesystem::create_directory_symlink("a/b", tree.path("link"));
  std::filesystem::create_symlink("link/policy.yaml", tree.path("file-link"));

  const auto direct = resolve_trusted_path(file, ::geteuid());
  CHECK(direct.resolved == file);
  CHECK(S_ISREG(direct.st.st_mode));
  CHECK(resolve_trusted_path(tree.path("file-link"), ::geteuid()).resolved == file);
  // ".." after a symlink is the parent of where the link led (as the kernel resolves it).
  CHECK(resolve_trusted_path(tree.path("link/.././b//policy.yaml"), ::geteuid()).resolved == file);
  CHECK(resolve_trusted_path(tree.path("link"), ::geteuid()).resolved == real);
  CHECK(S_ISDIR(resolve_trusted_path(tree.path("link"), ::geteuid()).st.st_mode));

  SECTION("relative to the working directory") {
    const auto cwd = std::filesystem::current_path();
    std::filesystem::current_path(tree.path("a"));
    const auto relative = resolve_trusted_path("b/policy.yaml", ::geteuid());
    std::filesystem::current_path(cwd);
    CHECK(relative.resolved == file);
  }
}

TEST_CASE("what cannot be looked up is a system_error naming the component", "[trusted_path]") {
  TempTree tree;
  try {
    (void)resolve_trusted_path(tree.path("missing/policy.yaml"), ::geteuid());
    FAIL("resolved");
  } catch (const std::system_error& e) {
    CHECK(e.code() == std::errc::no_such_file_or_directory);
    CHECK_THAT(e.what(), Catch::StartsWith(tree.path("missing") + ": "));
  }
  std::filesystem::create_symlink("loop-b", tree.path("loop-a"));
  std::filesystem::create_symlink("loop-a", tree.path("loop-b"));
  try {
    (void)resolve_trusted_path(tree.path("loop-a"), ::geteuid());
    FAIL("resolved");
  } catch (const std::system_error& e) {
    CHECK(e.code() == std::errc::too_many_symbolic_link_levels);
  }
}

TEST_CASE("a directory on the way that group or others may write is refused, unless sticky",
          "[trusted_path]") {
  TempTree tree;
  const auto file = tree.file("dir/policy.yaml");
  const auto dir = tree.path("dir");

  REQUIRE(::chmod(dir.c_str(), 0775) == 0);
  CHECK_THAT(untrusted(file), Catch::StartsWith(dir + " is writable by group ") &&
                                  Catch::Contains("(mode 0775)") &&
                                  Catch::Contains("chmod g-w " + dir));
  REQUIRE(::chmod(dir.c_str(), 0777) == 0);
  CHECK_THAT(untrusted(file), Catch::StartsWith(dir + " is writable by others (mode 0777)") &&
                                  Catch::Contains("chmod go-w " + dir));
  // Sticky: others may add names, not move ours.
  REQUIRE(::chmod(dir.c_str(), 01777) == 0);
  CHECK(untrusted(file) == "trusted");
  // The object the path ends at is the caller's to judge.
  REQUIRE(::chmod(dir.c_str(), 0755) == 0);
  REQUIRE(::chmod(file.c_str(), 0666) == 0);
  CHECK(untrusted(file) == "trusted");
  const auto found = resolve_trusted_path(file, ::geteuid());
  const auto access = foreign_write_access(found.resolved, found.st);
  REQUIRE(access.has_value());
  CHECK(access->description == file + " is writable by others (mode 0666)");
  CHECK(access->fix == "chmod go-w " + file);
  REQUIRE(::chmod(file.c_str(), 0644) == 0);
  CHECK_FALSE(foreign_write_access(file, resolve_trusted_path(file, ::geteuid()).st));
}

TEST_CASE("a component another uid owns is refused: directory, symlink or file", "[trusted_path]") {
  if (!running_as_root()) return;
  TempTree tree;
  const auto file = tree.file("dir/policy.yaml");
  const auto dir = tree.path("dir");
  const auto owned_by_other = Catch::Contains(" is owned by uid " + std::to_string(kOtherUid));

  SECTION("the directory") {
    REQUIRE(::chown(dir.c_str(), kOtherUid, kOtherUid) == 0);
    CHECK_THAT(untrusted(file), Catch::StartsWith(dir) && owned_by_other);
  }
  SECTION("the file") {
    REQUIRE(::chown(file.c_str(), kOtherUid, kOtherUid) == 0);
    CHECK_THAT(untrusted(file), Catch::StartsWith(file) && owned_by_other);
  }
  SECTION("a symlink on the way, in a sticky directory where its owner may replace it") {
    const auto sticky = tree.dir("tmp", 01777);
    const auto link = sticky + "/link";
    std::filesystem::create_directory_symlink(dir, link);
    CHECK(untrusted(link + "/policy.yaml") == "trusted");
    REQUIRE(::lchown(link.c_str(), kOtherUid, kOtherUid) == 0);
    CHECK_THAT(untrusted(link + "/policy.yaml"), Catch::StartsWith(link) && owned_by_other);
  }
  SECTION("the agent's own uid may own them") {
    REQUIRE(::chown(dir.c_str(), kOtherUid, kOtherUid) == 0);
    REQUIRE(::chown(file.c_str(), kOtherUid, kOtherUid) == 0);
    CHECK(resolve_trusted_path(file, kOtherUid).resolved == file);
  }
}
