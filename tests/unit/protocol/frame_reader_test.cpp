// FrameReader: messages split anywhere or packed together come out whole; bytes that are not
// MessagePack, oversized messages and exceeded unpack limits end the stream with the right
// reason, without the reader ever holding more than its cap.
#include <catch2/catch.hpp>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "hsm/protocol/codec.hpp"

using namespace hsm::protocol;

namespace {

using Packer = msgpack::packer<msgpack::sbuffer>;

std::vector<Request> sample_requests() {
  return {
      Request{1, Method::kHealth, EmptyParams{}, std::nullopt},
      Request{2, Method::kSign, SignParams{"k", Data{Bytes(300, 0xAA)}, "ES256", std::nullopt},
              1000},
      Request{3, Method::kGetPublicKey, KidParams{"key \xC3\xA9"}, std::nullopt},
      Request{4, Method::kSignBatch,
              SignBatchParams{
                  {SignParams{"a", Digest{Bytes(32, 1)}, std::nullopt, SignatureFormat::kDer}}},
              std::nullopt},
  };
}

std::string encode_all(const std::vector<Request>& requests) {
  msgpack::sbuffer buffer;
  for (const Request& request : requests) {
    encode_request(request, buffer);
  }
  return {buffer.data(), buffer.size()};
}

Request as_request(const msgpack::object_handle& handle) {
  auto decoded = decode_request(handle.get());
  REQUIRE(std::holds_alternative<Request>(decoded));
  return std::get<Request>(decoded);
}

void drain(FrameReader& reader, std::vector<Request>& out) {
  while (auto message = reader.next()) {
    out.push_back(as_request(*message));
  }
}

/// One message of exactly `total` bytes: a bin whose payload fills the rest (bin32 header).
std::string message_of_size(std::size_t total) {
  REQUIRE(total > 5);
  std::string bytes;
  bytes.push_back(static_cast<char>(0xc6));  // bin 32
  const auto payload = static_cast<std::uint32_t>(total - 5);
  for (int shift = 24; shift >= 0; shift -= 8) {
    bytes.push_back(static_cast<char>((payload >> static_cast<unsigned>(shift)) & 0xFFU));
  }
  bytes.append(payload, 'z');
  return bytes;
}

FrameErrorReason reason_of(const std::function<void()>& action) {
  try {
    action();
  } catch (const FrameError& e) {
    return e.reason();
  }
  FAIL("no FrameError thrown");
  return FrameErrorReason::kMalformed;
}

std::string packed(const std::function<void(Packer&)>& write) {
  msgpack::sbuffer buffer;
  Packer pk(buffer);
  write(pk);
  return {buffer.data(), buffer.size()};
}

}  // namespace

TEST_CASE("messages fed byte by byte come out whole", "[frame_reader]") {
  const std::vector<Request> requests = sample_requests();
  const std::string stream = encode_all(requests);

  SECTION("with feed()") {
    FrameReader reader;
    std::vector<Request> decoded;
    for (const char byte : stream) {
      reader.feed({&byte, 1});
      drain(reader, decoded);
    }
    CHECK(decoded == requests);
    CHECK(reader.buffered_bytes() == 0);
  }
  SECTION("with prepare() and commit()") {
    FrameReader reader({}, 64);
    std::vector<Request> decoded;
    for (const char byte : stream) {
      const std::span<char> room = reader.prepare(1);
      REQUIRE(room.size() >= 1);
      room[0] = byte;
      reader.commit(1);
      drain(reader, decoded);
    }
    CHECK(decoded == requests);
  }
  SECTION("in uneven chunks") {
    for (const std::size_t chunk : {2U, 3U, 7U, 64U, 333U}) {
      INFO("chunk " << chunk);
      FrameReader reader({}, 64);
      std::vector<Request> decoded;
      for (std::size_t offset = 0; offset < stream.size(); offset += chunk) {
        const std::size_t n = std::min(chunk, stream.size() - offset);
        reader.feed({stream.data() + offset, n});
        drain(reader, decoded);
      }
      CHECK(decoded == requests);
    }
  }
}

