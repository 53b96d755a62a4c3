// CHECK for conditions a caller can violate (throws the named accelcore error with a message);
// DCHECK for internal invariants (throws InternalError; compiled out with NDEBUG unless
// ACCELCORE_ENABLE_DCHECK is defined). Library code never aborts.
#pragma once

#include <accelcore/errors.h>

#include <sstream>
#include <string>

namespace accelcore::detail {

// Collects a message with operator<< and throws it when destroyed at the end of the statement.
template <typename E>
class Thrower {
 public:
  explicit Thrower(const char* prefix) { os_ << prefix; }
  template <typename T>
  Thrower& operator<<(const T& v) {
    os_ << v;
    return *this;
  }
  [[noreturn]] ~Thrower() noexcept(false) { throw E(os_.str()); }

 private:
  std::ostringstream os_;
};

}  // namespace accelcore::detail

// Usage: ACCEL_CHECK(n >= 0, InvalidArgument) << "max_tokens must be >= 0, got " << n;
#define ACCEL_CHECK(cond, ErrorType) \
  if (cond) {                        \
  } else                             \
    ::accelcore::detail::Thrower<::accelcore::ErrorType>("")

#define ACCEL_THROW(ErrorType) ::accelcore::detail::Thrower<::accelcore::ErrorType>("")

#if !defined(NDEBUG) || defined(ACCELCORE_ENABLE_DCHECK)
#define ACCEL_DCHECK(cond)                                                              \
  if (cond) {                                                                           \
  } else                                                                                \
    ::accelcore::detail::Thrower<::accelcore::InternalError>("internal check failed: " #cond \
                                                             " at " __FILE__ ": ")
#else
#define ACCEL_DCHECK(cond) \
  if (true) {              \
  } else                   \
    ::accelcore::detail::Thrower<::accelcore::InternalError>("")
#endif
