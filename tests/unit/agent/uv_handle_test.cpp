// uv::Handle<T>: init results checked, idempotent close, memory kept until the close callback.
#include "server/uv_handle.hpp"

#include <catch2/catch.hpp>
#include <memory>
#include <string>

namespace {

using hsm::agent::uv::Handle;

struct Loop {
  uv_loop_t loop{};
  Loop() { REQUIRE(uv_loop_init(&loop) == 0); }
  ~Loop() {
    uv_run(&loop, UV_RUN_DEFAULT);
    CHECK(uv_loop_close(&loop) == 0);  // every handle closed and called back
  }
};

}  // namespace

TEST_CASE("uv::Handle throws the init error and leaves nothing to close", "[uv_handle]") {
  Loop loop;
  try {
    Handle<uv_timer_t> failed(
        &loop.loop, [](uv_loop_t*, uv_timer_t*) { return UV_EINVAL; }, "uv_timer_init");
    FAIL("no exception");
  } catch (const hsm::agent::uv::Error& e) {
    CHECK(e.code() == UV_EINVAL);
    CHECK(std::string(e.what()).find("uv_timer_init") != std::string::npos);
  }
}

TEST_CASE("uv::Handle closes once, calls back after libuv is done, and closes when dropped",
          "[uv_handle]") {
  Loop loop;
  int closed = 0;
  Handle<uv_timer_t> timer(&loop.loop, uv_timer_init, "uv_timer_init");
  REQUIRE(timer);
  REQUIRE(uv_timer_start(
              timer.get(), [](uv_timer_t*) {}, 1000, 0) == 0);
  timer.close([&] { ++closed; });
  timer.close([&] { ++closed; });  // idempotent: ignored
  CHECK_FALSE(timer);
  CHECK(closed == 0);  // not before libuv's close callback
  uv_run(&loop.loop, UV_RUN_DEFAULT);
  CHECK(closed == 1);

  // A handle whose owner is gone before the loop runs again: still closed, memory freed there.
  {
    Handle<uv_async_t> async(
        &loop.loop, [](uv_loop_t* l, uv_async_t* a) { return uv_async_init(l, a, nullptr); },
        "uv_async_init");
  }
}

TEST_CASE("uv::Handle: dropping the owner from inside the close callback is safe", "[uv_handle]") {
  Loop loop;
  auto owner = std::make_unique<Handle<uv_check_t>>(&loop.loop, uv_check_init, "uv_check_init");
  owner->close([&] { owner.reset(); });
  uv_run(&loop.loop, UV_RUN_DEFAULT);
  CHECK(owner == nullptr);
}
