# GoogleTest from the system (Debian: libgtest-dev). Never downloaded.
find_package(GTest REQUIRED)
