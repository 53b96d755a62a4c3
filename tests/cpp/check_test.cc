// ACCEL_CHECK's messages: numbers written as the classic-locale std::ostream writes them, whatever
// the process's global locale, and the right error type thrown.
#include <gtest/gtest.h>

#include <cstdint>
#include <limits>
#include <locale>
#include <sstream>
#include <string>
#include <string_view>

#include "util/check.h"

namespace accelcore {
namespace {

template <typename T>
std::string classic(const T& v) {
  std::ostringstream os;
  os.imbue(std::locale::classic());
  os << v;
  return os.str();
}

template <typename T>
std::string message_of(const T& v) {
  try {
    ACCEL_CHECK(false, InvalidArgument) << "v=" << v << ".";
  } catch (const InvalidArgument& e) {
    return e.what();
  }
  return "(not thrown)";
}

// A locale that groups thousands with '.' and writes ',' as the decimal point (as de_DE does),
// without depending on which named locales the machine has installed.
struct GermanPunct : std::numpunct<char> {
  char do_decimal_point() const override { return ','; }
  char do_thousands_sep() const override { return '.'; }
  std::string do_grouping() const override { return "\3"; }
};

class GlobalLocale : public ::testing::Test {
 protected:
  void SetUp() override { saved_ = std::locale::global(std::locale(std::locale::classic(), new GermanPunct)); }
  void TearDown() override { std::locale::global(saved_); }

 private:
  std::locale saved_;
};

TEST(CheckMessage, NumbersReadAsTheClassicStreamWritesThem) {
  for (int v : {0, 7, -42, std::numeric_limits<int>::min(), std::numeric_limits<int>::max()})
    EXPECT_EQ(message_of(v), "v=" + classic(v) + ".");
  for (double v : {0.0, 0.5, -1.25, 1e-7, 123456789.0, 3.14159265358979, 1e300})
    EXPECT_EQ(message_of(v), "v=" + classic(v) + ".") << v;
  for (float v : {0.1f, 2.5e10f}) EXPECT_EQ(message_of(v), "v=" + classic(v) + ".") << v;
  EXPECT_EQ(message_of(std::numeric_limits<std::int64_t>::min()),
            "v=" + classic(std::numeric_limits<std::int64_t>::min()) + ".");
  EXPECT_EQ(message_of(std::numeric_limits<std::size_t>::max()),
            "v=" + classic(std::numeric_limits<std::size_t>::max()) + ".");
}

TEST(CheckMessage, StringsCharsBoolsAndEnums) {
  enum class Kind : std::uint8_t { kA = 3 };
  EXPECT_EQ(message_of("text"), "v=text.");
  EXPECT_EQ(message_of(std::string("s")), "v=s.");
  EXPECT_EQ(message_of(std::string_view("sv")), "v=sv.");
  EXPECT_EQ(message_of('x'), "v=x.");
  EXPECT_EQ(message_of(true), "v=true.");
  EXPECT_EQ(message_of(Kind::kA), "v=3.");
  EXPECT_EQ(message_of(std::uint8_t{200}), "v=200.");  // a number, not a raw byte
}

TEST_F(GlobalLocale, MessagesDoNotFollowTheGlobalLocale) {
  std::ostringstream localized;
  localized << 1234567 << ' ' << 0.5;
  ASSERT_EQ(localized.str(), "1.234.567 0,5");  // the locale is in force for streams
  EXPECT_EQ(message_of(1234567), "v=1234567.");
  EXPECT_EQ(message_of(0.5), "v=0.5.");
}

TEST(CheckMessage, ThrowsTheNamedErrorOnlyWhenTheConditionFails) {
  EXPECT_NO_THROW(ACCEL_CHECK(true, NotFound) << "never formatted");
  EXPECT_THROW(ACCEL_CHECK(1 > 2, NotFound) << "missing " << 1, NotFound);
  EXPECT_THROW(ACCEL_THROW(FormatError) << "bad", FormatError);
}

}  // namespace
}  // namespace accelcore