TEST_CASE("several messages in one feed come out in order", "[frame_reader]") {
  const std::vector<Request> requests = sample_requests();
  const std::string stream = encode_all(requests);
  FrameReader reader;
  reader.feed({stream.data(), stream.size()});
  CHECK(reader.buffered_bytes() == stream.size());
  std::vector<Request> decoded;
  drain(reader, decoded);
  CHECK(decoded == requests);
  CHECK(reader.buffered_bytes() == 0);
  CHECK_FALSE(reader.next().has_value());

  // The reader is reusable after it released its buffer.
  reader.feed({stream.data(), stream.size()});
  decoded.clear();
  drain(reader, decoded);
  CHECK(decoded == requests);
}

TEST_CASE("a feed larger than the cap is fine when its messages are small", "[frame_reader]") {
  Limits limits;
  limits.max_message_bytes = 512;
  std::vector<Request> requests;
  for (std::uint32_t i = 0; i < 100; ++i) {
    requests.push_back(
        Request{i, Method::kGetPublicKey, KidParams{"key-" + std::to_string(i)}, std::nullopt});
  }
  const std::string stream = encode_all(requests);
  REQUIRE(stream.size() > 4 * limits.max_message_bytes);
  FrameReader reader(limits, 64);
  reader.feed({stream.data(), stream.size()});
  CHECK(reader.buffered_bytes() == stream.size());
  std::vector<Request> decoded;
  drain(reader, decoded);
  CHECK(decoded == requests);
  CHECK(reader.buffered_bytes() == 0);
}

TEST_CASE("returned messages stay valid after later reads and after the reader", "[frame_reader]") {
  const std::vector<Request> requests = sample_requests();
  const std::string stream = encode_all(requests);
  std::vector<msgpack::object_handle> kept;
  {
    FrameReader reader({}, 64);
    for (const char byte : stream) {
      reader.feed({&byte, 1});
      while (auto message = reader.next()) {
        kept.push_back(std::move(*message));
      }
    }
    // Overwrite the reader's buffers with other bytes.
    const std::string other = encode_all({Request{
        9, Method::kSign, SignParams{"zzzzzz", Data{Bytes(500, 0x55)}, std::nullopt, std::nullopt},
        std::nullopt}});
    reader.feed({other.data(), other.size()});
    CHECK(reader.next().has_value());
  }
  REQUIRE(kept.size() == requests.size());
  for (std::size_t i = 0; i < kept.size(); ++i) {
    CHECK(as_request(kept[i]) == requests[i]);
  }
}

TEST_CASE("bytes that are not MessagePack are kMalformed", "[frame_reader]") {
  FrameReader reader;
  const char garbage[] = {'\x94', '\x00', '\x01', '\xc1'};  // 0xc1 is never used by MessagePack
  reader.feed({garbage, sizeof garbage});
  CHECK(reason_of([&] { static_cast<void>(reader.next()); }) == FrameErrorReason::kMalformed);
  // The reader stays failed: the connection must be closed.
  CHECK(reason_of([&] { static_cast<void>(reader.next()); }) == FrameErrorReason::kMalformed);
  CHECK(reason_of([&] { static_cast<void>(reader.prepare(16)); }) == FrameErrorReason::kMalformed);
  CHECK(reader.buffered_bytes() == 0);

  FrameReader after_good;
  std::string stream = encode_all({Request{1, Method::kHealth, EmptyParams{}, std::nullopt}});
  stream.push_back('\xc1');
  after_good.feed({stream.data(), stream.size()});
  CHECK(after_good.next().has_value());  // the good message before the garbage still counts
  CHECK(reason_of([&] { static_cast<void>(after_good.next()); }) == FrameErrorReason::kMalformed);
}

