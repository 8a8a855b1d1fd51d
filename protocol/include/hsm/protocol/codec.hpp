// The MessagePack codec of the hsm-agent protocol: framing of a byte stream into messages
// (bounded), and typed encoding/decoding of requests and responses. No I/O.
//
// Thread-safety: free functions are pure; a FrameReader belongs to one connection and is not
// shared between threads.
#pragma once

#include <msgpack.hpp>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "hsm/protocol/types.hpp"

namespace hsm::protocol {

/// Bounds applied to untrusted bytes before they are buffered or decoded.
struct Limits {
  std::size_t max_message_bytes = kDefaultMaxMessageBytes;  // one message, and bytes buffered
  std::size_t max_depth = 8;          // nesting of arrays/maps
  std::size_t max_array_items = 4096;
  std::size_t max_map_entries = 64;
  std::size_t max_str_bytes = std::size_t{64} * 1024;
  std::size_t max_bin_bytes = kDefaultMaxMessageBytes;
  std::size_t max_ext_bytes = 0;      // the protocol uses no ext types
};

/// Why a byte stream was abandoned (bounded set; used as a metric label).
enum class FrameErrorReason : std::uint8_t {
  kMalformed,      // bytes that are not MessagePack
  kTooLarge,       // one message exceeds Limits::max_message_bytes
  kLimitExceeded,  // depth, array, map, str, bin or ext limits
};
[[nodiscard]] std::string_view to_string(FrameErrorReason reason) noexcept;

/// Thrown by FrameReader; the connection that produced the bytes must be closed.
class FrameError : public std::runtime_error {
 public:
  FrameError(FrameErrorReason reason, const std::string& what)
      : std::runtime_error(what), reason_(reason) {}
  [[nodiscard]] FrameErrorReason reason() const noexcept { return reason_; }

 private:
  FrameErrorReason reason_;
};

/// Splits a stream of bytes into MessagePack messages, decoding straight from its own buffer
/// (msgpack::unpacker) with explicit unpack limits and a cap on the bytes it holds.
/// Usage per read: `auto buf = reader.prepare(n); n = read(buf); reader.commit(n);` then call
/// next() until it returns nullopt.
///
/// Bounds: the bytes held for the message being received never exceed
/// Limits::max_message_bytes (prepare() hands out no more room than that), and a message that
/// would need more is refused with FrameError(kTooLarge) as soon as the limit is reached.
/// Memory: the buffer is allocated on the first prepare() (initial_buffer_bytes, grown as
/// needed up to the cap) and released whenever next() finds nothing buffered, so an idle
/// connection holds no buffer at all. Returned object_handles own what they reference (msgpack
/// counts references to the buffer), so they stay valid after later reads and after the reader
/// is destroyed.
/// After a FrameError the reader is unusable (it throws the same error again): close the stream.
class FrameReader {
 public:
  explicit FrameReader(const Limits& limits = {}, std::size_t initial_buffer_bytes = 4096);
  FrameReader(const FrameReader&) = delete;
  FrameReader& operator=(const FrameReader&) = delete;
  FrameReader(FrameReader&&) noexcept = default;
  FrameReader& operator=(FrameReader&&) noexcept = default;
  ~FrameReader() = default;

  /// Writable space of at least `min_bytes` (fewer when the cap leaves less room; empty only if
  /// max_message_bytes are already held, which cannot happen once next() returned nullopt).
  /// The buffer grows to fit `min_bytes`: ask for what one read should take (a few KiB), not for
  /// libuv's 64 KiB suggestion, when many connections are open.
  [[nodiscard]] std::span<char> prepare(std::size_t min_bytes);
  /// Marks `n` bytes of the last prepare() as filled (n <= its size, else std::invalid_argument).
  void commit(std::size_t n);
  /// Convenience: copy `bytes` in (prepare + memcpy + commit), any amount: complete messages are
  /// set aside for next() when the buffer reaches the cap. Throws FrameError like next().
  void feed(std::span<const char> bytes);
  /// The next complete message, or nullopt when more bytes are needed.
  /// Throws FrameError: kMalformed (not MessagePack), kLimitExceeded (depth, array, map, str,
  /// bin or ext limits), kTooLarge (the message needs more than max_message_bytes).
  [[nodiscard]] std::optional<msgpack::object_handle> next();
  /// Bytes received but not yet returned as a message.
  [[nodiscard]] std::size_t buffered_bytes() const noexcept;

 private:
  [[nodiscard]] std::size_t held_bytes() const noexcept;  // of messages not yet parsed
  [[noreturn]] void fail(FrameErrorReason reason, const std::string& what);
  [[nodiscard]] bool parse_one(msgpack::object_handle& out);

  Limits limits_;
  std::size_t initial_buffer_bytes_;
  // Engaged while bytes are buffered. On the heap because msgpack::unpacker cannot be moved
  // safely (its parser keeps a reference to one of its own members).
  std::unique_ptr<msgpack::unpacker> unpacker_;
  std::size_t prepared_ = 0;  // size of the last prepare()
  struct ParsedMessage {
    msgpack::object_handle handle;
    std::size_t bytes;
  };
  /// Messages parsed by feed() to make room, oldest first (next() returns them first).
  std::vector<ParsedMessage> parsed_;
  std::size_t parsed_front_ = 0;
  std::size_t parsed_bytes_ = 0;
  std::optional<FrameError> failure_;
};

// ---- Encoding --------------------------------------------------------------------------------

/// Appends one request message to `out`. Does not validate (the agent does).
void encode_request(const Request& request, msgpack::sbuffer& out);
/// Appends one response message to `out`. The result variant must match the method answered.
void encode_response(const Response& response, msgpack::sbuffer& out);

// ---- Decoding --------------------------------------------------------------------------------

/// A message that could not be turned into a Request. When `msgid` is known the agent answers
/// with `error`; when it is not (not even a msgpack-rpc request), the connection is closed.
struct RequestDecodeError {
  std::optional<std::uint32_t> msgid;
  Error error;  // kInvalidRequest, kUnknownMethod or kInvalidParams, with a clear message
  /// The method, when its name was recognised (for the metrics' method label).
  std::optional<Method> method;
};

/// Validates the shape [0, msgid, method, [params-map]] and every parameter (names, types,
/// kid rules, exactly-one-of data/digest). Unknown parameter names are invalid_params.
[[nodiscard]] std::variant<Request, RequestDecodeError> decode_request(const msgpack::object& msg);

/// Thrown when a response does not have the shape the protocol promises.
class ProtocolError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// The msgid of a response message [1, msgid, error, result], or nullopt if it is not one.
[[nodiscard]] std::optional<std::uint32_t> response_msgid(const msgpack::object& msg) noexcept;
/// Decodes a response to a request of `method`. Throws ProtocolError on a wrong shape.
[[nodiscard]] Response decode_response(const msgpack::object& msg, Method method);

// ---- Shared validation -----------------------------------------------------------------------

/// kid: UTF-8, 1..255 bytes, no NUL. Returns the reason it is invalid, or nullopt if valid.
[[nodiscard]] std::optional<std::string> kid_problem(std::string_view kid);

[[nodiscard]] std::string_view to_string(SignatureFormat format) noexcept;
/// "raw" or "der"; nullopt for anything else.
[[nodiscard]] std::optional<SignatureFormat> parse_signature_format(std::string_view name) noexcept;

}  // namespace hsm::protocol
