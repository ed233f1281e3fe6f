# Helpers that let an interface package of this repository build with pip against the ROS 2 PyPI
# wheels (see interfaces/*/pyproject.toml). On a sourced ROS install both are no-ops.

# Built by pip against the wheels, nothing tells CMake where ROS is: the wheels install their
# CMake tree at the root of the Python environment (sys.prefix). Ask the interpreter that runs the
# build for it. On a sourced ROS install AMENT_PREFIX_PATH is set and this is skipped.
macro(ros_wheels_find_prefix)
  if("$ENV{AMENT_PREFIX_PATH}" STREQUAL "" OR SKBUILD)
    find_package(Python3 REQUIRED COMPONENTS Interpreter)
    execute_process(
      COMMAND "${Python3_EXECUTABLE}" -c "import sys; print(sys.prefix)"
      OUTPUT_VARIABLE _ros_wheels_prefix
      OUTPUT_STRIP_TRAILING_WHITESPACE
      COMMAND_ERROR_IS_FATAL ANY)
    if("$ENV{AMENT_PREFIX_PATH}" STREQUAL "")
      set(ENV{AMENT_PREFIX_PATH} "${_ros_wheels_prefix}")
    endif()
    list(APPEND CMAKE_PREFIX_PATH "${_ros_wheels_prefix}")
  endif()
endmacro()

# The wheels export `*__rosidl_generator_py` targets whose include directories name the Python
# headers of the machine that built the wheels (/opt/python/...); CMake's generate step rejects a
# non-existent include directory. Drop such entries from imported targets. On a normal ROS install
# every exported directory exists, so nothing is changed. Call it after ament_package().
macro(ros_wheels_drop_missing_include_dirs)
  get_property(_imported_targets DIRECTORY PROPERTY IMPORTED_TARGETS)
  foreach(_target IN LISTS _imported_targets)
    get_target_property(_dirs ${_target} INTERFACE_INCLUDE_DIRECTORIES)
    if(NOT _dirs)
      continue()
    endif()
    set(_kept "")
    set(_dropped FALSE)
    foreach(_dir IN LISTS _dirs)
      if(IS_ABSOLUTE "${_dir}" AND NOT _dir MATCHES "\\$<" AND NOT EXISTS "${_dir}")
        set(_dropped TRUE)
      else()
        list(APPEND _kept "${_dir}")
      endif()
    endforeach()
    if(_dropped)
      message(STATUS "${_target}: ignoring non-existent exported include directories")
      set_target_properties(${_target} PROPERTIES INTERFACE_INCLUDE_DIRECTORIES "${_kept}")
    endif()
  endforeach()
endmacro()
