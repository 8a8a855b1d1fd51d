// Minimal JSON output for log and audit lines: string escaping per RFC 8259. Lines are built
// by appending to a std::string; there is no JSON parsing in the agent.
#pragma once

#include <string>
#include <string_view>

namespace hsm::agent {

/// Appends `text` as a JSON string literal (with quotes). Control characters are \u-escaped;
/// bytes that are not valid UTF-8 are replaced with U+FFFD so every line stays valid JSON.
void append_json_string(std::string& out, std::string_view text);

}  // namespace hsm::agent
