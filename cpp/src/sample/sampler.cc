#include "sample/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "sample/philox.h"
#include "util/check.h"

namespace accelcore {

void SamplingParams::validate() const {
  ACCEL_CHECK(max_tokens >= 0, InvalidArgument) << "max_tokens must be >= 0, got " << max_tokens;
  ACCEL_CHECK(std::isfinite(temperature) && temperature >= 0.0f, InvalidArgument)
      << "temperature must be a finite number >= 0, got " << temperature;
  ACCEL_CHECK(top_k >= -1, InvalidArgument) << "top_k must be -1 (off) or >= 0, got " << top_k;
  ACCEL_CHECK(std::isfinite(top_p) && top_p > 0.0f && top_p <= 1.0f, InvalidArgument)
      << "top_p must be in (0, 1], got " << top_p;
  ACCEL_CHECK(logprobs >= -1, InvalidArgument) << "logprobs must be >= 0 (or -1 for none), got " << logprobs;
  ACCEL_CHECK(prompt_logprobs >= -1, InvalidArgument)
      << "prompt_logprobs must be >= 0 (or -1 for none), got " << prompt_logprobs;
}

int32_t argmax(const float* logits, int vocab) {
  int32_t best = 0;
  float bv = logits[0];
  for (int i = 1; i < vocab; ++i) {
    // Strictly greater keeps the lowest id on ties; a NaN first entry is replaced by any number.
    if (logits[i] > bv || (std::isnan(bv) && !std::isnan(logits[i]))) {
      bv = logits[i];
      best = i;
    }
  }
  return best;
}

void processed_probs(const float* logits, int vocab, const SamplingParams& params, std::vector<double>* probs) {
  probs->assign(vocab, 0.0);
  const double inv_t = 1.0 / static_cast<double>(params.temperature);
  double mx = -INFINITY;
  for (int i = 0; i < vocab; ++i) mx = std::max(mx, static_cast<double>(logits[i]));
  // Top-k: keep tokens whose logit is at least the k-th largest (ties at the boundary kept).
  double threshold = -INFINITY;
  if (params.top_k > 0 && params.top_k < vocab) {
    std::vector<float> tmp(logits, logits + vocab);
    std::nth_element(tmp.begin(), tmp.begin() + (params.top_k - 1), tmp.end(), std::greater<float>());
    threshold = tmp[params.top_k - 1];
  }
  double sum = 0.0;
  for (int i = 0; i < vocab; ++i) {
    if (static_cast<double>(logits[i]) < threshold) continue;
    const double e = std::exp((static_cast<double>(logits[i]) - mx) * inv_t);
    (*probs)[i] = e;
    sum += e;
  }
  for (double& p : *probs) p /= sum;
  if (params.top_p < 1.0f) {
    // Nucleus: the most likely tokens (ties by lower id) until their mass reaches top_p; the token
    // that crosses the threshold is kept.
    std::vector<int32_t> order(vocab);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return (*probs)[a] > (*probs)[b]; });
    double cum = 0.0, kept = 0.0;
    size_t i = 0;
    for (; i < order.size(); ++i) {
      const double p = (*probs)[order[i]];
      if (p <= 0.0) break;
      cum += p;
      kept += p;
      if (cum >= static_cast<double>(params.top_p)) {
        ++i;
        break;
      }
    }
    for (; i < order.size(); ++i) (*probs)[order[i]] = 0.0;
    for (double& p : *probs) p /= kept;
  }
}

int32_t sample_token(const float* logits, int vocab, const SamplingParams& params, uint64_t seed, uint64_t position,
                     std::vector<double>* scratch) {
  if (params.greedy()) return argmax(logits, vocab);
  processed_probs(logits, vocab, params, scratch);
  const double u = uniform_at(seed, position);
  double cum = 0.0;
  int32_t last = -1;
  for (int i = 0; i < vocab; ++i) {
    const double p = (*scratch)[i];
    if (p <= 0.0) continue;
    cum += p;
    last = i;
    if (u < cum) return i;
  }
  ACCEL_DCHECK(last >= 0);
  return last;  // u landed in the rounding gap at the top: the last token with mass
}

void top_logprobs(const float* logits, int vocab, int k, int32_t taken, TokenLogprobs* out) {
  double mx = -INFINITY;
  for (int i = 0; i < vocab; ++i) mx = std::max(mx, static_cast<double>(logits[i]));
  double sum = 0.0;
  for (int i = 0; i < vocab; ++i) sum += std::exp(static_cast<double>(logits[i]) - mx);
  const double lse = mx + std::log(sum);
  auto lp = [&](int32_t i) { return static_cast<float>(static_cast<double>(logits[i]) - lse); };
  out->clear();
  if (k > 0) {
    k = std::min(k, vocab);
    std::vector<int32_t> order(vocab);
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int32_t a, int32_t b) {
      return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
    });
    for (int i = 0; i < k; ++i) (*out)[order[i]] = lp(order[i]);
  }
  if (taken >= 0) (*out)[taken] = lp(taken);
}

}  // namespace accelcore
