# A translation unit built with MOEKIT_COMPILED_KERNELS compiles none of the products itself: it
# only refers to those of compiled_kernels.cpp, which defines them all.
# cmake -DNM=… -DUSER=<object> -DKERNELS=<library> -P check_products_compiled_once.cmake
cmake_minimum_required(VERSION 3.25)
function(gemm_symbols file kinds out)
  execute_process(COMMAND ${NM} -C ${file} OUTPUT_VARIABLE symbols RESULT_VARIABLE status)
  if(NOT status EQUAL 0)
    message(FATAL_ERROR "${NM} -C ${file} failed")
  endif()
  string(REGEX MATCHALL "[^\n]* [${kinds}] (void )?moekit::detail::Gemm<[^\n]*" found "${symbols}")
  set(${out} "${found}" PARENT_SCOPE)
endfunction()
gemm_symbols(${USER} "TWtw" defined)
gemm_symbols(${USER} "U" referred)
gemm_symbols(${KERNELS} "TW" compiled)
list(LENGTH defined defined_count)
list(LENGTH referred referred_count)
list(LENGTH compiled compiled_count)
if(defined_count GREATER 0 OR referred_count EQUAL 0 OR compiled_count LESS 18)
  message(FATAL_ERROR "products compiled in the user's file: ${defined_count} (expected 0); referred to: "
                      "${referred_count} (expected some); compiled in the kernels' library: ${compiled_count} "
                      "(expected at least 18: 8 storage orders and set_each, in float and double)\n${defined}")
endif()
message(STATUS "the user's file refers to ${referred_count} products and compiles none; the kernels' library has ${compiled_count}")
