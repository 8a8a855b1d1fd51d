// FrameReader: bounded framing of a MessagePack stream over msgpack::unpacker.
//
// The unpacker parses incrementally, keeping what it has parsed of an incomplete message, and
// its message_size() is exactly the bytes held for messages not yet returned. prepare() never
// hands out more room than max_message_bytes minus those bytes, so the cap holds however the
// peer splits or pipelines its messages. Strings and bins reference the buffer instead of being
// copied; msgpack reference-counts the buffer so returned handles outlive later reads.
#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>

#include "hsm/protocol/codec.hpp"

namespace hsm::protocol {
namespace {

/// Zero copy: every str, bin and ext refers to the unpacker's buffer.
bool reference_buffer(msgpack::type::object_type /*type*/, std::size_t /*size*/,
                      void* /*user_data*/) {
  return true;
}

msgpack::unpack_limit to_unpack_limit(const Limits& limits) {
  return msgpack::unpack_limit(limits.max_array_items, limits.max_map_entries, limits.max_str_bytes,
                               limits.max_bin_bytes, limits.max_ext_bytes, limits.max_depth);
}

// msgpack keeps a reference counter at the start of its buffer; this covers it with room to spare.
constexpr std::size_t kMinimumBufferBytes = 64;

}  // namespace

FrameReader::FrameReader(const Limits& limits, std::size_t initial_buffer_bytes)
    : limits_(limits), initial_buffer_bytes_(std::max(initial_buffer_bytes, kMinimumBufferBytes)) {
  if (limits_.max_message_bytes == 0) {
    throw std::invalid_argument("FrameReader: max_message_bytes must be positive");
  }
}

std::size_t FrameReader::held_bytes() const noexcept {
  return unpacker_ ? unpacker_->message_size() : 0;
}

std::size_t FrameReader::buffered_bytes() const noexcept {
  return parsed_bytes_ + held_bytes();
}

void FrameReader::fail(FrameErrorReason reason, const std::string& what) {
  // The stream is abandoned: free the buffer now rather than when the connection goes.
  unpacker_.reset();
  parsed_.clear();
  parsed_front_ = 0;
  parsed_bytes_ = 0;
  prepared_ = 0;
  failure_.emplace(reason, what);
  throw *failure_;
}

std::span<char> FrameReader::prepare(std::size_t min_bytes) {
  if (failure_) {
    throw *failure_;
  }
  const std::size_t held = held_bytes();
  const std::size_t room = limits_.max_message_bytes > held ? limits_.max_message_bytes - held : 0;
  if (room == 0) {
    prepared_ = 0;
    return {};
  }
  const std::size_t wanted = std::clamp<std::size_t>(min_bytes, 1, room);
  if (!unpacker_) {
    // Sized for this read up front: msgpack would otherwise double its buffer past it.
    const std::size_t size = std::max(initial_buffer_bytes_, wanted + kMinimumBufferBytes);
    unpacker_ = std::make_unique<msgpack::unpacker>(&reference_buffer, nullptr, size,
                                                    to_unpack_limit(limits_));
  }
  unpacker_->reserve_buffer(wanted);
  prepared_ = std::min(unpacker_->buffer_capacity(), room);
  return {unpacker_->buffer(), prepared_};
}

void FrameReader::commit(std::size_t n) {
  if (failure_) {
    throw *failure_;
  }
  if (n > prepared_) {
    throw std::invalid_argument("FrameReader::commit: more bytes than prepare() offered");
  }
  if (n > 0) {
    unpacker_->buffer_consumed(n);
  }
  prepared_ = 0;
}

bool FrameReader::parse_one(msgpack::object_handle& out) {
  try {
    return unpacker_->next(out);
  } catch (const msgpack::size_overflow& e) {
    // depth, array, map, str, bin or ext: msgpack says which in what().
    fail(FrameErrorReason::kLimitExceeded, std::string("MessagePack limit exceeded: ") + e.what());
  } catch (const msgpack::unpack_error& e) {
    fail(FrameErrorReason::kMalformed, std::string("bytes are not MessagePack: ") + e.what());
  }
}

void FrameReader::feed(std::span<const char> bytes) {
  while (!bytes.empty()) {
    const std::span<char> room = prepare(bytes.size());
    if (room.empty()) {
      // max_message_bytes are held: set a complete message aside to make room, or give up.
      msgpack::object_handle handle;
      const std::size_t before = held_bytes();
      if (!parse_one(handle)) {
        fail(FrameErrorReason::kTooLarge,
             "message larger than " + std::to_string(limits_.max_message_bytes) + " bytes");
      }
      const std::size_t size = before - held_bytes();
      parsed_.push_back(ParsedMessage{std::move(handle), size});
      parsed_bytes_ += size;
      continue;
    }
    const std::size_t n = std::min(room.size(), bytes.size());
    std::memcpy(room.data(), bytes.data(), n);
    commit(n);
    bytes = bytes.subspan(n);
  }
}

std::optional<msgpack::object_handle> FrameReader::next() {
  if (failure_) {
    throw *failure_;
  }
  if (parsed_front_ < parsed_.size()) {
    ParsedMessage& front = parsed_[parsed_front_++];
    parsed_bytes_ -= front.bytes;
    msgpack::object_handle handle = std::move(front.handle);
    if (parsed_front_ == parsed_.size()) {
      parsed_.clear();
      parsed_.shrink_to_fit();  // free the queue's storage too
      parsed_front_ = 0;
    }
    return handle;
  }
  if (!unpacker_) {
    return std::nullopt;
  }
  msgpack::object_handle handle;
  if (parse_one(handle)) {
    return handle;
  }
  const std::size_t held = held_bytes();
  if (held >= limits_.max_message_bytes) {
    // The cap is reached and the message is still incomplete: it is larger than allowed.
    fail(FrameErrorReason::kTooLarge,
         "message larger than " + std::to_string(limits_.max_message_bytes) + " bytes");
  }
  if (held == 0 && prepared_ == 0) {
    // Between messages: release the buffer so an idle connection costs no memory. Handles
    // returned earlier keep their part of it alive through msgpack's reference count.
    unpacker_.reset();
  }
  return std::nullopt;
}

}  // namespace hsm::protocol
