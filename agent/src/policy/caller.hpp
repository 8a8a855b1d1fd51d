// Caller: who is on the other end of a connection, from SO_PEERCRED at accept. Held for the
// connection's life (a process cannot change the credentials a connected socket reports).
#pragma once

#include <sys/types.h>

namespace hsm::agent {

struct Caller {
  pid_t pid = 0;
  uid_t uid = static_cast<uid_t>(-1);
  gid_t gid = static_cast<gid_t>(-1);
};

}  // namespace hsm::agent
