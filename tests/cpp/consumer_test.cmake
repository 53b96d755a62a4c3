# The embedding proof, run by ctest as `cmake -P`:
#   1. install the already-built accelcore (ACCELCORE_BINARY_DIR) into a scratch prefix,
#   2. configure and build examples/cpp against it with find_package(accelcore),
#   3. run the example on the test model and compare its ids with the golden ones.
#
# Inputs (-D): ACCELCORE_BINARY_DIR, EXAMPLE_SOURCE_DIR, WORK_DIR, MODEL_DIR_DEFAULT, GENERATOR,
# CXX_COMPILER, CONFIG (may be empty). $ENV{ACCELCORE_TEST_MODEL} overrides MODEL_DIR_DEFAULT.
cmake_minimum_required(VERSION 3.24)

foreach(var ACCELCORE_BINARY_DIR EXAMPLE_SOURCE_DIR WORK_DIR MODEL_DIR_DEFAULT GENERATOR)
  if(NOT DEFINED ${var} OR "${${var}}" STREQUAL "")
    message(FATAL_ERROR "consumer_test.cmake: -D${var}=... is required")
  endif()
endforeach()

if(DEFINED ENV{ACCELCORE_TEST_MODEL} AND NOT "$ENV{ACCELCORE_TEST_MODEL}" STREQUAL "")
  set(MODEL_DIR "$ENV{ACCELCORE_TEST_MODEL}")
else()
  set(MODEL_DIR "${MODEL_DIR_DEFAULT}")
endif()
if(NOT EXISTS "${MODEL_DIR}/reference_outputs.json")
  message(FATAL_ERROR "no ${MODEL_DIR}/reference_outputs.json (set ACCELCORE_TEST_MODEL to the stories260K directory)")
endif()

set(prefix "${WORK_DIR}/prefix")
set(build "${WORK_DIR}/build")
file(REMOVE_RECURSE "${WORK_DIR}")
file(MAKE_DIRECTORY "${WORK_DIR}")

function(run_step what)
  execute_process(COMMAND ${ARGN}
    RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    string(REPLACE ";" " " cmd "${ARGN}")
    message(FATAL_ERROR "${what} failed (${rc}):\n  ${cmd}\n--- stdout\n${out}\n--- stderr\n${err}")
  endif()
  message(STATUS "${what}: ok")
  set(step_output "${out}" PARENT_SCOPE)
  set(step_error "${err}" PARENT_SCOPE)
endfunction()

# 1. Install.
set(config_args)
if(NOT "${CONFIG}" STREQUAL "")
  set(config_args --config "${CONFIG}")
endif()
run_step("install accelcore" "${CMAKE_COMMAND}" --install "${ACCELCORE_BINARY_DIR}" --prefix "${prefix}" ${config_args})
file(GLOB_RECURSE config_file "${prefix}/*/accelcoreConfig.cmake")
if(NOT config_file)
  message(FATAL_ERROR "the install has no accelcoreConfig.cmake under ${prefix}")
endif()
if(NOT EXISTS "${prefix}/include/accelcore/accelcore.h")
  message(FATAL_ERROR "the install has no include/accelcore/accelcore.h")
endif()

# 2. Configure and build the consumer against the install only.
set(configure_args -S "${EXAMPLE_SOURCE_DIR}" -B "${build}" -G "${GENERATOR}"
  "-DCMAKE_PREFIX_PATH=${prefix}" -DCMAKE_FIND_PACKAGE_NO_PACKAGE_REGISTRY=ON)
if(DEFINED CXX_COMPILER AND NOT "${CXX_COMPILER}" STREQUAL "")
  list(APPEND configure_args "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}")
endif()
if(NOT "${CONFIG}" STREQUAL "")
  list(APPEND configure_args "-DCMAKE_BUILD_TYPE=${CONFIG}")
endif()
run_step("configure examples/cpp" "${CMAKE_COMMAND}" ${configure_args})
run_step("build examples/cpp" "${CMAKE_COMMAND}" --build "${build}" ${config_args})

find_program(example_bin accelcore_example PATHS "${build}" "${build}/${CONFIG}" NO_DEFAULT_PATH)
if(NOT example_bin)
  message(FATAL_ERROR "accelcore_example was not built under ${build}")
endif()

# 3. Run it (default prompt, 16 tokens) and compare with the first 16 golden ids.
run_step("run accelcore_example" "${example_bin}" "${MODEL_DIR}")
string(REGEX MATCH "generated_ids:([ 0-9]*)" _ "${step_output}")
string(STRIP "${CMAKE_MATCH_1}" got)
string(REGEX REPLACE " +" ";" got "${got}")

file(READ "${MODEL_DIR}/reference_outputs.json" ref)
string(JSON prompt_len LENGTH "${ref}" max_new_tokens_64 0 prompt_ids)
set(prompt)
math(EXPR last "${prompt_len} - 1")
foreach(i RANGE ${last})
  string(JSON id GET "${ref}" max_new_tokens_64 0 prompt_ids ${i})
  list(APPEND prompt ${id})
endforeach()
if(NOT "${prompt}" STREQUAL "1;403;407;261;378")
  message(FATAL_ERROR "golden prompt ${prompt} is not the example's default prompt 1;403;407;261;378")
endif()
set(want)
foreach(i RANGE 15)
  string(JSON id GET "${ref}" max_new_tokens_64 0 new_ids ${i})
  list(APPEND want ${id})
endforeach()

if(NOT "${got}" STREQUAL "${want}")
  message(FATAL_ERROR "accelcore_example printed\n  ${got}\nbut the golden ids are\n  ${want}\n--- stdout\n${step_output}\n--- stderr\n${step_error}")
endif()
message(STATUS "accelcore_example output matches the 16 golden ids: ${got}")