TEST_CASE("an oversized message is kTooLarge once the cap is held, never more", "[frame_reader]") {
  Limits limits;
  limits.max_message_bytes = 1000;

  SECTION("a message of exactly the cap is accepted") {
    FrameReader reader(limits, 64);
    const std::string message = message_of_size(1000);
    reader.feed({message.data(), message.size()});
    const auto handle = reader.next();
    REQUIRE(handle.has_value());
    CHECK(handle->get().via.bin.size == 995);
  }
  SECTION("one byte more is refused, reading through prepare()/commit()") {
    FrameReader reader(limits, 64);
    const std::string stream = message_of_size(1001) + message_of_size(100);
    std::size_t offset = 0;
    std::size_t largest_held = 0;
    bool refused = false;
    while (offset < stream.size() && !refused) {
      const std::span<char> room = reader.prepare(64 * 1024);  // asks for far more than allowed
      CHECK(room.size() + reader.buffered_bytes() <= limits.max_message_bytes);
      const std::size_t n = std::min(room.size(), stream.size() - offset);
      std::memcpy(room.data(), stream.data() + offset, n);
      reader.commit(n);
      offset += n;
      largest_held = std::max(largest_held, reader.buffered_bytes());
      std::optional<msgpack::object_handle> message;
      try {
        message = reader.next();
      } catch (const FrameError& e) {
        CHECK(e.reason() == FrameErrorReason::kTooLarge);
        CHECK_THAT(e.what(), Catch::Contains("1000"));
        refused = true;
      }
      CHECK_FALSE(message.has_value());
    }
    CHECK(refused);
    CHECK(largest_held == limits.max_message_bytes);
    CHECK(offset == limits.max_message_bytes);  // not one byte beyond the cap was taken
  }
  SECTION("byte by byte with feed()") {
    FrameReader reader(limits, 64);
    const std::string message = message_of_size(5000);
    std::size_t fed = 0;
    const FrameErrorReason reason = reason_of([&] {
      for (const char byte : message) {
        reader.feed({&byte, 1});
        ++fed;
        REQUIRE(reader.buffered_bytes() <= limits.max_message_bytes);
        static_cast<void>(reader.next());
      }
    });
    CHECK(reason == FrameErrorReason::kTooLarge);
    CHECK(fed == limits.max_message_bytes);
  }
  SECTION("in one large feed") {
    FrameReader reader(limits, 64);
    const std::string message = message_of_size(1 << 20);
    CHECK(reason_of([&] {
            reader.feed({message.data(), message.size()});
          }) == FrameErrorReason::kTooLarge);
    CHECK(reader.buffered_bytes() == 0);  // released on failure
  }
}

TEST_CASE("unpack limits are enforced as kLimitExceeded", "[frame_reader][limits]") {
  Limits limits;
  limits.max_depth = 4;
  limits.max_array_items = 10;
  limits.max_map_entries = 3;
  limits.max_str_bytes = 16;
  limits.max_bin_bytes = 32;
  limits.max_ext_bytes = 0;

  const auto nested = [](int depth) {
    return packed([depth](Packer& pk) {
      for (int i = 0; i < depth; ++i) {
        pk.pack_array(1);
      }
      pk.pack_nil();
    });
  };
  const auto outcome = [&](const std::string& bytes) -> std::optional<FrameErrorReason> {
    FrameReader reader(limits);
    std::optional<msgpack::object_handle> message;
    try {
      reader.feed({bytes.data(), bytes.size()});
      message = reader.next();
    } catch (const FrameError& e) {
      return e.reason();
    }
    CHECK(message.has_value());
    return std::nullopt;
  };

  CHECK(outcome(nested(4)) == std::nullopt);
  CHECK(outcome(nested(5)) == FrameErrorReason::kLimitExceeded);
  CHECK(outcome(nested(100)) == FrameErrorReason::kLimitExceeded);

  const auto array_of = [](std::uint32_t n) {
    return packed([n](Packer& pk) {
      pk.pack_array(n);
      for (std::uint32_t i = 0; i < n; ++i) {
        pk.pack_nil();
      }
    });
  };
  CHECK(outcome(array_of(10)) == std::nullopt);
  CHECK(outcome(array_of(11)) == FrameErrorReason::kLimitExceeded);

  const auto map_of = [](std::uint32_t n) {
    return packed([n](Packer& pk) {
      pk.pack_map(n);
      for (std::uint32_t i = 0; i < n; ++i) {
        pk.pack_uint32(i);
        pk.pack_nil();
      }
    });
  };
  CHECK(outcome(map_of(3)) == std::nullopt);
  CHECK(outcome(map_of(4)) == FrameErrorReason::kLimitExceeded);

  const auto str_of = [](std::uint32_t n) {
    return packed([n](Packer& pk) {
      const std::string s(n, 's');
      pk.pack_str(n);
      pk.pack_str_body(s.data(), n);
    });
  };
  CHECK(outcome(str_of(16)) == std::nullopt);
  CHECK(outcome(str_of(17)) == FrameErrorReason::kLimitExceeded);

  const auto bin_of = [](std::uint32_t n) {
    return packed([n](Packer& pk) {
      const std::string s(n, 'b');
      pk.pack_bin(n);
      pk.pack_bin_body(s.data(), n);
    });
  };
  CHECK(outcome(bin_of(32)) == std::nullopt);
  CHECK(outcome(bin_of(33)) == FrameErrorReason::kLimitExceeded);

  const std::string ext = packed([](Packer& pk) {
    pk.pack_ext(1, 5);
    pk.pack_ext_body("x", 1);
  });
  CHECK(outcome(ext) == FrameErrorReason::kLimitExceeded);
}

