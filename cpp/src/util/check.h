// CHECK for conditions a caller can violate (throws the named accelcore error with a message);
// DCHECK for internal invariants (throws InternalError; compiled out with NDEBUG unless
// ACCELCORE_ENABLE_DCHECK is defined). Library code never aborts.
#pragma once

#include <accelcore/errors.h>

#include <cstdio>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

namespace accelcore::detail {

template <typename>
inline constexpr bool kUnformattable = false;

// Appends v as text without iostreams: the message does not depend on the global locale, and a
// libstdc++ linked statically into a shared object (as some g++ builds link it) crashed in the
// stream's number formatting (seen for the Python module built on a GPU machine's image).
// Numbers read as std::ostream writes them (%g for floating point), bools as true/false.
template <typename T>
void append(std::string& s, const T& v) {
  if constexpr (std::is_same_v<T, bool>) {
    s += v ? "true" : "false";
  } else if constexpr (std::is_same_v<T, char>) {
    s += v;
  } else if constexpr (std::is_integral_v<T>) {
    s += std::to_string(v);
  } else if constexpr (std::is_enum_v<T>) {
    s += std::to_string(static_cast<std::underlying_type_t<T>>(v));
  } else if constexpr (std::is_floating_point_v<T>) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%g", static_cast<double>(v));
    s += buf;
  } else if constexpr (std::is_convertible_v<const T&, std::string_view>) {
    s += std::string_view(v);
  } else {
    static_assert(kUnformattable<T>, "ACCEL_CHECK messages take numbers, enums and strings");
  }
}

// Collects a message with operator<< and throws it when destroyed at the end of the statement.
template <typename E>
class Thrower {
 public:
  explicit Thrower(const char* prefix) : msg_(prefix) {}
  template <typename T>
  Thrower& operator<<(const T& v) {
    append(msg_, v);
    return *this;
  }
  [[noreturn]] ~Thrower() noexcept(false) { throw E(std::move(msg_)); }

 private:
  std::string msg_;
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
