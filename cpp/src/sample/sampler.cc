#include "sample/sampler.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>

#include "backend/cpu/ops.h"
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

namespace {

// The largest of n values, NaNs skipped (-inf if all are NaN), in eight running maxima: independent
// chains, not one dependent compare per value.
float row_max(const float* x, int n) {
  float part[8];
  std::fill(part, part + 8, -INFINITY);
  int i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) part[j] = x[i + j] > part[j] ? x[i + j] : part[j];
  for (int j = 0; i + j < n; ++j) part[j] = x[i + j] > part[j] ? x[i + j] : part[j];
  return *std::max_element(part, part + 8);
}

// Nucleus filtering over `order`, the likeliest tokens sorted by probability (ties by lower id):
// those tokens until their mass reaches top_p, the one that crosses it included, are kept and
// renormalised, all others get 0. Returns false, probs untouched, if the mass of the tokens in
// `order` never reaches top_p, unless `order` is the whole vocabulary: then nothing is cut.
bool keep_sorted_prefix(const std::vector<int32_t>& order, double top_p, std::vector<double>* probs) {
  double cum = 0.0;
  size_t i = 0;
  bool reached = false;
  for (; i < order.size(); ++i) {
    const double p = (*probs)[order[i]];
    if (p <= 0.0) {  // no mass left: all that has any is kept
      reached = true;
      break;
    }
    cum += p;
    if (cum >= top_p) {
      ++i;
      reached = true;
      break;
    }
  }
  std::vector<double>& pr = *probs;
  if (!reached && order.size() < pr.size()) return false;
  if (i == 0) return true;  // nothing has mass (NaN logits): left as it is
  // The kept tokens are those ranked at or before the last one taken.
  const double pl = pr[order[i - 1]];
  const int32_t il = order[i - 1];
  for (int32_t t = 0; t < static_cast<int32_t>(pr.size()); ++t)
    if (pr[t] < pl || (pr[t] == pl && t > il)) pr[t] = 0.0;
  for (double& p : pr) p /= cum;
  return true;
}

// Sorts `order` (token ids in increasing order) by probability, highest first, ties staying in id
// order: what a stable sort does, by a least-significant-digit radix sort on the probabilities'
// bits (non-negative doubles order as their bit patterns) where there are many, 11 bits a pass,
// passes on which all keys agree skipped. A comparison sort of a nearly flat 32000-token
// distribution's nucleus took 3.5 ms.
void sort_by_probability(const std::vector<double>& pr, std::vector<int32_t>* order) {
  const size_t n = order->size();
  if (n < 1024) {
    std::stable_sort(order->begin(), order->end(), [&](int32_t a, int32_t b) { return pr[a] > pr[b]; });
    return;
  }
  std::vector<uint64_t> key(n), key2(n);
  std::vector<int32_t> id2(n);
  for (size_t i = 0; i < n; ++i) {
    std::memcpy(&key[i], &pr[(*order)[i]], sizeof(uint64_t));
    key[i] = ~key[i];  // ascending keys: descending probabilities
  }
  constexpr int kBits = 11;
  std::vector<uint32_t> count(size_t{1} << kBits);
  for (int shift = 0; shift < 64; shift += kBits) {
    std::fill(count.begin(), count.end(), 0u);
    for (size_t i = 0; i < n; ++i) ++count[(key[i] >> shift) & ((1u << kBits) - 1)];
    if (count[(key[0] >> shift) & ((1u << kBits) - 1)] == n) continue;  // one digit for all
    uint32_t sum = 0;
    for (uint32_t& c : count) {
      const uint32_t k = c;
      c = sum;
      sum += k;
    }
    for (size_t i = 0; i < n; ++i) {
      const uint32_t pos = count[(key[i] >> shift) & ((1u << kBits) - 1)]++;
      key2[pos] = key[i];
      id2[pos] = (*order)[i];
    }
    key.swap(key2);
    order->swap(id2);
  }
}

