// hsm::Client against the fake agent: results, errors, pipelining and msgid matching, timeouts,
// lost connections, retries, reconnects, the pool, and the asynchronous forms.
#include "hsm/client.hpp"

#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <future>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "fake_agent.hpp"

namespace {

using hsm::protocol::ErrorCode;
using hsm::protocol::Method;
using hsm::test::FakeAgent;
using hsm::test::FakeConnection;
using namespace std::chrono_literals;

hsm::Bytes bytes_of(std::string_view text) {
  return hsm::Bytes(text.begin(), text.end());
}

hsm::ClientOptions options_for(const FakeAgent& agent, std::chrono::milliseconds timeout = 5000ms) {
  hsm::ClientOptions options;
  options.socket_path = agent.socket_path();
  options.timeout = timeout;
  return options;
}

/// Runs `call` and returns the hsm::Error it throws (fails the test when it does not throw).
template <class F>
hsm::Error error_of(F&& call) {
  try {
    call();
  } catch (const hsm::Error& error) {
    return error;
  }
  FAIL("expected an hsm::Error");
  throw std::logic_error("unreachable");
}

/// The error code `call` throws, or "ok"; usable off the test's thread (no Catch macros).
template <class F>
std::string code_of(F&& call) {
  try {
    call();
  } catch (const hsm::Error& error) {
    return error.code();
  }
  return "ok";
}

/// Waits (bounded) until the agent has received `n` requests of `method`.
bool wait_for_requests(const FakeAgent& agent, Method method, std::size_t n) {
  for (int i = 0; i < 5000; ++i) {
    if (agent.count(method) >= n) {
      return true;
    }
    std::this_thread::sleep_for(1ms);
  }
  return false;
}

const hsm::protocol::SignParams& sign_params(const hsm::protocol::Request& request) {
  return std::get<hsm::protocol::SignParams>(request.params);
}

std::string data_of(const hsm::protocol::Request& request) {
  const auto* data = std::get_if<hsm::protocol::Data>(&sign_params(request).input);
  return data != nullptr ? std::string(data->bytes.begin(), data->bytes.end()) : std::string();
}

/// A fake agent's handler that holds every request until the test answers it, by its sign
/// data, so a test decides the order (and the moment) in which answers arrive.
class Switchboard {
 public:
  hsm::test::Handler handler() {
    return [this](const std::shared_ptr<FakeConnection>& connection,
                  const hsm::protocol::Request& request) {
      std::lock_guard lock(mutex_);
      held_.push_back({connection, request});
      arrived_.notify_all();
    };
  }
  /// Waits (bounded) until `n` requests are held.
  bool wait_for(std::size_t n) {
    std::unique_lock lock(mutex_);
    return arrived_.wait_for(lock, 20s, [&] { return held_.size() >= n; });
  }
  /// Answers the held request signing `data` (false when there is none).
  bool answer(const std::string& data) {
    std::lock_guard lock(mutex_);
    for (auto it = held_.begin(); it != held_.end(); ++it) {
      if (data_of(it->request) == data) {
        it->connection->answer_result(it->request.msgid, hsm::test::default_result(it->request));
        held_.erase(it);
        return true;
      }
    }
    return false;
  }
  /// Answers every held request whose sign data starts with `prefix`, newest first.
  std::size_t answer_all(const std::string& prefix) {
    std::lock_guard lock(mutex_);
    std::size_t answered = 0;
    for (auto it = held_.rbegin(); it != held_.rend();) {
      if (data_of(it->request).rfind(prefix, 0) == 0) {
        it->connection->answer_result(it->request.msgid, hsm::test::default_result(it->request));
        it = std::make_reverse_iterator(held_.erase(std::next(it).base()));
        ++answered;
      } else {
        ++it;
      }
    }
    return answered;
  }

 private:
  struct Held {
    std::shared_ptr<FakeConnection> connection;
    hsm::protocol::Request request;
  };
  std::mutex mutex_;
  std::condition_variable arrived_;
  std::vector<Held> held_;
};

struct ThreadedSigning {
  int wrong = 0;   // answers that were not the caller's own
  int failed = 0;  // calls that threw
};

// `threads` threads each make `calls` signatures with sign(thread, call, message); the fake
// agent's signature of a message is the message itself, so a caller can tell its own answer.
template <typename Sign>
ThreadedSigning sign_from_threads(int threads, int calls, Sign sign) {
  std::atomic<int> wrong{0};
  std::atomic<int> failed{0};
  std::vector<std::thread> workers;
  for (int t = 0; t < threads; ++t) {
    workers.emplace_back([&, t] {
      for (int i = 0; i < calls; ++i) {
        const std::string message = std::to_string(t) + "/" + std::to_string(i);
        try {
          if (sign(t, i, message) != bytes_of(message)) ++wrong;
        } catch (const std::exception&) {
          ++failed;
        }
      }
    });
  }
  for (auto& worker : workers) worker.join();
  return {wrong.load(), failed.load()};
}

}  // namespace

