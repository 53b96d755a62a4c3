// Philox4x32-10 against the Random123 known-answer vectors (kat_vectors), and uniform_at's range,
// determinism and uniformity.
#include <gtest/gtest.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <set>

#include "sample/philox.h"

namespace accelcore {
namespace {

struct Kat {
  std::array<uint32_t, 4> ctr;
  std::array<uint32_t, 2> key;
  std::array<uint32_t, 4> out;
};

// Random123 kat_vectors, "philox4x32 10 CTR[4] KEY[2] EXPECTED[4]".
const Kat kKats[] = {
    {{0x00000000, 0x00000000, 0x00000000, 0x00000000}, {0x00000000, 0x00000000},
     {0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}},
    {{0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff}, {0xffffffff, 0xffffffff},
     {0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}},
    {{0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344}, {0xa4093822, 0x299f31d0},
     {0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}},
};

TEST(Philox, KnownAnswerVectors) {
  for (const Kat& k : kKats) {
    const std::array<uint32_t, 4> got = philox4x32_10(k.ctr, k.key);
    for (int i = 0; i < 4; ++i) {
      EXPECT_EQ(got[i], k.out[i]) << std::hex << "ctr " << k.ctr[0] << " word " << i << ": got 0x" << got[i]
                                  << ", want 0x" << k.out[i];
    }
  }
}

TEST(Philox, EveryInputWordMatters) {
  const std::array<uint32_t, 4> base = philox4x32_10({1, 2, 3, 4}, {5, 6});
  for (int i = 0; i < 4; ++i) {
    std::array<uint32_t, 4> c = {1, 2, 3, 4};
    c[i] ^= 1u;
    EXPECT_NE(philox4x32_10(c, {5, 6}), base) << "counter word " << i;
  }
  EXPECT_NE(philox4x32_10({1, 2, 3, 4}, {4, 6}), base);
  EXPECT_NE(philox4x32_10({1, 2, 3, 4}, {5, 7}), base);
}

TEST(UniformAt, InRangeAndDeterministic) {
  std::set<double> distinct;
  for (uint64_t seed : {0ull, 1ull, 42ull, 0xdeadbeefcafef00dull}) {
    for (uint64_t pos = 0; pos < 2000; ++pos) {
      const double u = uniform_at(seed, pos);
      ASSERT_GE(u, 0.0);
      ASSERT_LT(u, 1.0);
      ASSERT_EQ(u, uniform_at(seed, pos));  // a pure function of (seed, position)
      distinct.insert(u);
    }
  }
  EXPECT_EQ(distinct.size(), 8000u);  // 53-bit values: collisions would mean a broken mapping
}

TEST(UniformAt, SeedPositionAndStreamAllMatter) {
  // High and low halves of the 64-bit seed and position each change the value.
  const double u = uniform_at(7, 11);
  EXPECT_NE(uniform_at(7 + (1ull << 32), 11), u);
  EXPECT_NE(uniform_at(8, 11), u);
  EXPECT_NE(uniform_at(7, 11 + (1ull << 32)), u);
  EXPECT_NE(uniform_at(7, 12), u);
  EXPECT_NE(uniform_at(7, 11, 1), u);
  EXPECT_EQ(uniform_at(7, 11, 0), u);  // stream 0 is the default
}

TEST(UniformAt, RoughlyUniform) {
  // Chi-square over 10 equal bins, 100k draws along consecutive positions (how the sampler uses it).
  // 9 degrees of freedom: P(chi2 > 40) is about 7e-6, so a bound of 40 only fails for a real bias.
  const int kDraws = 100000, kBins = 10;
  for (uint64_t seed : {0ull, 12345ull}) {
    int counts[kBins] = {};
    double sum = 0.0;
    for (int i = 0; i < kDraws; ++i) {
      const double u = uniform_at(seed, static_cast<uint64_t>(i));
      ++counts[static_cast<int>(u * kBins)];
      sum += u;
    }
    const double expected = static_cast<double>(kDraws) / kBins;
    double chi2 = 0.0;
    for (int c : counts) chi2 += (c - expected) * (c - expected) / expected;
    EXPECT_LT(chi2, 40.0) << "seed " << seed;
    EXPECT_NEAR(sum / kDraws, 0.5, 0.005);  // sd of the mean is ~0.0009
  }
  // Across seeds at a fixed position as well (a request's first token uses position 0).
  int counts[kBins] = {};
  for (int s = 0; s < kDraws; ++s) ++counts[static_cast<int>(uniform_at(static_cast<uint64_t>(s), 0) * kBins)];
  double chi2 = 0.0;
  for (int c : counts) chi2 += (c - kDraws / kBins) * (c - kDraws / kBins) / double(kDraws / kBins);
  EXPECT_LT(chi2, 40.0);
}

}  // namespace
}  // namespace accelcore
