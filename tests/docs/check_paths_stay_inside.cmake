# Nothing the project builds, tests or runs reaches outside its own folder: a user's clone has
# nothing beside it. cmake -DROOT=<repo> -P check_paths_stay_inside.cmake
cmake_minimum_required(VERSION 3.25)
file(GLOB_RECURSE files RELATIVE ${ROOT}
     ${ROOT}/CMakeLists.txt ${ROOT}/cmake/* ${ROOT}/.ci/* ${ROOT}/include/*
     ${ROOT}/examples/* ${ROOT}/benchmarks/* ${ROOT}/scripts/* ${ROOT}/tests/*)
list(FILTER files EXCLUDE REGEX "\\.(md|safetensors|json|svg)$|check_paths_stay_inside")
set(found "")
foreach(file IN LISTS files)
  file(STRINGS ${ROOT}/${file} lines REGEX "\\.\\./shared|shared/fixtures")
  foreach(line IN LISTS lines)
    string(APPEND found "\n  ${file}: ${line}")
  endforeach()
endforeach()
if(found)
  message(FATAL_ERROR "these lines reach outside the repository:${found}")
endif()
list(LENGTH files count)
message(STATUS "${count} files, none reaching outside the repository")
