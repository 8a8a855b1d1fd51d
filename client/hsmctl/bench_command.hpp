// `hsmctl bench`: signing load against a running agent, N connections x pipeline depth D for a
// fixed time, reporting throughput, latency percentiles, errors and CPU per signature (text, or
// with --json the one-line report of latency_report.hpp that bench/run.sh reads, the same shape
// hsm-bench-direct prints, so the two can be divided).
//
// Load shapes (N = --connections, D = --depth; N x D signatures are in flight at once):
//   D = 1: N threads, each with its own Client (one connection) calling the synchronous sign();
//          the match for N application threads (and for hsm-bench-direct --threads N).
//   D > 1: N Clients (one connection each), each keeping D sign_async() calls in flight; each
//          completion records its latency and starts the next call (a closed loop).
// Every call is a real `sign` (or, with --digest, a sign of a digest) with one fixed payload; the
// signature's size is checked, so a run that "succeeds" with garbage answers counts errors.
#pragma once

#include <memory>

#include "commands.hpp"

namespace hsm::hsmctl {

/// The command object for command_table().
[[nodiscard]] std::unique_ptr<Command> make_bench_command();

}  // namespace hsm::hsmctl
