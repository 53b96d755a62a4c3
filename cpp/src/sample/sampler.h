// Turning one row of logits into a token: greedy (argmax, lowest id on ties) or a draw from the
// processed distribution (temperature, top-k, top-p) with the counter-based RNG.
#pragma once

#include <accelcore/engine.h>
#include <accelcore/sampling.h>

#include <cstdint>
#include <vector>

namespace accelcore {

int32_t argmax(const float* logits, int vocab);  // first maximal index; NaN never wins

// The processed distribution the sampler draws from: probabilities over the full vocabulary
// (zero outside top-k/top-p), as doubles for a stable cumulative sum. Their exps come from
// cpu::softmax_exps (within 2 ulp of std::exp; 0 below exp(-708)), the same bits on every ISA.
void processed_probs(const float* logits, int vocab, const SamplingParams& params, std::vector<double>* probs);

// Samples with u = uniform(seed, position): the first token id whose cumulative probability (in
// id order) exceeds u. Greedy params return argmax.
int32_t sample_token(const float* logits, int vocab, const SamplingParams& params, uint64_t seed,
                     uint64_t position, std::vector<double>* scratch);

// log_softmax of the raw logits; fills `out` with the top-k entries plus `taken`.
void top_logprobs(const float* logits, int vocab, int k, int32_t taken, TokenLogprobs* out);

}  // namespace accelcore
