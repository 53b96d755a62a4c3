// A request's state inside the engine: its tokens, how many of them have KV in the cache, and
// the blocks holding that KV.
#pragma once

#include <accelcore/engine.h>
#include <accelcore/sampling.h>

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

namespace accelcore {

using Clock = std::chrono::steady_clock;

struct Request {
  enum class Status { kWaiting, kRunning, kFinished };

  RequestId id = 0;
  std::vector<int32_t> prompt;
  std::vector<int32_t> output;
  SamplingParams params;
  uint64_t seed = 0;
  Status status = Status::kWaiting;
  FinishReason finish_reason = FinishReason::kNone;
  std::string error;  // why, when finish_reason is kError

  int num_computed = 0;          // leading tokens whose K/V are in the cache
  std::vector<int32_t> blocks;   // block table: position p lives in blocks[p / block_size]
  // Hashes of the leading full blocks of known tokens (prompt, then output), as far as computed.
  std::vector<uint64_t> block_hashes;
  int num_cached_tokens = 0;     // prompt tokens found in the prefix cache at (last) admission
  int num_preemptions = 0;
  int num_steps = 0;             // forward passes that produced tokens for it
  int num_draft_tokens = 0;      // draft nodes verified for it
  int num_accepted_draft_tokens = 0;
  // SmartSpec: this request's acceptance rate per draft depth ([d], d >= 1); empty until its
  // first verification (the global rates stand in).
  std::vector<float> spec_accept;
  int spec_match = -1;           // match length of its last draft proposal (-1: none yet)
  int spec_match_tokens = 0;     // its length (tokens) at that proposal
  int spec_steps_unprobed = 0;   // steps since that proposal

  std::vector<TokenLogprobs> prompt_logprobs;  // filled while the prompt is prefilled
  bool prompt_logprobs_done = false;           // emitted; a recompute after preemption skips them

  Clock::time_point arrival_time, first_token_time, last_token_time;

  int num_tokens() const { return static_cast<int>(prompt.size() + output.size()); }
  int32_t token_at(int i) const {
    const int np = static_cast<int>(prompt.size());
    return i < np ? prompt[i] : output[i - np];
  }
  bool wants_prompt_logprobs() const { return params.prompt_logprobs >= 0 && !prompt_logprobs_done; }
};

}  // namespace accelcore
