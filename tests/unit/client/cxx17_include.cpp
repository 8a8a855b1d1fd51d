// Compiled with -std=c++17 by the test client_header_requires_cxx20: it must fail at the
// header's #error ("hsm/client.hpp requires C++20 or later"), not somewhere inside it.
#include <hsm/client.hpp>
