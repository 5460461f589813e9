# Installs moekit from BUILD_DIR into a fresh prefix, then builds and runs downstream projects
# against it:
# - single_process/ with moekit::moekit, configured with MPI hidden from CMake, and the same
#   source with a bare compiler command (no CMake, no MPI): neither may reach MPI;
# - where the build has it, distributed/ with moekit::distributed, run under mpirun on 2 ranks;
#   and the same project with MPI hidden must fail to configure, naming what is missing.
# Called by CTest: cmake -DBUILD_DIR=… -DWORK_DIR=… -DSOURCE_DIR=… -DCXX=… -DEIGEN_INCLUDE=…
#                        -DDISTRIBUTED=… -DMPIEXEC=… -DMPIEXEC_FLAGS=… -P run.cmake
file(REMOVE_RECURSE ${WORK_DIR})
function(step)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE status)
  if(NOT status EQUAL 0)
    message(FATAL_ERROR "install test: '${ARGN}' failed with ${status}")
  endif()
endfunction()
set(prefix ${WORK_DIR}/prefix)
step(${CMAKE_COMMAND} --install ${BUILD_DIR} --prefix ${prefix})

# moekit::moekit: found and built with MPI out of CMake's reach, linked with no MPI library.
step(${CMAKE_COMMAND} -S ${SOURCE_DIR}/single_process -B ${WORK_DIR}/single_process -DCMAKE_BUILD_TYPE=Release
     -DCMAKE_PREFIX_PATH=${prefix} -DCMAKE_DISABLE_FIND_PACKAGE_MPI=TRUE)
step(${CMAKE_COMMAND} --build ${WORK_DIR}/single_process)
step(${WORK_DIR}/single_process/consumer)
execute_process(COMMAND ldd ${WORK_DIR}/single_process/consumer OUTPUT_VARIABLE libraries)
if(libraries MATCHES "libmpi|libboost_mpi")
  message(FATAL_ERROR "install test: the moekit::moekit consumer loads MPI:\n${libraries}")
endif()

# The same source with nothing but the compiler: the include paths and oneTBB.
step(${CXX} -std=c++20 -I${prefix}/include -I${EIGEN_INCLUDE} ${SOURCE_DIR}/single_process/main.cpp -ltbb
     -o ${WORK_DIR}/plain_consumer)
step(${WORK_DIR}/plain_consumer)

if(DISTRIBUTED)
  step(${CMAKE_COMMAND} -S ${SOURCE_DIR}/distributed -B ${WORK_DIR}/distributed -DCMAKE_BUILD_TYPE=Release
       -DCMAKE_PREFIX_PATH=${prefix})
  step(${CMAKE_COMMAND} --build ${WORK_DIR}/distributed)
  step(${MPIEXEC} -np 2 ${MPIEXEC_FLAGS} ${WORK_DIR}/distributed/distributed_consumer)

  execute_process(COMMAND ${CMAKE_COMMAND} -S ${SOURCE_DIR}/distributed -B ${WORK_DIR}/distributed_without_mpi
                          -DCMAKE_PREFIX_PATH=${prefix} -DCMAKE_DISABLE_FIND_PACKAGE_MPI=TRUE
                  RESULT_VARIABLE status OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(status EQUAL 0 OR NOT "${out}${err}" MATCHES "moekit::distributed needs MPI")
    message(FATAL_ERROR "install test: COMPONENTS distributed without MPI should fail naming MPI; "
                        "it exited ${status}:\n${out}${err}")
  endif()
endif()
message(STATUS "install test: passed")
