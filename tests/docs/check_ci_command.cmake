# .ci/run must run the README's test command word for word. cmake -DROOT=<repo> -P check_ci_command.cmake
cmake_minimum_required(VERSION 3.25)  # today's policies: list() keeps the file's empty lines
file(STRINGS ${ROOT}/README.md readme)
set(test_command "")
foreach(line IN LISTS readme)  # the second of the two opening commands: the first that runs ctest
  if(line MATCHES "^bash .*ctest ")
    set(test_command "${line}")
    break()
  endif()
endforeach()
file(READ ${ROOT}/.ci/run ci)
string(FIND "${ci}" "${test_command}\n" at)
if(at EQUAL -1 OR test_command STREQUAL "")
  message(FATAL_ERROR ".ci/run does not run the README's test command:\n  ${test_command}")
endif()
