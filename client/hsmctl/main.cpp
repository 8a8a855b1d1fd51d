// hsmctl: the operator's CLI for hsm-agent. The commands live in commands.cpp.
#include <iostream>
#include <string>
#include <vector>

#include "commands.hpp"

int main(int argc, char** argv) {
  const std::vector<std::string> args(argv, argv + argc);
  return hsm::hsmctl::run_hsmctl(args, std::cout, std::cerr);
}