TEST_CASE("every method sends its parameters and maps its result", "[client]") {
  FakeAgent agent;
  hsm::Client client(options_for(agent));

  const auto caps = client.capabilities();
  CHECK(caps.protocol == 1);
  CHECK(caps.agent_version == "fake-1.0");
  CHECK(caps.supported_algs == std::vector<std::string>{"ES256"});
  CHECK(caps.can_delete);
  CHECK_FALSE(caps.can_import);

  const auto health = client.health();
  CHECK(health.ok);
  CHECK(health.token.label == "token");
  CHECK(health.token.serial == "42");

  const auto generated = client.generate_key("new-key", std::string("ES256"));
  CHECK(generated.kid == "new-key");
  CHECK(generated.jwk.at("kid") == "new-key");

  CHECK(client.sign("k1", std::string_view("hello")) == bytes_of("hello"));
  const auto digest = hsm::Bytes(32, 0xAB);
  CHECK(client.sign_digest("k1", digest) == digest);
  const auto detailed = client.sign_detailed("k1", bytes_of("x"), hsm::SignOptions{"ES256", "der"});
  CHECK(detailed.kid == "k1");
  CHECK(detailed.alg == "ES256");

  CHECK(client.verify("k1", std::string_view("abc"), bytes_of("abc")));
  CHECK_FALSE(client.verify("k1", std::string_view("abc"), bytes_of("abd")));
  CHECK(client.verify_digest("k1", digest, digest));

  const auto key = client.get_public_key("k1");
  CHECK(key.kid == "k1");
  CHECK(key.spki == hsm::Bytes{0x30, 0x03, 0x02, 0x01, 0x00});

  const auto keys = client.list_keys();
  REQUIRE(keys.size() == 2);
  CHECK(keys[0].kid == "a");
  CHECK(keys[1].jwk.at("crv") == "P-256");
  CHECK(client.get_jwks().size() == 2);

  CHECK(client.delete_key("present"));
  CHECK_FALSE(client.delete_key("absent"));

  // What reached the agent.
  const auto requests = agent.requests();
  const auto& generate = std::get<hsm::protocol::GenerateKeyParams>(requests.at(2).params);
  CHECK(generate.kid == "new-key");
  CHECK(generate.alg == std::optional<std::string>("ES256"));
  CHECK_FALSE(generate.rsa_bits);
  const auto& signed_digest = sign_params(requests.at(4));
  CHECK(signed_digest.input == hsm::protocol::SignInput{hsm::protocol::Digest{digest}});
  CHECK(sign_params(requests.at(5)).format == hsm::protocol::SignatureFormat::kDer);
  CHECK(sign_params(requests.at(5)).alg == std::optional<std::string>("ES256"));
  for (const auto& request : requests) {
    // Every request carries what is left of its deadline, for the agent to drop stale work.
    REQUIRE(request.timeout_ms.has_value());
    CHECK(*request.timeout_ms <= 5000);
    CHECK(*request.timeout_ms > 0);
  }
  CHECK(agent.connections_accepted() == 1);
}

TEST_CASE("an unknown signature format is refused before anything is sent", "[client]") {
  FakeAgent agent;
  hsm::Client client(options_for(agent));
  const auto error = error_of([&] {
    (void)client.sign_detailed("k", bytes_of("x"), hsm::SignOptions{std::nullopt, "pem"});
  });
  CHECK(error.code() == hsm::kInvalidParams);
  CHECK(agent.requests().empty());
}

TEST_CASE("agent errors are thrown as hsm::Error with code and message and ckr", "[client]") {
  FakeAgent agent(
      [](const std::shared_ptr<FakeConnection>& connection, const hsm::protocol::Request& request) {
        if (request.method == Method::kSign) {
          connection->answer_error(request.msgid, ErrorCode::kHsmError, "C_Sign failed",
                                   "CKR_DEVICE_ERROR");
        } else {
          connection->answer_error(request.msgid, ErrorCode::kNotFound, "no key named 'nope'");
        }
      });
  hsm::Client client(options_for(agent));

  const auto hsm_error = error_of([&] { (void)client.sign("k", std::string_view("x")); });
  CHECK(hsm_error.code() == "hsm_error");
  CHECK(hsm_error.message() == "C_Sign failed");
  CHECK(hsm_error.ckr() == std::optional<std::string>("CKR_DEVICE_ERROR"));
  CHECK(std::string(hsm_error.what()).find("CKR_DEVICE_ERROR") != std::string::npos);
  CHECK(agent.count(Method::kSign) == 1);  // hsm_error is an answer, not a transient failure

  const auto not_found = error_of([&] { (void)client.get_public_key("nope"); });
  CHECK(not_found.code() == "not_found");
  CHECK_FALSE(not_found.ckr().has_value());
}

TEST_CASE("answers that come out of order are matched to their calls by msgid", "[client]") {
  constexpr std::size_t kCalls = 16;
  struct Held {
    std::mutex mutex;
    std::vector<std::pair<std::shared_ptr<FakeConnection>, hsm::protocol::Request>> requests;
  };
  auto held = std::make_shared<Held>();
  // Holds every answer until all calls are in flight, then answers the last one first.
  FakeAgent agent([held](const std::shared_ptr<FakeConnection>& connection,
                         const hsm::protocol::Request& request) {
    std::lock_guard lock(held->mutex);
    held->requests.emplace_back(connection, request);
    if (held->requests.size() < kCalls) {
      return;
    }
    for (auto it = held->requests.rbegin(); it != held->requests.rend(); ++it) {
      it->first->answer_result(it->second.msgid, hsm::test::default_result(it->second));
    }
    held->requests.clear();
  });
  hsm::Client client(options_for(agent));

  SECTION("asynchronous calls from one thread") {
    std::vector<std::future<hsm::Signature>> futures;
    for (std::size_t i = 0; i < kCalls; ++i) {
      futures.push_back(client.sign_async("k", bytes_of("message-" + std::to_string(i))));
    }
    for (std::size_t i = 0; i < kCalls; ++i) {
      CHECK(futures[i].get().signature == bytes_of("message-" + std::to_string(i)));
    }
  }
  SECTION("synchronous calls from many threads") {
    std::vector<hsm::Bytes> results(kCalls);
    std::vector<std::thread> threads;
    for (std::size_t i = 0; i < kCalls; ++i) {
      threads.emplace_back([&, i] {
        results[i] = client.sign("k", std::string_view("thread-" + std::to_string(i)));
      });
    }
    for (auto& thread : threads) {
      thread.join();
    }
    for (std::size_t i = 0; i < kCalls; ++i) {
      CHECK(results[i] == bytes_of("thread-" + std::to_string(i)));
    }
  }
  CHECK(agent.connections_accepted() == 1);  // all pipelined on one connection
}

TEST_CASE("many threads share one client and one connection", "[client]") {
  FakeAgent agent;
  hsm::Client client(options_for(agent));
  constexpr int kThreads = 16;
  constexpr int kCallsPerThread = 200;
  const auto [wrong, failed] = sign_from_threads(
      kThreads, kCallsPerThread, [&](int /*thread*/, int call, const std::string& message) {
        if (call % 2 == 0) return client.sign("k", std::string_view(message));
        // half of them through the asynchronous form
        return client.sign_async("k", bytes_of(message)).get().signature;
      });
  CHECK(wrong == 0);
  CHECK(failed == 0);
  CHECK(agent.count(Method::kSign) == std::size_t{kThreads * kCallsPerThread});
  CHECK(agent.connections_accepted() == 1);
}

