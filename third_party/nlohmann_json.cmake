# nlohmann/json from the system (Debian: nlohmann-json3-dev; pip builds may also use a CMake
# package found on CMAKE_PREFIX_PATH). Header-only and used privately.
find_package(nlohmann_json 3.9 REQUIRED)
