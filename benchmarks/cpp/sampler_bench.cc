// What sampling a token costs (sample_token: the processed distribution and the inverse CDF), per
// row, for stories260K's and TinyLlama's vocabularies and the usual sampling settings, at
// temperature 0.8. The top-p rows also time the nucleus as one full sort of the vocabulary (the
// earlier code, kept here as the baseline): the same probabilities, bit for bit, which this
// checks. Last, a greedy row (argmax) and a row's log-softmax with its 5 likeliest tokens
// (top_logprobs), as logprobs and prompt_logprobs ask for.
//
//   build-bench/benchmarks/cpp/sampler_bench [reps_scale=1]
// Logits: normal with standard deviation 3 (a trained language model's are more peaked, so its
// nucleus is smaller), and 0.3 for 32000 tokens (nearly flat, as a random model's: the nucleus is
// most of the vocabulary, the worst case for the top-p rows).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <vector>

#include "sample/sampler.h"

using namespace accelcore;

namespace {

std::vector<double> full_sort_nucleus(std::vector<double> p, double top_p) {
  std::vector<int32_t> order(p.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return p[a] > p[b]; });
  double cum = 0.0;
  size_t i = 0;
  for (; i < order.size(); ++i) {
    if (p[order[i]] <= 0.0) break;
    cum += p[order[i]];
    if (cum >= top_p) {
      ++i;
      break;
    }
  }
  for (; i < order.size(); ++i) p[order[i]] = 0.0;
  for (double& x : p) x /= cum;
  return p;
}

template <class F>
double median_us(F f, int reps) {
  std::vector<double> runs;
  for (int r = 0; r < 5; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < reps; ++i) f(i);
    runs.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() / reps);
  }
  std::sort(runs.begin(), runs.end());
  return runs[2];
}

}  // namespace

int main(int argc, char** argv) {
  const double scale = argc > 1 ? std::atof(argv[1]) : 1.0;
  std::printf("| vocab | logits' sd | top_k | top_p | sample_token us | top-p by full sort us (baseline) | ratio |\n"
              "|---|---|---|---|---|---|---|\n");
  struct Dist {
    int vocab;
    float sd;
  };
  for (const Dist dist : {Dist{512, 3.0f}, Dist{32000, 3.0f}, Dist{32000, 0.3f}}) {
    const int vocab = dist.vocab;
    std::mt19937 rng(1);
    std::normal_distribution<float> n(0.0f, dist.sd);
    std::vector<float> logits(vocab);
    for (float& l : logits) l = n(rng);
    const int reps = std::max(1, static_cast<int>((vocab == 512 ? 4000 : 60) * scale));
    struct Setting {
      int top_k;
      float top_p;
    };
    for (const Setting s : {Setting{-1, 1.0f}, Setting{50, 1.0f}, Setting{-1, 0.9f}, Setting{-1, 0.95f}, Setting{50, 0.9f}}) {
      SamplingParams p;
      p.temperature = 0.8f;
      p.top_k = s.top_k;
      p.top_p = s.top_p;
      std::vector<double> scratch;
      long sink = 0;
      const double us = median_us([&](int i) { sink += sample_token(logits.data(), vocab, p, 7, i, &scratch); }, reps);
      if (s.top_p >= 1.0f) {
        std::printf("| %d | %.1f | %d | 1 | %.2f | | |\n", vocab, dist.sd, s.top_k, us);
        continue;
      }
      // Baseline: the distribution without top-p, then the nucleus by a full sort.
      SamplingParams no_p = p;
      no_p.top_p = 1.0f;
      std::vector<double> plain, got;
      const double base = median_us([&](int) {
        processed_probs(logits.data(), vocab, no_p, &plain);
        plain = full_sort_nucleus(std::move(plain), s.top_p);
      }, reps);
      processed_probs(logits.data(), vocab, p, &got);
      if (got != plain) {
        std::fprintf(stderr, "sampler_bench: the nucleus differs from the full sort's (vocab %d)\n", vocab);
        return 1;
      }
      std::printf("| %d | %.1f | %d | %.2f | %.2f | %.2f | %.1fx |\n", vocab, dist.sd, s.top_k, s.top_p, us, base, base / us);
      if (sink < 0) return 1;  // keeps the calls
    }
    long picked = 0;
    const double greedy_us = median_us([&](int) { picked += argmax(logits.data(), vocab); }, reps * 4);
    std::printf("| %d | %.1f | greedy (argmax) | | %.2f | | |\n", vocab, dist.sd, greedy_us);
    if (picked < 0) return 1;  // keeps the calls
    TokenLogprobs lp;
    const double us = median_us([&](int i) { top_logprobs(logits.data(), vocab, 5, i % vocab, &lp); }, reps);
    std::printf("| %d | %.1f | top_logprobs, k = 5 | | %.2f | | |\n", vocab, dist.sd, us);
  }
  return 0;
}
