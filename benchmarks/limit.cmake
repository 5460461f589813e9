# moekit_limit: what layer_benchmark and moekit-hf bench hold the layer to (benchmarks/limit_gemms.hpp).
# oneDNN's matmul where Debian's libdnnl-dev is installed (cmake/install_deps.sh installs it: a
# benchmark-only dependency, never the library's); else Eigen's GEMM, and the benchmarks say so.
# Found by its header and library rather than its CMake package, which also asks for OpenCL's
# development files although nothing here uses the GPU.
add_library(moekit_limit INTERFACE)
target_include_directories(moekit_limit INTERFACE ${CMAKE_CURRENT_LIST_DIR})
find_path(MOEKIT_DNNL_INCLUDE_DIR oneapi/dnnl/dnnl.hpp)
find_library(MOEKIT_DNNL_LIBRARY dnnl)
find_package(OpenMP COMPONENTS CXX QUIET)
if(MOEKIT_DNNL_INCLUDE_DIR AND MOEKIT_DNNL_LIBRARY AND OpenMP_CXX_FOUND)
  target_compile_definitions(moekit_limit INTERFACE MOEKIT_ONEDNN_LIMIT)
  target_include_directories(moekit_limit INTERFACE ${MOEKIT_DNNL_INCLUDE_DIR})
  target_link_libraries(moekit_limit INTERFACE ${MOEKIT_DNNL_LIBRARY} OpenMP::OpenMP_CXX)
  message(STATUS "moekit: the benchmarks' limit is oneDNN's matmul (${MOEKIT_DNNL_LIBRARY})")
else()
  message(STATUS "moekit: oneDNN (libdnnl-dev) not found; the benchmarks' limit is Eigen's GEMM")
endif()
