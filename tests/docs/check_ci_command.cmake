# .ci/run must run the README's test command word for word. cmake -DROOT=<repo> -P check_ci_command.cmake
file(STRINGS ${ROOT}/README.md readme)
list(GET readme 3 test_command)  # line 4: the second of the two opening commands
file(READ ${ROOT}/.ci/run ci)
string(FIND "${ci}" "${test_command}\n" at)
if(at EQUAL -1 OR NOT test_command MATCHES "ctest")
  message(FATAL_ERROR ".ci/run does not run the README's test command:\n  ${test_command}")
endif()