// Top-p filtering. Sorting the whole vocabulary for it cost 3.9 ms a sampled row at 32000 tokens
// (top_p 0.9; a batch-16 TinyLlama step on two threads spent 30 of its 150-170 ms on it), while
// the nucleus of a trained model's distribution is usually a few dozen tokens. So
// the tokens' masses are summed per power of two below the largest probability, the candidates
// are the tokens in the fewest such ranges that hold top_p of the mass, and only they are sorted.
// The sorted prefix, its running sum and so the result are those of sorting everything; where the
// range sums (added in another order) misjudge the mass by a rounding, the whole vocabulary is
// sorted after all.
void keep_nucleus(double top_p, std::vector<double>* probs) {
  std::vector<double>& pr = *probs;
  const int vocab = static_cast<int>(pr.size());
  double pmax = 0.0;
  for (double p : pr) pmax = p > pmax ? p : pmax;
  std::vector<int32_t> order;
  auto exponent = [](double p) {
    uint64_t b;
    std::memcpy(&b, &p, sizeof b);
    return static_cast<int>((b >> 52) & 0x7ff);
  };
  if (std::isfinite(pmax) && pmax > 0.0) {
    constexpr int kRanges = 64;  // the last one holds everything further below
    double mass[kRanges] = {};
    const int emax = exponent(pmax);
    for (int t = 0; t < vocab; ++t)
      if (pr[t] > 0.0) mass[std::min(emax - exponent(pr[t]), kRanges - 1)] += pr[t];
    double cum = 0.0;
    int last = 0;
    for (; last < kRanges - 1; ++last)
      if ((cum += mass[last]) >= top_p) break;
    for (int32_t t = 0; t < vocab; ++t)
      if (pr[t] > 0.0 && emax - exponent(pr[t]) <= last) order.push_back(t);
    if (static_cast<int>(order.size()) < vocab) {
      sort_by_probability(pr, &order);
      if (keep_sorted_prefix(order, top_p, probs)) return;
    }
  }
  order.resize(vocab);
  std::iota(order.begin(), order.end(), 0);
  sort_by_probability(pr, &order);
  keep_sorted_prefix(order, top_p, probs);
}

}  // namespace

int32_t argmax(const float* logits, int vocab) {
  // The first index holding the maximum: the lowest id on ties; 0 if every entry is NaN.
  const float m = row_max(logits, vocab);
  for (int i = 0; i < vocab; ++i)
    if (logits[i] == m) return i;
  return 0;
}

void processed_probs(const float* logits, int vocab, const SamplingParams& params, std::vector<double>* probs) {
  probs->resize(vocab);  // every entry is written below
  const double inv_t = 1.0 / static_cast<double>(params.temperature);
  const double mx = row_max(logits, vocab);
  // Top-k: keep tokens whose logit is at least the k-th largest (ties at the boundary kept).
  double threshold = -INFINITY;
  if (params.top_k > 0 && params.top_k < vocab) {
    std::vector<float> tmp(logits, logits + vocab);
    std::nth_element(tmp.begin(), tmp.begin() + (params.top_k - 1), tmp.end(), std::greater<float>());
    threshold = tmp[params.top_k - 1];
  }
  cpu::SoftmaxExpParams sp;
  sp.x = logits;
  sp.out = probs->data();
  sp.n = vocab;
  sp.max = mx;
  sp.inv_temperature = inv_t;
  sp.threshold = threshold;
  const double sum = cpu::softmax_exps(sp);
  for (double& p : *probs) p /= sum;
  if (params.top_p < 1.0f) keep_nucleus(static_cast<double>(params.top_p), probs);
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
  const double mx = row_max(logits, vocab);
  thread_local std::vector<double> exps;  // a prompt's logprobs ask for one row per prompt token
  exps.resize(vocab);
  cpu::SoftmaxExpParams sp;
  sp.x = logits;
  sp.out = exps.data();
  sp.n = vocab;
  sp.max = mx;
  const double lse = mx + std::log(cpu::softmax_exps(sp));
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