// Calls of every kind pipelined on one connection: a synchronous call sent first, the others
// while it waits. Every call gets its own answer, callbacks on a client thread, however the
// first call ends (answered, timed out, or the agent gone).
TEST_CASE("a synchronous call and the calls sent while it waits each get their own answer",
          "[client][pipelined]") {
  Switchboard board;
  FakeAgent agent(board.handler());
  auto options = options_for(agent, 30'000ms);  // a hang would end in timeout, not in a value
  options.retry.max_attempts = 1;
  hsm::Client client(options);

  // The first call goes out first, alone on the connection; the others are sent while
  // it waits for its answer (the pause only makes that likely; every check holds either way).
  std::thread::id leader_thread;
  auto leader = std::async(std::launch::async, [&] {
    leader_thread = std::this_thread::get_id();
    return client.sign("k", std::string_view("leader"));
  });
  REQUIRE(board.wait_for(1));
  std::this_thread::sleep_for(50ms);

  std::vector<std::future<hsm::Signature>> futures;
  for (int i = 0; i < 4; ++i) {
    futures.push_back(client.sign_async("k", bytes_of("async-" + std::to_string(i))));
  }
  std::promise<std::pair<std::thread::id, hsm::Bytes>> callback;
  client.sign_async("k", bytes_of("async-callback"), [&](hsm::Outcome<hsm::Signature> outcome) {
    callback.set_value(
        {std::this_thread::get_id(), outcome.ok() ? outcome.value().signature : hsm::Bytes{}});
  });
  std::vector<std::thread::id> follower_threads(3);
  std::vector<std::future<hsm::Bytes>> followers;
  for (std::size_t i = 0; i < follower_threads.size(); ++i) {
    followers.push_back(std::async(std::launch::async, [&, i] {
      follower_threads[i] = std::this_thread::get_id();
      return client.sign("k", std::string_view("sync-" + std::to_string(i)));
    }));
  }
  REQUIRE(board.wait_for(1 + 4 + 1 + 3));

  SECTION("answers before the leader's own") {
    CHECK(board.answer_all("async-") == 5);
    CHECK(board.answer_all("sync-") == 3);
    CHECK(board.answer("leader"));
  }
  SECTION("answers after the leader's own: someone still reads them") {
    CHECK(board.answer("leader"));
    CHECK(leader.get() == bytes_of("leader"));
    std::this_thread::sleep_for(20ms);  // the first call is done (not needed for the checks)
    CHECK(board.answer_all("sync-") == 3);
    CHECK(board.answer_all("async-") == 5);
  }
  if (leader.valid()) {
    CHECK(leader.get() == bytes_of("leader"));
  }
  for (int i = 0; i < 4; ++i) {
    CHECK(futures[static_cast<std::size_t>(i)].get().signature ==
          bytes_of("async-" + std::to_string(i)));
  }
  for (std::size_t i = 0; i < followers.size(); ++i) {
    CHECK(followers[i].get() == bytes_of("sync-" + std::to_string(i)));
  }
  auto [thread, signature] = callback.get_future().get();
  CHECK(signature == bytes_of("async-callback"));
  // A callback never runs on a thread that made a call, even one that read its answer.
  CHECK(thread != leader_thread);
  CHECK(thread != std::this_thread::get_id());
  for (const auto& follower : follower_threads) {
    CHECK(thread != follower);
  }
  CHECK(agent.connections_accepted() == 1);
}

TEST_CASE("a synchronous call that times out leaves the other calls on its connection answered",
          "[client][pipelined]") {
  Switchboard board;
  FakeAgent agent(board.handler());
  // The asynchronous calls start a second after the synchronous one, so their deadlines are a
  // second after its own: they are answered in that second.
  hsm::Client client(options_for(agent, 2000ms));

  std::vector<std::future<hsm::Signature>> futures;
  std::promise<std::string> callback;
  std::thread others([&] {
    (void)board.wait_for(1);
    std::this_thread::sleep_for(1000ms);
    for (int i = 0; i < 4; ++i) {
      futures.push_back(client.sign_async("k", bytes_of("async-" + std::to_string(i))));
    }
    client.sign_async("k", bytes_of("async-callback"), [&](hsm::Outcome<hsm::Signature> outcome) {
      callback.set_value(outcome.ok() ? "ok" : outcome.error().code());
    });
  });
  CHECK(error_of([&] { (void)client.sign("k", std::string_view("slow")); }).code() ==
        hsm::kTimeout);
  others.join();
  REQUIRE(board.wait_for(6));
  CHECK(board.answer("slow"));  // late: dropped
  CHECK(board.answer_all("async-") == 5);
  for (int i = 0; i < 4; ++i) {
    CHECK(futures[static_cast<std::size_t>(i)].get().signature ==
          bytes_of("async-" + std::to_string(i)));
  }
  CHECK(callback.get_future().get() == "ok");

  // The connection is still in order, and the next synchronous caller reads for itself again.
  std::thread answer([&] {
    (void)board.wait_for(1);
    (void)board.answer("after");
  });
  CHECK(client.sign("k", std::string_view("after")) == bytes_of("after"));
  answer.join();
  CHECK(agent.connections_accepted() == 1);
}

TEST_CASE("the agent going away while a synchronous call waits fails every pending call",
          "[client][pipelined]") {
  Switchboard board;
  FakeAgent agent(board.handler());
  auto options = options_for(agent, 30'000ms);  // a call left hanging would report timeout
  options.retry.max_attempts = 1;
  hsm::Client client(options);

  auto leader = std::async(std::launch::async, [&] {
    return code_of([&] { (void)client.sign("k", std::string_view("leader")); });
  });
  REQUIRE(board.wait_for(1));
  std::this_thread::sleep_for(50ms);
  std::vector<std::future<hsm::Signature>> futures;
  for (int i = 0; i < 4; ++i) {
    futures.push_back(client.sign_async("k", bytes_of("async-" + std::to_string(i))));
  }
  std::vector<std::future<std::string>> followers;
  for (int i = 0; i < 3; ++i) {
    followers.push_back(std::async(std::launch::async, [&, i] {
      return code_of(
          [&] { (void)client.sign("k", std::string_view("sync-" + std::to_string(i))); });
    }));
  }
  REQUIRE(board.wait_for(1 + 4 + 3));
  agent.stop();

  CHECK(leader.get() == hsm::kConnectionFailed);
  for (auto& follower : followers) {
    CHECK(follower.get() == hsm::kConnectionFailed);
  }
  for (auto& future : futures) {
    CHECK(error_of([&] { (void)future.get(); }).code() == hsm::kConnectionFailed);
  }
}

TEST_CASE("synchronous and asynchronous calls on one connection, answers shuffled",
          "[client][pipelined]") {
  // The agent answers in batches, newest first, from its own thread: the calls that read for
  // others keep changing, and the read side keeps passing between callers and the reader thread.
  struct Shuffler {
    std::mutex mutex;
    std::condition_variable arrived;
    std::vector<std::pair<std::shared_ptr<FakeConnection>, hsm::protocol::Request>> held;
    bool stop = false;
  };
  auto shuffler = std::make_shared<Shuffler>();
  FakeAgent agent([shuffler](const std::shared_ptr<FakeConnection>& connection,
                             const hsm::protocol::Request& request) {
    std::lock_guard lock(shuffler->mutex);
    shuffler->held.emplace_back(connection, request);
    shuffler->arrived.notify_one();
  });
  std::thread answering([shuffler] {
    std::unique_lock lock(shuffler->mutex);
    for (;;) {
      shuffler->arrived.wait(lock, [&] { return shuffler->stop || !shuffler->held.empty(); });
      if (shuffler->stop) {
        return;
      }
      auto batch = std::move(shuffler->held);
      shuffler->held.clear();
      lock.unlock();
      std::this_thread::sleep_for(200us);  // let more requests queue up behind this batch
      for (auto it = batch.rbegin(); it != batch.rend(); ++it) {
        it->first->answer_result(it->second.msgid, hsm::test::default_result(it->second));
      }
      lock.lock();
    }
  });

  hsm::Client client(options_for(agent, 30'000ms));
  constexpr int kThreads = 8;
  constexpr int kCallsPerThread = 150;
  const auto [wrong, failed] = sign_from_threads(
      kThreads, kCallsPerThread, [&](int thread, int call, const std::string& message) {
        switch ((thread + call) % 3) {
          case 0:
            return client.sign("k", std::string_view(message));
          case 1:
            return client.sign_async("k", bytes_of(message)).get().signature;
          default: {
            // A callback call in flight while this thread makes a synchronous one.
            std::promise<hsm::Bytes> done;
            client.sign_async(
                "k", bytes_of(message + "/cb"), [&done](hsm::Outcome<hsm::Signature> outcome) {
                  done.set_value(outcome.ok() ? outcome.value().signature : hsm::Bytes{});
                });
            auto signature = client.sign("k", std::string_view(message));
            // A callback that got another call's answer makes this one count as wrong.
            if (done.get_future().get() != bytes_of(message + "/cb")) signature.clear();
            return signature;
          }
        }
      });
  {
    std::lock_guard lock(shuffler->mutex);
    shuffler->stop = true;
  }
  shuffler->arrived.notify_one();
  answering.join();
  CHECK(wrong == 0);
  CHECK(failed == 0);
  CHECK(agent.connections_accepted() == 1);
}

TEST_CASE("synchronous, future and callback calls alternate on one connection",
          "[client][pipelined]") {
  FakeAgent agent;
  hsm::Client client(options_for(agent, 30'000ms));
  for (int i = 0; i < 200; ++i) {
    const std::string n = std::to_string(i);
    CHECK(client.sign_async("k", bytes_of("future-" + n)).get().signature ==
          bytes_of("future-" + n));
    CHECK(client.sign("k", std::string_view("sync-" + n)) == bytes_of("sync-" + n));
    std::promise<hsm::Bytes> callback;
    client.sign_async("k", bytes_of("callback-" + n), [&](hsm::Outcome<hsm::Signature> outcome) {
      callback.set_value(outcome.ok() ? outcome.value().signature : hsm::Bytes{});
    });
    CHECK(client.sign("k", std::string_view("after-callback-" + n)) ==
          bytes_of("after-callback-" + n));
    CHECK(callback.get_future().get() == bytes_of("callback-" + n));
  }
  CHECK(agent.connections_accepted() == 1);
}

TEST_CASE("a pool of connections spreads the calls", "[client]") {
  FakeAgent agent;
  auto options = options_for(agent);
  options.connections = 3;
  hsm::Client client(options);
  for (int i = 0; i < 12; ++i) {
    CHECK(client.sign("k", std::string_view("m")) == bytes_of("m"));
  }
  CHECK(agent.connections_accepted() == 3);
}

TEST_CASE("a call the agent never answers times out and its late answer is dropped", "[client]") {
  struct Stalled {
    std::mutex mutex;
    std::shared_ptr<FakeConnection> connection;
    std::uint32_t msgid = 0;
  };
  auto stalled = std::make_shared<Stalled>();
  FakeAgent agent([stalled](const std::shared_ptr<FakeConnection>& connection,
                            const hsm::protocol::Request& request) {
    std::lock_guard lock(stalled->mutex);
    if (data_of(request) == "slow") {  // never answered in time
      stalled->connection = connection;
      stalled->msgid = request.msgid;
      return;
    }
    if (stalled->connection) {  // the stale answer arrives first, then the right one
      stalled->connection->answer_result(stalled->msgid,
                                         hsm::protocol::SignResult{"k", "ES256", bytes_of("slow")});
      stalled->connection.reset();
    }
    connection->answer_result(request.msgid, hsm::test::default_result(request));
  });
  // Long enough for the second call to be answered in time on a loaded machine.
  hsm::Client client(options_for(agent, 1000ms));

  const auto started = std::chrono::steady_clock::now();
  const auto error = error_of([&] { (void)client.sign("k", std::string_view("slow")); });
  CHECK(error.code() == hsm::kTimeout);
  CHECK(std::chrono::steady_clock::now() - started >= 1000ms);  // not before its deadline
  CHECK(agent.count(Method::kSign) == 1);                       // a timeout is not retried

  CHECK(client.sign("k", std::string_view("fast")) == bytes_of("fast"));
}

TEST_CASE("an asynchronous call the agent never answers fails at its deadline", "[client]") {
  FakeAgent agent([](const std::shared_ptr<FakeConnection>&, const hsm::protocol::Request&) {});
  hsm::Client client(options_for(agent, 150ms));
  auto future = client.sign_async("k", bytes_of("x"));
  const auto error = error_of([&] { (void)future.get(); });
  CHECK(error.code() == hsm::kTimeout);

  std::promise<std::string> code;
  client.health_async([&](hsm::Outcome<hsm::Health> outcome) {
    code.set_value(outcome.ok() ? "ok" : outcome.error().code());
  });
  CHECK(code.get_future().get() == hsm::kTimeout);
}

TEST_CASE("the agent hanging up fails pending calls with connection_failed", "[client]") {
  FakeAgent agent([](const std::shared_ptr<FakeConnection>& connection,
                     const hsm::protocol::Request&) { connection->close(); });

  SECTION("without retries") {
    auto options = options_for(agent);
    options.retry.max_attempts = 1;
    hsm::Client client(options);
    const auto error = error_of([&] { (void)client.sign("k", std::string_view("x")); });
    CHECK(error.code() == hsm::kConnectionFailed);
    CHECK(agent.count(Method::kSign) == 1);
  }
  SECTION("generate_key is never sent twice, whatever the retry policy") {
    hsm::Client client(options_for(agent));
    const auto error = error_of([&] { (void)client.generate_key("new", std::nullopt); });
    CHECK(error.code() == hsm::kConnectionFailed);
    CHECK(agent.count(Method::kGenerateKey) == 1);
  }
  SECTION("delete_key is never sent twice either") {
    hsm::Client client(options_for(agent));
    CHECK(error_of([&] { (void)client.delete_key("k"); }).code() == hsm::kConnectionFailed);
    CHECK(agent.count(Method::kDeleteKey) == 1);
  }
  SECTION("every call pending on the connection fails, none hangs") {
    auto options = options_for(agent);
    options.retry.max_attempts = 1;
    hsm::Client client(options);
    std::vector<std::future<hsm::Signature>> futures;
    for (int i = 0; i < 8; ++i) {
      futures.push_back(client.sign_async("k", bytes_of("x")));
    }
    for (auto& future : futures) {
      CHECK(error_of([&] { (void)future.get(); }).code() == hsm::kConnectionFailed);
    }
  }
}

TEST_CASE("idempotent calls are retried after transient failures", "[client]") {
  std::atomic<int> seen{0};
  FakeAgent agent([&seen](const std::shared_ptr<FakeConnection>& connection,
                          const hsm::protocol::Request& request) {
    switch (seen++) {
      case 0:
        connection->answer_error(request.msgid, ErrorCode::kHsmUnavailable, "token removed",
                                 "CKR_TOKEN_NOT_PRESENT");
        return;
      case 1:
        connection->answer_error(request.msgid, ErrorCode::kOverloaded, "queue full");
        return;
      case 2:
        connection->answer_error(request.msgid, ErrorCode::kAuditUnavailable, "disk full");
        return;
      case 3:
        connection->close();  // the answer is lost with the connection
        return;
      default:
        connection->answer_result(request.msgid, hsm::test::default_result(request));
    }
  });
  hsm::Client client(options_for(agent));

  SECTION("sign") {
    CHECK(client.sign("k", std::string_view("m")) == bytes_of("m"));
    CHECK(agent.count(Method::kSign) == 5);
    CHECK(agent.connections_accepted() == 2);
  }
  SECTION("but not generate_key") {
    const auto error = error_of([&] { (void)client.generate_key("new", std::nullopt); });
    CHECK(error.code() == "hsm_unavailable");
    CHECK(agent.count(Method::kGenerateKey) == 1);
  }
}

TEST_CASE("retries stop at max_attempts and report the last error", "[client]") {
  FakeAgent agent(
      [](const std::shared_ptr<FakeConnection>& connection, const hsm::protocol::Request& request) {
        connection->answer_error(request.msgid, ErrorCode::kHsmUnavailable, "still down");
      });
  auto options = options_for(agent);
  options.retry.max_attempts = 3;
  hsm::Client client(options);
  CHECK(error_of([&] { (void)client.health(); }).code() == "hsm_unavailable");
  CHECK(agent.count(Method::kHealth) == 3);
}

TEST_CASE("the client reconnects after the agent restarts", "[client]") {
  FakeAgent agent;

  SECTION("on demand, without retries") {
    auto options = options_for(agent);
    options.retry.max_attempts = 1;
    hsm::Client client(options);
    CHECK(client.sign("k", std::string_view("before")) == bytes_of("before"));
    agent.stop();
    agent.start();
    CHECK(client.sign("k", std::string_view("after")) == bytes_of("after"));
    CHECK(agent.connections_accepted() == 2);
  }
  SECTION("a call made right after the restart races the hang-up: it goes out again, unharmed") {
    // The connection's reader thread may notice the hang-up while the call is writing its
    // request: the call must still learn that nothing of it left, and go out again on a fresh
    // connection (no retry allowed here). This raced on one restart in twenty before.
    auto options = options_for(agent);
    options.retry.max_attempts = 1;
    hsm::Client client(options);
    constexpr int kRestarts = 60;
    int signed_after_restart = 0;
    for (int i = 0; i < kRestarts; ++i) {
      agent.stop();
      agent.start();
      const std::string message = "after restart " + std::to_string(i);
      try {
        signed_after_restart += client.sign("k", std::string_view(message)) == bytes_of(message);
      } catch (const hsm::Error& error) {
        UNSCOPED_INFO("restart " << i << ": " << error.what());
      }
    }
    CHECK(signed_after_restart == kRestarts);
    CHECK(agent.connections_accepted() == kRestarts);
  }
  SECTION("calls fail with connection_failed while it is away, and work once it is back") {
    auto options = options_for(agent, 2000ms);
    options.retry.max_backoff = 20ms;
    hsm::Client client(options);
    CHECK(client.sign("k", std::string_view("before")) == bytes_of("before"));
    agent.stop();
    CHECK(error_of([&] { (void)client.sign("k", std::string_view("x")); }).code() ==
          hsm::kConnectionFailed);
    agent.start();
    CHECK(client.sign("k", std::string_view("after")) == bytes_of("after"));
  }
  SECTION("a call made while it is away completes when it comes back within the deadline") {
    hsm::Client client(options_for(agent, 10'000ms));
    CHECK(client.sign("k", std::string_view("before")) == bytes_of("before"));
    agent.stop();
    std::thread restart([&] {
      std::this_thread::sleep_for(200ms);
      agent.start();
    });
    CHECK(client.sign("k", std::string_view("during")) == bytes_of("during"));
    restart.join();
  }
}

TEST_CASE("no agent at all: connection_failed", "[client]") {
  hsm::ClientOptions options;
  options.socket_path = "/nonexistent/hsm-agent.sock";
  options.retry.max_attempts = 1;
  hsm::Client client(options);
  const auto error = error_of([&] { (void)client.health(); });
  CHECK(error.code() == hsm::kConnectionFailed);
  CHECK(error.message().find("/nonexistent/hsm-agent.sock") != std::string::npos);

  options.socket_path = std::string(200, 'x');  // longer than sun_path
  hsm::Client too_long(options);
  CHECK(error_of([&] { (void)too_long.health(); }).code() == hsm::kConnectionFailed);
}

TEST_CASE("bytes that break the protocol fail the calls with protocol_error", "[client]") {
  SECTION("not MessagePack: the connection is dropped") {
    FakeAgent agent([](const std::shared_ptr<FakeConnection>& connection,
                       const hsm::protocol::Request&) { connection->send_raw("\xc1"); });
    hsm::Client client(options_for(agent));
    CHECK(error_of([&] { (void)client.health(); }).code() == hsm::kProtocolError);
  }
  SECTION("a well-framed answer of the wrong shape fails that call only") {
    FakeAgent agent([](const std::shared_ptr<FakeConnection>& connection,
                       const hsm::protocol::Request& request) {
      if (request.method == Method::kSign) {  // a verify result for a sign request
        connection->answer_result(request.msgid, hsm::protocol::VerifyResult{true});
      } else {
        connection->answer_result(request.msgid, hsm::test::default_result(request));
      }
    });
    hsm::Client client(options_for(agent));
    CHECK(error_of([&] { (void)client.sign("k", std::string_view("x")); }).code() ==
          hsm::kProtocolError);
    CHECK(client.health().ok);
    CHECK(agent.connections_accepted() == 1);
  }
  SECTION("an answer larger than max_response_bytes") {
    FakeAgent agent;
    auto options = options_for(agent);
    options.max_response_bytes = 256;
    hsm::Client client(options);
    const auto error = error_of([&] { (void)client.sign("k", hsm::Bytes(1000, 0x42)); });
    CHECK(error.code() == hsm::kProtocolError);
  }
}

TEST_CASE("a request larger than the agent accepts is refused without being sent", "[client]") {
  FakeAgent agent;
  auto options = options_for(agent);
  options.max_request_bytes = 512;
  hsm::Client client(options);
  CHECK(error_of([&] { (void)client.sign("k", hsm::Bytes(1000, 0x42)); }).code() ==
        hsm::kInvalidParams);
  CHECK(agent.count(Method::kSign) == 0);
  CHECK(client.sign("k", std::string_view("small")) == bytes_of("small"));  // still connected
}

TEST_CASE("callbacks run once on a client thread", "[client]") {
  const auto caller = std::this_thread::get_id();

  SECTION("with the value") {
    FakeAgent agent;
    hsm::Client client(options_for(agent));
    std::promise<std::pair<std::thread::id, hsm::Bytes>> result;
    client.sign_async("k", bytes_of("cb"), [&](hsm::Outcome<hsm::Signature> outcome) {
      const hsm::Signature& signature = outcome.value();
      result.set_value({std::this_thread::get_id(), signature.signature});
    });
    auto [thread, signature] = result.get_future().get();
    CHECK(signature == bytes_of("cb"));
    CHECK(thread != caller);
  }
  SECTION("with the error, even when it is known before anything is sent") {
    hsm::ClientOptions options;
    options.socket_path = "/nonexistent/hsm-agent.sock";
    options.retry.max_attempts = 1;
    hsm::Client client(options);
    std::promise<std::pair<std::thread::id, std::string>> result;
    client.list_keys_async([&](hsm::Outcome<std::vector<hsm::KeyInfo>> outcome) {
      CHECK_THROWS_AS(outcome.value(), hsm::Error);
      result.set_value({std::this_thread::get_id(), outcome.error().code()});
    });
    auto [thread, code] = result.get_future().get();
    CHECK(code == hsm::kConnectionFailed);
    CHECK(thread != caller);
  }
}

TEST_CASE("every asynchronous form delivers its result", "[client]") {
  FakeAgent agent;
  hsm::Client client(options_for(agent));
  const auto digest = hsm::Bytes(32, 1);
  CHECK(client.capabilities_async().get().default_alg == "ES256");
  CHECK(client.health_async().get().ok);
  CHECK(client.generate_key_async("g").get().kid == "g");
  CHECK(client.sign_digest_async("k", digest).get().signature == digest);
  CHECK(client.verify_async("k", bytes_of("a"), bytes_of("a")).get());
  CHECK_FALSE(client.verify_digest_async("k", digest, bytes_of("a")).get());
  CHECK(client.get_public_key_async("k").get().kid == "k");
  CHECK(client.list_keys_async().get().size() == 2);
  CHECK(client.get_jwks_async().get().size() == 2);
  CHECK(client.delete_key_async("present").get());

  std::promise<bool> deleted;
  client.delete_key_async("absent",
                          [&](hsm::Outcome<bool> outcome) { deleted.set_value(outcome.value()); });
  CHECK_FALSE(deleted.get_future().get());
}

TEST_CASE("destroying the client completes what is still pending", "[client]") {
  FakeAgent agent([](const std::shared_ptr<FakeConnection>&, const hsm::protocol::Request&) {});
  std::future<hsm::Signature> future;
  std::promise<std::string> callback_code;
  {
    hsm::Client client(options_for(agent, 60'000ms));
    future = client.sign_async("k", bytes_of("x"));
    client.sign_async("k", bytes_of("y"), [&](hsm::Outcome<hsm::Signature> outcome) {
      callback_code.set_value(outcome.ok() ? "ok" : outcome.error().code());
    });
    REQUIRE(wait_for_requests(agent, Method::kSign, 2));
  }
  CHECK(error_of([&] { (void)future.get(); }).code() == hsm::kConnectionFailed);
  CHECK(callback_code.get_future().get() == hsm::kConnectionFailed);
}

TEST_CASE("a moved-from client refuses calls and the moved-to one works", "[client]") {
  FakeAgent agent;
  hsm::Client first(options_for(agent));
  hsm::Client second(std::move(first));
  CHECK(second.health().ok);
  CHECK_THROWS_AS(first.health(), std::logic_error);  // NOLINT(bugprone-use-after-move)
}

TEST_CASE("default_socket_path honours HSM_AGENT_SOCKET", "[client]") {
  const char* saved = std::getenv("HSM_AGENT_SOCKET");
  const std::optional<std::string> previous =
      saved ? std::optional<std::string>(saved) : std::nullopt;
  ::setenv("HSM_AGENT_SOCKET", "/tmp/custom.sock", 1);
  CHECK(hsm::default_socket_path() == "/tmp/custom.sock");
  CHECK(hsm::ClientOptions{}.socket_path == "/tmp/custom.sock");
  ::unsetenv("HSM_AGENT_SOCKET");
  CHECK(hsm::default_socket_path() == "/run/hsm-agent/agent.sock");
  if (previous) {
    ::setenv("HSM_AGENT_SOCKET", previous->c_str(), 1);
  }
}

TEST_CASE("latency mode: busy_poll is bounded, read from HSM_CLIENT_BUSY_POLL_US when unset",
          "[client][busy_poll]") {
  FakeAgent agent;
  const char* saved = std::getenv("HSM_CLIENT_BUSY_POLL_US");
  const std::optional<std::string> previous =
      saved ? std::optional<std::string>(saved) : std::nullopt;
  auto options = options_for(agent);

  SECTION("the option beyond kMaxBusyPoll, or negative, is refused") {
    options.busy_poll = hsm::ClientOptions::kMaxBusyPoll + 1us;
    const auto too_long = error_of([&] { hsm::Client client(options); });
    CHECK(too_long.errc() == hsm::Errc::kInvalidParams);
    CHECK_THAT(too_long.message(), Catch::Contains("between 0 and 1000 us, not 1001"));
    options.busy_poll = -1us;
    CHECK(error_of([&] { hsm::Client client(options); }).errc() == hsm::Errc::kInvalidParams);
  }
  SECTION("a set option wins over the environment") {
    ::setenv("HSM_CLIENT_BUSY_POLL_US", "not a number", 1);
    options.busy_poll = 200us;
    hsm::Client client(options);
    CHECK(client.options().busy_poll == 200us);
    CHECK(client.sign("k", std::string_view("polled")) == bytes_of("polled"));
  }
  SECTION("unset, the environment decides") {
    ::setenv("HSM_CLIENT_BUSY_POLL_US", "50", 1);
    hsm::Client client(options);
    CHECK(client.options().busy_poll == 50us);
    for (int i = 0; i < 20; ++i) {
      const std::string data = "polled-" + std::to_string(i);
      CHECK(client.sign("k", std::string_view(data)) == bytes_of(data));
    }
  }
  SECTION("a bad environment value is refused and named") {
    for (const char* bad : {"fifty", "50us", "-5", "5000", "99999999999999999999999"}) {
      ::setenv("HSM_CLIENT_BUSY_POLL_US", bad, 1);
      const auto error = error_of([&] { hsm::Client client(options); });
      CHECK(error.errc() == hsm::Errc::kInvalidParams);
      CHECK_THAT(error.message(), Catch::Contains("HSM_CLIENT_BUSY_POLL_US"));
    }
  }
  SECTION("unset everywhere, latency mode is off") {
    ::unsetenv("HSM_CLIENT_BUSY_POLL_US");
    hsm::Client client(options);
    CHECK(client.options().busy_poll == 0us);
  }
  if (previous) {
    ::setenv("HSM_CLIENT_BUSY_POLL_US", previous->c_str(), 1);
  } else {
    ::unsetenv("HSM_CLIENT_BUSY_POLL_US");
  }
}

TEST_CASE("an agent that stops reading cannot block a call past its deadline", "[client]") {
  // A listener that never accepts: connect() succeeds (the backlog), writes fill the socket
  // buffer and then block.
  std::string directory = "/tmp/hsm-client-test-XXXXXX";
  REQUIRE(::mkdtemp(directory.data()) != nullptr);
  const std::string path = directory + "/silent.sock";
  const int listener = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  REQUIRE(listener >= 0);
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  std::memcpy(address.sun_path, path.c_str(), path.size() + 1);
  // NOLINTNEXTLINE(cppcoreguidelines-pro-type-reinterpret-cast): the sockets API
  REQUIRE(::bind(listener, reinterpret_cast<const sockaddr*>(&address), sizeof(address)) == 0);
  REQUIRE(::listen(listener, 8) == 0);

  hsm::ClientOptions options;
  options.socket_path = path;
  options.timeout = 300ms;
  options.max_request_bytes = 64 * 1024 * 1024;
  {
    hsm::Client client(options);
    const hsm::Bytes big(8 * 1024 * 1024, 0x55);  // far more than a socket buffer holds
    CHECK(error_of([&] { (void)client.sign("k", big); }).code() == hsm::kTimeout);
    // Small calls queue behind nothing: the cut connection was dropped, a new one is opened,
    // and the call times out on its own deadline.
    CHECK(error_of([&] { (void)client.health(); }).code() == hsm::kTimeout);
  }
  ::close(listener);
  ::unlink(path.c_str());
  ::rmdir(directory.c_str());
}

// ---- Per-call options: deadline and cancellation ------------------------------------------------

TEST_CASE("a call's own timeout or deadline ends it with kTimeout, in every form",
          "[client][call]") {
  Switchboard board;  // holds every request: nothing is answered
  FakeAgent agent(board.handler());
  hsm::Client client(options_for(agent, 30'000ms));
  const hsm::CallOptions short_timeout{.timeout = 50ms};

  const auto started = std::chrono::steady_clock::now();
  CHECK(error_of([&] { (void)client.sign("k", std::string_view("sync"), short_timeout); }).errc() ==
        hsm::Errc::kTimeout);
  CHECK(std::chrono::steady_clock::now() - started < 20s);  // not the client's 30 s

  auto future = client.sign_async("k", bytes_of("future"), {},
                                  {.deadline = std::chrono::steady_clock::now() + 50ms});
  CHECK(error_of([&] { (void)future.get(); }).errc() == hsm::Errc::kTimeout);

  std::promise<hsm::Errc> callback;
  client.health_async(
      [&](hsm::Outcome<hsm::Health> outcome) {
        callback.set_value(outcome ? hsm::Errc::kUnknown : outcome.error().errc());
      },
      short_timeout);
  CHECK(callback.get_future().get() == hsm::Errc::kTimeout);

  // With both, the earlier one counts; the request carries the time left.
  CHECK(error_of([&] {
          (void)client.sign(
              "k", std::string_view("both"),
              {.timeout = 60'000ms, .deadline = std::chrono::steady_clock::now() + 50ms});
        }).errc() == hsm::Errc::kTimeout);
  for (const auto& request : agent.requests()) {
    CHECK(request.timeout_ms <= 60u);
  }
}

TEST_CASE("a cancelled call completes with kCancelled and its late answer is dropped",
          "[client][call]") {
  Switchboard board;
  FakeAgent agent(board.handler());
  hsm::ClientOptions options = options_for(agent, 30'000ms);
  hsm::Client client(options);

  SECTION("synchronous") {
    std::stop_source stop;
    auto cancelled = std::async(std::launch::async, [&] {
      return code_of([&] {
        (void)client.sign("k", std::string_view("cancel-me"), {.stop = stop.get_token()});
      });
    });
    REQUIRE(board.wait_for(1));
    stop.request_stop();
    CHECK(cancelled.get() == hsm::kCancelled);
  }
  SECTION("future") {
    std::stop_source stop;
    auto future = client.sign_async("k", bytes_of("cancel-me"), {}, {.stop = stop.get_token()});
    REQUIRE(board.wait_for(1));
    stop.request_stop();
    CHECK(error_of([&] { (void)future.get(); }).errc() == hsm::Errc::kCancelled);
  }
  SECTION("callback: run on a client thread, not the one that stops") {
    std::stop_source stop;
    std::promise<std::pair<hsm::Errc, std::thread::id>> done;
    client.sign_async("k", bytes_of("cancel-me"),
                      [&](hsm::Outcome<hsm::Signature> outcome) {
                        done.set_value({outcome ? hsm::Errc::kUnknown : outcome.error().errc(),
                                        std::this_thread::get_id()});
                      },
                      {}, {.stop = stop.get_token()});
    REQUIRE(board.wait_for(1));
    stop.request_stop();
    const auto [code, thread] = done.get_future().get();
    CHECK(code == hsm::Errc::kCancelled);
    CHECK(thread != std::this_thread::get_id());
  }
  // The agent answers the cancelled request after all: dropped, and the connection carries on.
  CHECK(board.answer("cancel-me"));
  auto next =
      std::async(std::launch::async, [&] { return client.sign("k", std::string_view("next")); });
  REQUIRE(board.wait_for(1));
  CHECK(board.answer("next"));
  CHECK(next.get() == bytes_of("next"));
  CHECK(agent.connections_accepted() == 1);
  CHECK(agent.count(Method::kSign) == 2);  // a cancelled call is not retried
}

TEST_CASE("a call stopped before it starts sends nothing", "[client][call]") {
  FakeAgent agent;
  hsm::Client client(options_for(agent));
  std::stop_source stop;
  stop.request_stop();
  CHECK(error_of([&] { (void)client.health({.stop = stop.get_token()}); }).errc() ==
        hsm::Errc::kCancelled);
  std::promise<hsm::Errc> callback;
  client.list_keys_async(
      [&](hsm::Outcome<std::vector<hsm::KeyInfo>> outcome) {
        callback.set_value(outcome ? hsm::Errc::kUnknown : outcome.error().errc());
      },
      {.stop = stop.get_token()});
  CHECK(callback.get_future().get() == hsm::Errc::kCancelled);
  CHECK(agent.requests().empty());
  CHECK(client.health().ok);  // a stop after completion changes nothing either
}

TEST_CASE("agent errors carry their typed code", "[client][call]") {
  FakeAgent agent(
      [](const std::shared_ptr<FakeConnection>& connection, const hsm::protocol::Request& request) {
        connection->answer_error(request.msgid, ErrorCode::kAlreadyExists, "taken");
      });
  auto options = options_for(agent);
  hsm::Client client(options);
  const hsm::Error error = error_of([&] { (void)client.generate_key("k", "ES256"); });
  CHECK(error.errc() == hsm::Errc::kAlreadyExists);
  CHECK(error.code() == "already_exists");  // the string stays, for logs
  CHECK(hsm::to_string(error.errc()) == error.code());
}
