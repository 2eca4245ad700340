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
# torch's CMake config adds -gencode flags for every architecture it detects (or a list starting at sm_50, which
# nvcc 13 rejects, when there is no GPU) and resets CMAKE_CUDA_ARCHITECTURES: pin ours and restore it afterwards.
if(NOT DEFINED ENV{TORCH_CUDA_ARCH_LIST})
  set(ENV{TORCH_CUDA_ARCH_LIST} "8.0;9.0")
endif()
set(_tessera_cuda_archs "${CMAKE_CUDA_ARCHITECTURES}")
set(_tessera_cuda_flags "${CMAKE_CUDA_FLAGS}")
find_package(Torch REQUIRED)
if(_tessera_cuda_archs)
  set(CMAKE_CUDA_ARCHITECTURES "${_tessera_cuda_archs}")
endif()
set(CMAKE_CUDA_FLAGS "${_tessera_cuda_flags}")
get_filename_component(TORCH_INSTALL_PREFIX "${TORCH_INCLUDE_DIRS}" DIRECTORY)
list(GET TORCH_INCLUDE_DIRS 0 _tessera_torch_inc0)
get_filename_component(TORCH_INSTALL_PREFIX "${_tessera_torch_inc0}" DIRECTORY)
