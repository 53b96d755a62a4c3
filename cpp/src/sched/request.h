// A request's state inside the engine: its tokens, how many of them have KV in the cache, and
// the blocks holding that KV.
#pragma once

#include <accelcore/engine.h>
#include <accelcore/sampling.h>

#include <chrono>
#include <cstdint>
#include <vector>

namespace accelcore {

struct Request {
  enum class Status { kWaiting, kRunning, kFinished };

  RequestId id = 0;
  std::vector<int32_t> prompt;
  std::vector<int32_t> output;
  SamplingParams params;
  uint64_t seed = 0;
  Status status = Status::kWaiting;
  FinishReason finish_reason = FinishReason::kNone;

  int num_computed = 0;          // leading tokens whose K/V are in the cache
  std::vector<int32_t> blocks;   // block table: position p lives in blocks[p / block_size]
  std::vector<TokenLogprobs> prompt_logprobs;  // filled while the prompt is prefilled

  int num_tokens() const { return static_cast<int>(prompt.size() + output.size()); }
  int32_t token_at(int i) const {
    const int np = static_cast<int>(prompt.size());
    return i < np ? prompt[i] : output[i - np];
  }
  bool prefilling() const { return num_computed < static_cast<int>(prompt.size()); }
};

}  // namespace accelcore
