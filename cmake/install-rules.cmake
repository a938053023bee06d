# Install rules and the CMake package, so that another project can write
#   find_package(deltatune REQUIRED)
#   target_link_libraries(app PRIVATE deltatune::deltatune)   # and deltatune::cuda, see below
# Included from the top-level CMakeLists.txt after every target is defined, when
# DELTATUNE_INSTALL is on (the default when deltatune is the top-level project).
#
# Layout under the prefix:
#   include/deltatune/...                    the headers (the library itself)
#   lib/cmake/deltatune/                     deltatuneConfig.cmake, -ConfigVersion, -Targets, torch_openmp.cmake
#   share/deltatune/deltatune_cuda.cu        deltatune::cuda's INTERFACE source (when that target exists)
include(CMakePackageConfigHelpers)

set(DELTATUNE_INSTALL_CMAKEDIR "${CMAKE_INSTALL_LIBDIR}/cmake/deltatune"
    CACHE STRING "Where deltatune's CMake package files are installed, relative to the prefix")
mark_as_advanced(DELTATUNE_INSTALL_CMAKEDIR)

install(DIRECTORY "${PROJECT_SOURCE_DIR}/include/"
        DESTINATION "${CMAKE_INSTALL_INCLUDEDIR}"
        COMPONENT deltatune_development
        FILES_MATCHING PATTERN "*.hpp" PATTERN "*.cuh")

# The CUDA kernels are a second INTERFACE target whose one source, a .cu file, is
# compiled inside the consumer's target; the config file records whether it was exported.
set(deltatune_targets deltatune)
set(DELTATUNE_HAS_CUDA_TARGET OFF)
if(TARGET deltatune_cuda)
  list(APPEND deltatune_targets deltatune_cuda)
  # Installed under its build-tree alias, deltatune::cuda (not deltatune::deltatune_cuda).
  set_target_properties(deltatune_cuda PROPERTIES EXPORT_NAME cuda)
  set(DELTATUNE_HAS_CUDA_TARGET ON)
  install(FILES "${PROJECT_SOURCE_DIR}/cmake/deltatune_cuda.cu"
          DESTINATION "${CMAKE_INSTALL_DATADIR}/deltatune"
          COMPONENT deltatune_development)
endif()

if(TARGET deltatune_distributed)
  list(APPEND deltatune_targets deltatune_distributed)
  set_target_properties(deltatune_distributed PROPERTIES EXPORT_NAME distributed)
endif()

install(TARGETS ${deltatune_targets} EXPORT deltatuneTargets)
# The targets keep their links by name (torch, nlohmann_json::nlohmann_json, PkgConfig::sentencepiece):
# deltatuneConfig.cmake finds those packages before it loads this file.
install(EXPORT deltatuneTargets
        NAMESPACE deltatune::
        DESTINATION "${DELTATUNE_INSTALL_CMAKEDIR}"
        COMPONENT deltatune_development)

configure_package_config_file(
  "${PROJECT_SOURCE_DIR}/cmake/deltatuneConfig.cmake.in"
  "${PROJECT_BINARY_DIR}/deltatuneConfig.cmake"
  INSTALL_DESTINATION "${DELTATUNE_INSTALL_CMAKEDIR}")
# Header-only, so one package serves 32- and 64-bit consumers alike.
write_basic_package_version_file(
  "${PROJECT_BINARY_DIR}/deltatuneConfigVersion.cmake"
  COMPATIBILITY SameMajorVersion
  ARCH_INDEPENDENT)
install(FILES "${PROJECT_BINARY_DIR}/deltatuneConfig.cmake"
              "${PROJECT_BINARY_DIR}/deltatuneConfigVersion.cmake"
              "${PROJECT_SOURCE_DIR}/cmake/torch_openmp.cmake"
        DESTINATION "${DELTATUNE_INSTALL_CMAKEDIR}"
        COMPONENT deltatune_development)
