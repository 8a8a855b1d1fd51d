# One place for the project's warning flags: every target of ours links hsm_warnings.
add_library(hsm_warnings INTERFACE)
target_compile_options(hsm_warnings INTERFACE
  $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wpedantic -Wshadow -Wnon-virtual-dtor
    -Wold-style-cast -Wcast-align -Wunused -Woverloaded-virtual -Wconversion
    -Wsign-conversion -Wimplicit-fallthrough
    # Designated initializers that leave members at their defaults are idiomatic C++20.
    -Wno-missing-field-initializers>)
option(HSM_WERROR "Treat warnings as errors" OFF)
if(HSM_WERROR)
  target_compile_options(hsm_warnings INTERFACE -Werror)
endif()
