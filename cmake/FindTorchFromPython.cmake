# Locates the installed torch (the pip wheel) through the Python interpreter unless Torch_DIR is already set.
if(NOT Torch_DIR)
  find_package(Python REQUIRED COMPONENTS Interpreter)
  execute_process(
    COMMAND ${Python_EXECUTABLE} -c "import torch.utils; print(torch.utils.cmake_prefix_path)"
    OUTPUT_VARIABLE _tessera_torch_prefix OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE _tessera_torch_rc)
  if(NOT _tessera_torch_rc EQUAL 0)
    message(FATAL_ERROR "tessera: could not import torch with ${Python_EXECUTABLE}; install torch==2.11.0 first")
  endif()
  list(APPEND CMAKE_PREFIX_PATH "${_tessera_torch_prefix}")
endif()
find_package(Torch REQUIRED)
get_filename_component(TORCH_INSTALL_PREFIX "${TORCH_INCLUDE_DIRS}" DIRECTORY)
list(GET TORCH_INCLUDE_DIRS 0 _tessera_torch_inc0)
get_filename_component(TORCH_INSTALL_PREFIX "${_tessera_torch_inc0}" DIRECTORY)
