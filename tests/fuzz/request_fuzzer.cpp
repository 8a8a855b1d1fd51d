// libFuzzer target over the agent's request path before the HSM: bytes -> FrameReader (with
// the agent's limits) -> decode_request -> access check -> the error response encoder. Any
// crash, sanitizer report, unbounded buffering or exception escaping is a bug.
#include <cstddef>
#include <cstdint>
#include <stdexcept>

#include "hsm/protocol/codec.hpp"
#include "policy/access_control.hpp"

namespace {

const hsm::agent::AccessControl& access_control() {
  static const hsm::agent::AccessControl control(hsm::agent::AccessConfig{.allow_uids = {1000}},
                                                 false, 0);
  return control;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  hsm::protocol::Limits limits;
  limits.max_message_bytes = 64 * 1024;
  limits.max_bin_bytes = limits.max_message_bytes;
  hsm::protocol::FrameReader reader(limits);
  try {
    // Feed in uneven chunks, as a socket would deliver them.
    std::size_t offset = 0;
    std::size_t chunk = 1;
    while (offset < size) {
      const std::size_t n = std::min(chunk, size - offset);
      reader.feed({reinterpret_cast<const char*>(data) + offset, n});
      offset += n;
      chunk = chunk * 3 + 1;
      while (auto message = reader.next()) {
        auto decoded = hsm::protocol::decode_request(message->get());
        msgpack::sbuffer out;
        if (auto* failure = std::get_if<hsm::protocol::RequestDecodeError>(&decoded)) {
          if (failure->msgid) {
            hsm::protocol::encode_response({*failure->msgid, failure->error}, out);
          }
          continue;
        }
        const auto& request = std::get<hsm::protocol::Request>(decoded);
        for (const hsm::agent::Caller caller : {hsm::agent::Caller{1, 0, 0},
                                                hsm::agent::Caller{2, 1000, 1000},
                                                hsm::agent::Caller{3, 4242, 4242}}) {
          if (auto denied = access_control().authorize(caller, request)) {
            hsm::protocol::encode_response({request.msgid, *denied}, out);
          }
        }
        // What the agent would send back for a request it cannot serve.
        hsm::protocol::encode_response(
            {request.msgid, hsm::protocol::Error{hsm::protocol::ErrorCode::kOverloaded, "busy",
                                                 std::nullopt}},
            out);
        // A request must survive its own round trip.
        msgpack::sbuffer again;
        hsm::protocol::encode_request(request, again);
        auto handle = msgpack::unpack(again.data(), again.size());
        auto round = hsm::protocol::decode_request(handle.get());
        if (!std::holds_alternative<hsm::protocol::Request>(round)) __builtin_trap();
        if (!(std::get<hsm::protocol::Request>(round) == request)) __builtin_trap();
      }
      // Drained: what is left is one incomplete message, never more than the cap.
      if (reader.buffered_bytes() > limits.max_message_bytes) __builtin_trap();
    }
  } catch (const hsm::protocol::FrameError&) {
    // The agent closes such a connection: expected for bad bytes.
  }
  return 0;
}
