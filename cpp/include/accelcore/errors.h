// Exceptions thrown across the public API. Every error a caller can cause is one of these, so
// bindings map them to the right host-language exception (Python: ValueError, FileNotFoundError).
#pragma once

#include <stdexcept>
#include <string>

namespace accelcore {

// Base of all accelcore errors.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A caller passed a bad value (out-of-range token id, negative max_tokens, bad option).
class InvalidArgument : public Error {
 public:
  using Error::Error;
};

// A file or directory the caller named does not exist.
class NotFound : public Error {
 public:
  using Error::Error;
};

// A file exists but its content is malformed (corrupt safetensors header, bad config.json).
class FormatError : public Error {
 public:
  using Error::Error;
};

// The input is well formed but asks for something this build does not support
// (an unknown architecture, a device that is not compiled in or not present).
class Unsupported : public Error {
 public:
  using Error::Error;
};

// An internal invariant failed: a bug in accelcore, reported instead of aborting.
class InternalError : public Error {
 public:
  using Error::Error;
};

}  // namespace accelcore
