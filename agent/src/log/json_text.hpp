// Minimal JSON output for log and audit lines: string escaping per RFC 8259. Lines are built
// by appending to a std::string; there is no JSON parsing in the agent.
//
// Why not nlohmann-json, which hsmctl and the client use: on the signing thread, an audit line
// built this way costs ~1.3 us, as an nlohmann::json value and dump() ~5 us (3.5-4.2x; about
// 3.5 % of the agent's CPU per sign). Measured with bench/json_escape_bench.cpp, figures in
// docs/performance.md. UTF-8 validity is the shared check (hsm/common/utf8.hpp).
#pragma once

#include <string>
#include <string_view>

namespace hsm::agent {

/// Appends `text` as a JSON string literal (with quotes). Control characters are \u-escaped;
/// bytes that are not valid UTF-8 are replaced with U+FFFD so every line stays valid JSON.
void append_json_string(std::string& out, std::string_view text);

}  // namespace hsm::agent
