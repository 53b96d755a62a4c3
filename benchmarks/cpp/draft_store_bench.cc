// The draft store's costs on text-like token streams: indexing a finished output (every window
// of it into the trie) and a proposal, per token and per call, with a store of a few hundred
// outputs, as after stories260K's warm-up. Between calls a buffer is touched, as a forward pass
// touches its weights and activations (stories260K: about 2 MB), so that the store is as cold
// as it is in the engine.
//
//   build-bench/benchmarks/cpp/draft_store_bench [outputs=200] [length=256] [reps=5] [evict_mb=2]
//       [proposal_rounds=1]   (more rounds: a profile of the proposals, not of building the store)
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "spec/drafter.h"

namespace {

using accelcore::DraftTree;
using accelcore::Drafter;
using accelcore::DrafterConfig;

// Text-like streams: phrases of 3-10 tokens (vocabulary 512, Zipf-distributed) strung together,
// the phrases themselves chosen Zipf-distributed, so that short n-grams repeat often and long ones
// sometimes, as in TinyStories.
struct TextSource {
  std::mt19937 rng{7};
  std::vector<std::vector<int32_t>> phrases;
  std::vector<double> phrase_cdf;
  explicit TextSource(int num_phrases = 3000) {
    std::vector<double> token_w(512);
    for (size_t i = 0; i < token_w.size(); ++i) token_w[i] = 1.0 / (i + 1.0);
    std::discrete_distribution<int> token(token_w.begin(), token_w.end());
    std::uniform_int_distribution<int> len(3, 10);
    for (int p = 0; p < num_phrases; ++p) {
      std::vector<int32_t> ph(len(rng));
      for (auto& t : ph) t = token(rng);
      phrases.push_back(std::move(ph));
    }
    double s = 0;
    for (int p = 0; p < num_phrases; ++p) phrase_cdf.push_back(s += 1.0 / (p + 1.0));
  }
  std::vector<int32_t> text(int n) {
    std::uniform_real_distribution<double> u(0, phrase_cdf.back());
    std::vector<int32_t> out;
    while (static_cast<int>(out.size()) < n) {
      const auto& ph = phrases[std::lower_bound(phrase_cdf.begin(), phrase_cdf.end(), u(rng)) - phrase_cdf.begin()];
      out.insert(out.end(), ph.begin(), ph.end());
    }
    out.resize(n);
    return out;
  }
};

std::vector<char> g_evict;
void evict_caches() {
  for (size_t i = 0; i < g_evict.size(); i += 64) g_evict[i] += 1;
}

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

}  // namespace

int main(int argc, char** argv) {
  const int outputs = argc > 1 ? std::atoi(argv[1]) : 200;
  const int length = argc > 2 ? std::atoi(argv[2]) : 256;
  const int reps = argc > 3 ? std::atoi(argv[3]) : 5;
  g_evict.resize(static_cast<size_t>(argc > 4 ? std::atof(argv[4]) * (1 << 20) : 2 << 20));
  const int rounds = argc > 5 ? std::atoi(argv[5]) : 1;
  TextSource src;
  std::vector<double> index_us, propose_cold_us, propose_warm_us;
  for (int rep = 0; rep < reps; ++rep) {
    Drafter d(DrafterConfig{});
    for (int k = 0; k < outputs; ++k) {
      const auto t = src.text(length);
      d.add_output(t.data(), length);
    }
    d.flush();
    // Indexing: 20 new outputs, each timed on cold caches.
    double index_s = 0;
    for (int k = 0; k < 20; ++k) {
      const auto t = src.text(length);
      d.add_output(t.data(), length);
      evict_caches();
      const double t0 = now();
      d.flush();
      index_s += now() - t0;
    }
    index_us.push_back(index_s * 1e6 / (20.0 * length));
    // Proposals: for each position of a new text, on cold and on warm caches.
    const auto ctx = src.text(length);
    DraftTree tree;
    double cold = 0, warm = 0;
    int calls = 0;
    for (int round = 0; round < rounds; ++round) {
      for (int n = 16; n < length; n += 4, ++calls) {
        evict_caches();
        double t0 = now();
        d.propose(ctx.data(), n, 8, 8, &tree);
        cold += now() - t0;
        t0 = now();
        d.propose(ctx.data(), n, 8, 8, &tree);
        warm += now() - t0;
      }
    }
    propose_cold_us.push_back(cold * 1e6 / calls);
    propose_warm_us.push_back(warm * 1e6 / calls);
  }
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  std::printf("store of %d outputs of %d tokens, %.1f MB touched between calls, medians of %d runs\n", outputs, length,
              g_evict.size() / 1048576.0, reps);
  std::printf("| indexing, us per token (cold) | proposal, us (cold) | proposal, us (warm) |\n|---|---|---|\n");
  std::printf("| %.3f | %.3f | %.3f |\n", median(index_us), median(propose_cold_us), median(propose_warm_us));
  return 0;
}