TEST_CASE("a huge declared size is bounded by the cap", "[frame_reader][limits]") {
  SECTION("containers are refused from their header") {
    const char array32[] = {'\xdd', '\x7f', '\xff', '\xff', '\xff'};  // array of 2^31-1 items
    FrameReader reader;
    reader.feed({array32, sizeof array32});
    CHECK(reason_of([&] { static_cast<void>(reader.next()); }) == FrameErrorReason::kLimitExceeded);
    const char map32[] = {'\xdf', '\x00', '\x01', '\x00', '\x00'};  // map of 65536 entries
    FrameReader other;
    other.feed({map32, sizeof map32});
    CHECK(reason_of([&] { static_cast<void>(other.next()); }) == FrameErrorReason::kLimitExceeded);
  }
  SECTION("a bin announcing 4 GiB is buffered up to the cap only") {
    // msgpack checks str/bin sizes once the value is complete; the cap bounds the wait.
    Limits limits;
    limits.max_message_bytes = 4096;
    FrameReader reader(limits, 64);
    const char header[] = {'\xc6', '\xff', '\xff', '\xff', '\xff'};
    reader.feed({header, sizeof header});
    CHECK_FALSE(reader.next().has_value());
    const std::string payload(limits.max_message_bytes - sizeof header, 'p');
    reader.feed({payload.data(), payload.size()});
    CHECK(reader.buffered_bytes() == limits.max_message_bytes);
    CHECK(reason_of([&] { static_cast<void>(reader.next()); }) == FrameErrorReason::kTooLarge);
  }
}

TEST_CASE("commit() refuses more bytes than prepare() offered", "[frame_reader]") {
  FrameReader reader({}, 64);
  const std::span<char> room = reader.prepare(16);
  REQUIRE(room.size() >= 16);
  CHECK_THROWS_AS(reader.commit(room.size() + 1), std::invalid_argument);
  reader.commit(0);
  CHECK_THROWS_AS(reader.commit(1), std::invalid_argument);
  CHECK_FALSE(reader.next().has_value());
  CHECK(reader.buffered_bytes() == 0);
}

TEST_CASE("a reader moved in the middle of a message keeps working", "[frame_reader]") {
  // A large message split so that the buffer must grow after the move, while the partial
  // message already references the old buffer.
  const std::vector<Request> requests = {
      Request{
          1, Method::kSign,
          SignParams{std::string(200, 'k'), Data{Bytes(20000, 0x42)}, std::nullopt, std::nullopt},
          std::nullopt},
      Request{2, Method::kHealth, EmptyParams{}, std::nullopt}};
  const std::string stream = encode_all(requests);
  auto first = std::make_unique<FrameReader>(Limits{}, 64);
  first->feed({stream.data(), 300});
  CHECK_FALSE(first->next().has_value());
  FrameReader second = std::move(*first);
  first.reset();  // nothing of the moved-from reader may be used any more
  std::vector<Request> decoded;
  for (std::size_t offset = 300; offset < stream.size(); offset += 1000) {
    const std::size_t n = std::min<std::size_t>(1000, stream.size() - offset);
    second.feed({stream.data() + offset, n});
    drain(second, decoded);
  }
  CHECK(decoded == requests);
}
