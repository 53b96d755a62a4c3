// Per-request sampling parameters, as in vLLM's SamplingParams.
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

namespace accelcore {

struct SamplingParams {
  int max_tokens = 16;         // generated tokens at most (>= 0)
  float temperature = 1.0f;    // 0 means greedy (argmax, ties to the lowest token id)
  int top_k = -1;              // <= 0 disables; otherwise keep the k most likely tokens
  float top_p = 1.0f;          // in (0, 1]; 1 disables nucleus filtering
  std::optional<uint64_t> seed;  // unset: the engine derives one from its own seed and the request id
  std::vector<int32_t> stop_token_ids;  // extra tokens that end the request (kept in the output)
  bool ignore_eos = false;     // keep generating past the model's EOS token(s)
  int logprobs = -1;           // >= 0: return that many top log-probabilities per generated token
  int prompt_logprobs = -1;    // >= 0: likewise for each prompt position after the first

  bool greedy() const { return temperature <= 0.0f; }
  // Throws InvalidArgument naming the bad field.
  void validate() const;
};

}  // namespace accelcore
