# Fails if a torch-free layer includes torch, ATen, c10, pybind11 or Python headers.
# Usage: cmake -DROOT=<repo root> -P layering_check.cmake
# Exempt: csrc/tessera/comm/pg/ (the c10d adapter, compiled into tessera_torch, not tessera_core).
if(NOT ROOT)
  message(FATAL_ERROR "layering_check: pass -DROOT=<repository root>")
endif()
get_filename_component(ROOT "${ROOT}" ABSOLUTE)

set(_layers core comm kernels shard checkpoint)
set(_files)
foreach(_layer IN LISTS _layers)
  file(GLOB_RECURSE _found LIST_DIRECTORIES false
       ${ROOT}/csrc/tessera/${_layer}/*.h ${ROOT}/csrc/tessera/${_layer}/*.hpp ${ROOT}/csrc/tessera/${_layer}/*.cc
       ${ROOT}/csrc/tessera/${_layer}/*.cpp ${ROOT}/csrc/tessera/${_layer}/*.cu ${ROOT}/csrc/tessera/${_layer}/*.cuh)
  list(APPEND _files ${_found})
endforeach()

# Only real include directives count (a comment that names a header is fine); `#  include` with spaces too.
set(_forbidden "^[ \t]*#[ \t]*include[ \t]*[<\"](torch/|ATen/|c10/|c10d/|pybind11/|Python\\.h|torch\\.h)")
set(_violations 0)
foreach(_file IN LISTS _files)
  file(RELATIVE_PATH _rel ${ROOT} ${_file})
  if(_rel MATCHES "^csrc/tessera/comm/pg/")
    continue()
  endif()
  file(STRINGS ${_file} _lines REGEX "^[ \t]*#[ \t]*include")
  foreach(_line IN LISTS _lines)
    if(_line MATCHES "${_forbidden}")
      # NOTICE is printed unwrapped, so the fixture test can match it.
      message(NOTICE "layering_check: ${_rel} includes a torch/pybind11 header: ${_line}")
      math(EXPR _violations "${_violations} + 1")
    endif()
  endforeach()
endforeach()

list(LENGTH _files _count)
if(_count EQUAL 0)
  message(FATAL_ERROR "layering_check: no sources under ${ROOT}/csrc/tessera; is ROOT the repository root?")
endif()
if(_violations GREATER 0)
  message(FATAL_ERROR "layering_check: ${_violations} forbidden include(s) in ${_count} files. "
                      "csrc/tessera/{core,comm,kernels,shard,checkpoint} must stay torch-free (DESIGN.md section 2); "
                      "torch code belongs in csrc/tessera/torch/ or, for the c10d adapter, csrc/tessera/comm/pg/.")
endif()
string(REPLACE ";" "," _layer_list "${_layers}")
message(STATUS "layering_check: ${_count} files in csrc/tessera/{${_layer_list}} are torch-free")
