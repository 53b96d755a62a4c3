// What one decode step of a small model costs through the public C++ API, without Python: one
// request at a time on stories260K (or the model given), each step timed around Engine::step().
// Plain decoding, then Lookahead with fixed drafts of 4 nodes; per mode the median, 10th and
// 90th percentile of the step time and the engine's own split (forward pass, scheduling), and the
// median of the prompts' prefill steps (101 tokens, one step each) per token. The
// prompts (a BOS and 100 tokens of an arithmetic pattern, different per request) repeat enough for
// drafts to be accepted about 30% of the time; 150 tokens are generated per request, 20 requests.
//
//   build-bench/benchmarks/cpp/step_bench [model_dir] [threads]
// (an empty model_dir: $ACCELCORE_TEST_MODEL, else ../shared/models/stories260K)
#include <accelcore/engine.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>
#include <vector>

using namespace accelcore;

namespace {

void run(const std::string& model, int threads, bool speculate) {
  EngineConfig c;
  c.model_path = model;
  c.num_threads = threads;
  if (speculate) c.speculation = "lookahead", c.spec_policy = "fixed", c.spec_max_draft = 4;
  Engine engine(c);
  std::vector<double> us, prefill;
  for (int rep = 0; rep < 20; ++rep) {
    std::vector<int32_t> prompt{1};
    for (int i = 0; i < 100; ++i) prompt.push_back(3 + (i * 37 + rep) % (engine.model_info().vocab_size - 3));
    SamplingParams sp;
    sp.max_tokens = 150;
    sp.temperature = 0;
    sp.ignore_eos = true;
    engine.add_request(prompt, sp);
    const auto p0 = std::chrono::steady_clock::now();
    engine.step();  // the prefill
    prefill.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - p0).count() /
                      static_cast<double>(prompt.size()));
    while (engine.has_unfinished_requests()) {
      const auto t0 = std::chrono::steady_clock::now();
      engine.step();
      us.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
    }
  }
  std::sort(us.begin(), us.end());
  std::sort(prefill.begin(), prefill.end());
  const EngineStats s = engine.stats();
  const double n = static_cast<double>(s.num_steps);
  std::printf("| %s | %d | %.1f | %.1f | %.1f | %.1f | %.1f | %.2f | %.2f |\n", speculate ? "lookahead fixed:4" : "plain",
              threads, us[us.size() / 2], us[us.size() / 10], us[us.size() * 9 / 10], s.forward_time_s / n * 1e6,
              s.schedule_time_s / n * 1e6, static_cast<double>(s.num_generated_tokens) / n, prefill[prefill.size() / 2]);
}

}  // namespace

int main(int argc, char** argv) {
  const char* env = std::getenv("ACCELCORE_TEST_MODEL");
  const std::string model = argc > 1 && argv[1][0] ? argv[1] : env ? env : "../shared/models/stories260K";
  const int threads = argc > 2 ? std::atoi(argv[2]) : 1;
  std::printf("model %s\n| mode | threads | step us p50 | p10 | p90 | forward us/step (mean, prefills included) | "
              "schedule us/step | tokens/step | prefill us/token |\n|---|---|---|---|---|---|---|---|---|\n",
              model.c_str());
  try {
    run(model, threads, false);
    run(model, threads, true);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "step_bench: %s\n", e.what());
    return 1;
  }
  return 0;
}
