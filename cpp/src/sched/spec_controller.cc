#include "sched/spec_controller.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <queue>

#include "util/check.h"

namespace accelcore {

// ---- StepTimeModel ----

StepFeatures step_features(const BatchPlan& plan) {
  StepFeatures f;
  f.tokens = plan.num_tokens();
  f.logit_rows = static_cast<double>(plan.logit_rows.size());
  f.seqs = plan.num_seqs();
  for (int32_t p : plan.positions) f.kv_tokens += p + 1.0;
  // A draft token carries extras; count each sequence once.
  int last_seq = -1;
  for (int t = 0; t + 1 < static_cast<int>(plan.extra_offset.size()); ++t)
    if (plan.extra_offset[t + 1] > plan.extra_offset[t] && plan.seq_of_token[t] != last_seq) {
      last_seq = plan.seq_of_token[t];
      f.drafted += 1;
    }
  return f;
}

int GoodputGuard::range(int seqs) {
  int r = 0;
  while (r + 1 < kRanges && (seqs >> (r + 1)) > 0) ++r;
  return r;
}

bool GoodputGuard::allow_drafts(int seqs) {
  if (seqs < kMinSeqs) return true;
  const int r = range(seqs);
  const bool probe = ++steps_[r] % kProbe == 0;
  const Side& without = sides_[r][0];
  const Side& with = sides_[r][1];
  if (without.n < kMinSteps) return !probe;
  if (with.n < kMinSteps) return true;
  const bool pays = with.tokens * without.seconds >= without.tokens * with.seconds;
  return probe ? !pays : pays;
}

void GoodputGuard::observe(int seqs, bool drafted, double tokens, double seconds) {
  if (seqs < kMinSeqs || seconds <= 0) return;
  Side& s = sides_[range(seqs)][drafted];
  const double a = s.n < kMinSteps ? 1.0 / (s.n + 1) : kAlpha;  // plain means first
  s.tokens += a * (tokens - s.tokens);
  s.seconds += a * (seconds - s.seconds);
  ++s.n;
}

double GoodputGuard::tokens_per_second(int seqs, bool drafted) const {
  const Side& s = sides_[range(seqs)][drafted];
  return s.n > 0 && s.seconds > 0 ? s.tokens / s.seconds : 0.0;
}

StepTimeModel::StepTimeModel(double forgetting) : forgetting_(forgetting) {
  ACCEL_DCHECK(forgetting > 0 && forgetting <= 1);
}

void StepTimeModel::accumulate(const StepFeatures& f, double seconds, double weight, double* ata, double* aty) {
  const double x[kTerms] = {1.0, f.tokens, f.kv_tokens, f.logit_rows, f.drafted};
  for (int i = 0; i < kTerms; ++i) {
    for (int j = 0; j < kTerms; ++j) ata[i * kTerms + j] += weight * x[i] * x[j];
    aty[i] += weight * x[i] * seconds;
  }
}

void StepTimeModel::observe_profile(const StepFeatures& f, double seconds) {
  if (!(seconds >= 0) || !std::isfinite(seconds)) return;
  accumulate(f, seconds, relative_weight(seconds), profile_ata_.data(), profile_aty_.data());
  ++profile_n_;
  ++n_;
  refit();
}

void StepTimeModel::observe(const StepFeatures& f, double seconds) {
  if (!(seconds >= 0) || !std::isfinite(seconds)) return;
  // Squared error lets one hiccup (a page fault, a descheduled thread: milliseconds against
  // microseconds) outweigh hundreds of steps: clamp to [1/2, 2] x the prediction. A real change
  // still gets through, doubling per step.
  if (ready()) {
    const double p = predict(f);
    if (p > 0) seconds = std::clamp(seconds, 0.5 * p, 2.0 * p);
  }
  for (double& v : ata_) v *= forgetting_;
  for (double& v : aty_) v *= forgetting_;
  accumulate(f, seconds, relative_weight(seconds), ata_.data(), aty_.data());
  ++n_;
  // Refitting is a handful of 4x4 solves: every step while young, then every 8th.
  if (n_ <= 64 || n_ % 8 == 0) refit();
}

void StepTimeModel::observe_lookup(double seconds) {
  if (!(seconds >= 0) || !std::isfinite(seconds)) return;
  // A mean over the first ones, a moving average after; one that took 10x the average (the
  // thread descheduled) counts as 10x.
  if (lookups_ > 0) seconds = std::min(seconds, 10 * lookup_cost_);
  lookup_cost_ += std::max(kLookupAlpha, 1.0 / (lookups_ + 1.0)) * (seconds - lookup_cost_);
  ++lookups_;
}

double StepTimeModel::predict(const StepFeatures& f) const {
  return coef_[0] + coef_[1] * f.tokens + coef_[2] * f.kv_tokens + coef_[3] * f.logit_rows + coef_[4] * f.drafted;
}

// Non-negative least squares by enumeration: with 5 terms, solve the normal equations on every
// subset of them and keep the best fit whose coefficients are all >= 0 (a term that the data
// cannot separate, e.g. rows with logits when every step has one, drops out instead of going
// negative).
void StepTimeModel::refit() {
  std::array<double, kTerms * kTerms> ata = ata_;
  std::array<double, kTerms> aty = aty_;
  if (profile_n_ > 0) {
    const double w = kProfileWeight / profile_n_;
    for (int i = 0; i < kTerms * kTerms; ++i) ata[i] += w * profile_ata_[i];
    for (int i = 0; i < kTerms; ++i) aty[i] += w * profile_aty_[i];
  }
  // Scale each term by its root mean square so the solve is well conditioned whatever the units.
  double scale[kTerms];
  for (int i = 0; i < kTerms; ++i) scale[i] = ata[i * kTerms + i] > 0 ? 1.0 / std::sqrt(ata[i * kTerms + i]) : 0.0;
  double best_loss = INFINITY;
  std::array<double, kTerms> best{};
  for (int mask = 1; mask < (1 << kTerms); ++mask) {
    int idx[kTerms], m = 0;
    for (int i = 0; i < kTerms; ++i)
      if ((mask >> i) & 1) {
        if (scale[i] == 0) goto next_mask;  // a term never seen
        idx[m++] = i;
      }
    {
      // Gaussian elimination with partial pivoting on the scaled m x m system (+ a tiny ridge).
      double a[kTerms][kTerms + 1];
      for (int r = 0; r < m; ++r) {
        for (int c = 0; c < m; ++c) a[r][c] = ata[idx[r] * kTerms + idx[c]] * scale[idx[r]] * scale[idx[c]];
        a[r][r] += 1e-10;
        a[r][m] = aty[idx[r]] * scale[idx[r]];
      }
      for (int c = 0; c < m; ++c) {
        int piv = c;
        for (int r = c + 1; r < m; ++r)
          if (std::fabs(a[r][c]) > std::fabs(a[piv][c])) piv = r;
        if (std::fabs(a[piv][c]) < 1e-12) goto next_mask;
        if (piv != c)
          for (int k = 0; k <= m; ++k) std::swap(a[c][k], a[piv][k]);
        for (int r = 0; r < m; ++r) {
          if (r == c) continue;
          const double f = a[r][c] / a[c][c];
          for (int k = c; k <= m; ++k) a[r][k] -= f * a[c][k];
        }
      }
      std::array<double, kTerms> coef{};
      for (int r = 0; r < m; ++r) {
        const double z = a[r][m] / a[r][r];
        if (z < 0) goto next_mask;
        coef[idx[r]] = z * scale[idx[r]];
      }
      // Weighted squared error minus the constant sum of y^2: c^T A c - 2 c^T b.
      double loss = 0;
      for (int i = 0; i < kTerms; ++i) {
        double ac = 0;
        for (int j = 0; j < kTerms; ++j) ac += ata[i * kTerms + j] * coef[j];
        loss += coef[i] * (ac - 2 * aty[i]);
      }
      if (loss < best_loss) {
        best_loss = loss;
        best = coef;
      }
    }
  next_mask:;
  }
  if (std::isfinite(best_loss)) coef_ = best;
}

// ---- SpecController ----

SpecController::SpecController(SpecPolicy policy, int max_depth, int max_match)
    : policy_(policy),
      max_depth_(max_depth),
      num_buckets_(bucket(std::max(max_match, 1)) + 1) {
  for (ModeStats& m : modes_) {
    m.global.assign(max_depth + 1, kPrior);
    m.by_match.assign(static_cast<size_t>(kMatchBuckets) * (max_depth + 1), kPrior);
    m.global_n.assign(m.global.size(), 0);
    m.by_match_n.assign(m.by_match.size(), 0);
  }
}

// ---- CalibrationMap ----

CalibrationMap::CalibrationMap() {
  for (int b = 0; b < kBins; ++b) map_[b] = (b + 0.5f) / kBins;
}

int CalibrationMap::bin(float estimate) {
  return std::clamp(static_cast<int>(estimate * kBins), 0, kBins - 1);
}

void CalibrationMap::observe(float estimate, bool hit) {
  for (int b = 0; b < kBins; ++b) hits_[b] *= kForgetting, weight_[b] *= kForgetting;
  const int b = bin(estimate);
  hits_[b] += hit ? 1.0f : 0.0f;
  weight_[b] += 1.0f;
  stale_ = true;
}

const std::array<float, CalibrationMap::kBins>& CalibrationMap::at_centres() const {
  if (stale_) rebuild();
  return map_;
}

void CalibrationMap::rebuild() const {
  // Pool adjacent violators over the ranges, each a block of (value, weight).
  std::array<float, kBins> value, weight;
  std::array<int, kBins> first;  // the first range of each block
  int blocks = 0;
  for (int b = 0; b < kBins; ++b) {
    const float centre = (b + 0.5f) / kBins;
    float w = weight_[b] + kPriorWeight, v = (hits_[b] + kPriorWeight * centre) / w;
    int f = b;
    while (blocks > 0 && value[blocks - 1] > v) {
      --blocks;
      v = (value[blocks] * weight[blocks] + v * w) / (weight[blocks] + w);
      w += weight[blocks];
      f = first[blocks];
    }
    value[blocks] = v, weight[blocks] = w, first[blocks] = f;
    ++blocks;
  }
  for (int k = 0; k < blocks; ++k)
    for (int b = first[k]; b < (k + 1 < blocks ? first[k + 1] : kBins); ++b) map_[b] = value[k];
  stale_ = false;
}

float CalibrationMap::operator()(float estimate) const {
  const std::array<float, kBins>& m = at_centres();
  const float x = std::clamp(estimate, 0.0f, 1.0f) * kBins - 0.5f;  // in units of ranges, from the first centre
  if (x <= 0) return m[0] * std::max(x + 0.5f, 0.0f) * 2;  // to 0 at an estimate of 0
  const int b = static_cast<int>(x);
  if (b >= kBins - 1) return m[kBins - 1];
  const float t = x - b;
  return m[b] + t * (m[b + 1] - m[b]);
}

// ---- SpecController ----

float SpecController::estimate(const ModeStats& m, int cell, float share, float factor) {
  return std::min(1.0f, share * m.by_match[cell] * factor);
}

float SpecController::conditional(const ModeStats& m, int cell, float share, float factor) {
  const float bonus = kExplore / std::sqrt(m.by_match_n[cell] + 1.0f);
  return std::min(1.0f, m.calibration(estimate(m, cell, share, factor)) + share * factor * bonus);
}

int SpecController::bucket(int match) {
  int b = 0;
  while (b + 1 < kMatchBuckets && (1 << b) < match) ++b;
  return b;
}

float SpecController::rate(const Request* r, int d) const {
  if (d < 1 || d > max_depth_) return 0.0f;
  return r->spec_accept.empty() ? stats(r).global[d] : r->spec_accept[d];
}

float SpecController::request_factor(const Request* r, int d) const {
  if (r->spec_accept.empty()) return 1.0f;
  // Mostly a brake: the match-length rates already credit a request that matches long.
  return std::clamp(r->spec_accept[d] / std::max(stats(r).global[d], 1e-3f), 0.25f, kMaxRequestFactor);
}

float SpecController::first_node_bound(const Request* r) const {
  if (r->spec_match < 0) return 1.0f;
  // A suffix match grows by at most one per token appended (its occurrence also holds the
  // previous suffix), so the tokens since the proposal bound the match now.
  const int grown = r->spec_match + std::max(r->num_tokens() - r->spec_match_tokens, 1);
  const int b = std::min(bucket(grown), num_buckets_ - 1);
  return conditional(stats(r), b * (max_depth_ + 1) + 1, 1.0f, request_factor(r, 1));
}

float SpecController::max_first_node_rate(bool greedy, bool sampled) const {
  float best = 0.0f;
  for (const bool g : {true, false}) {
    if (!(g ? greedy : sampled)) continue;
    for (int b = 0; b < num_buckets_; ++b)
      best = std::max(best, conditional(modes_[mode(g)], b * (max_depth_ + 1) + 1, 1.0f, kMaxRequestFactor));
  }
  return best;
}

void SpecController::relax(Request* r) {
  const std::vector<float>& global = stats(r).global;
  for (size_t d = 1; d < r->spec_accept.size(); ++d) r->spec_accept[d] += kRelax * (global[d] - r->spec_accept[d]);
}

void SpecController::node_probabilities(const Request* r, const DraftTree& t, std::vector<float>* p) const {
  p->resize(t.size());
  const ModeStats& m = stats(r);
  const int row = bucket(t.match) * (max_depth_ + 1);
  for (int i = 0; i < t.size(); ++i) {
    const int d = std::min(t.depths[i], max_depth_);
    const float c = conditional(m, row + d, t.shares[i], request_factor(r, d));
    (*p)[i] = c * (t.parents[i] < 0 ? 1.0f : (*p)[t.parents[i]]);
  }
}

void SpecController::on_verified(Request* r, const DraftTree& t, const int32_t* path, int n) {
  ModeStats& m = modes_[mode(r)];
  const int row = bucket(t.match) * (max_depth_ + 1);
  // Calibration first, against the estimates the draft was chosen by: each drafted child of an
  // accepted node (or of the root), accepted or not.
  for (int d = 1; d <= n + 1 && d <= max_depth_; ++d) {
    const int parent = d == 1 ? -1 : path[d - 2];
    const float factor = request_factor(r, d);
    for (int i = 0; i < t.size(); ++i)
      if (t.parents[i] == parent)
        m.calibration.observe(estimate(m, row + d, t.shares[i], factor), d <= n && path[d - 1] == i);
  }
  if (r->spec_accept.empty()) r->spec_accept = m.global;
  // A mean over the first observations (the prior counts as one), a moving average after.
  auto update = [](float* rate, uint32_t* n, float hit) {
    *rate += std::max(kGlobalAlpha, 1.0f / (*n + 2.0f)) * (hit - *rate);
    ++*n;
  };
  // Depth d is observed when the accepted node at depth d - 1 (the root for d = 1) had drafted
  // children: did its most frequent one get accepted?
  for (int d = 1; d <= n + 1 && d <= max_depth_; ++d) {
    const int parent = d == 1 ? -1 : path[d - 2];
    int top = -1;
    for (int i = 0; i < t.size(); ++i)
      if (t.parents[i] == parent && (top < 0 || t.shares[i] > t.shares[top])) top = i;
    if (top < 0) break;
    const float hit = d <= n && path[d - 1] == top ? 1.0f : 0.0f;
    r->spec_accept[d] += kRequestAlpha * (hit - r->spec_accept[d]);
    update(&m.global[d], &m.global_n[d], hit);
    update(&m.by_match[row + d], &m.by_match_n[row + d], hit);
  }
}

// ---- allocation ----

double allocate_drafts(const StepTimeModel& model, const StepFeatures& base, double base_samples, int budget,
                       std::vector<DraftCandidate>* cands) {
  double tokens = base_samples;
  double time = std::max(model.predict(base), 1e-9);
  auto row = [&](const DraftCandidate& c, int node) { return model.row_cost(c.kv_tokens + c.depths[node] - 1); };
  // A move is a request's next nodes: the first move of a request is the prefix with the best
  // ratio (it alone pays the fixed drafting cost, so a first node that loses on its own may pay
  // with the nodes after it), later moves one node each.
  struct Move {
    double ratio;
    int cand, count;
  };
  auto next_move = [&](int i, int room) -> Move {
    const DraftCandidate& c = (*cands)[i];
    const int left = std::min(static_cast<int>(c.probs.size()) - c.chosen, room);
    if (left <= 0) return {-1, i, 0};
    if (c.chosen > 0) return {c.probs[c.chosen] / std::max(row(c, c.chosen), 1e-12), i, 1};
    double gain = 0, cost = model.draft_cost(), best = -1;
    int count = 0;
    for (int k = 0; k < left; ++k) {
      gain += c.probs[k];
      cost += row(c, k);
      const double r = gain / std::max(cost, 1e-12);
      if (r > best) best = r, count = k + 1;
    }
    return {best, i, count};
  };
  auto lower = [](const Move& a, const Move& b) { return a.ratio != b.ratio ? a.ratio < b.ratio : a.cand > b.cand; };
  std::priority_queue<Move, std::vector<Move>, decltype(lower)> heap(lower);
  for (size_t i = 0; i < cands->size(); ++i) {
    (*cands)[i].chosen = 0;
    const Move m = next_move(static_cast<int>(i), budget);
    if (m.count > 0) heap.push(m);
  }
  while (budget > 0 && !heap.empty()) {
    Move m = heap.top();
    heap.pop();
    if (m.count > budget) {  // the budget shrank since this move was priced
      m = next_move(m.cand, budget);
      if (m.count > 0) heap.push(m);
      continue;
    }
    // Goodput rises by a move iff the move's own ratio beats the current goodput; the heap holds
    // each request's best remaining move, so once the best fails, all would.
    if (m.ratio <= tokens / time) break;
    DraftCandidate& c = (*cands)[m.cand];
    if (c.chosen == 0) time += model.draft_cost();
    for (int k = 0; k < m.count; ++k, ++c.chosen) {
      tokens += c.probs[c.chosen];
      time += row(c, c.chosen);
    }
    budget -= m.count;
    const Move n = next_move(m.cand, budget);
    if (n.count > 0) heap.push(n);
  }
  return tokens / time;
}

void order_by_probability(DraftTree* t, std::vector<float>* probs) {
  const int n = t->size();
  std::vector<int> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return (*probs)[a] > (*probs)[b]; });
  std::vector<int> where(n);
  for (int i = 0; i < n; ++i) where[order[i]] = i;
  DraftTree out;
  out.match = t->match;
  std::vector<float> p(n);
  for (int i = 0; i < n; ++i) {
    const int o = order[i];
    out.tokens.push_back(t->tokens[o]);
    out.parents.push_back(t->parents[o] < 0 ? -1 : where[t->parents[o]]);
    out.depths.push_back(t->depths[o]);
    out.shares.push_back(t->shares[o]);
    p[i] = (*probs)[o];
    ACCEL_DCHECK(out.parents.back() < i);
  }
  *t = std::move(out);
  *probs = std::move(p);
}

}  // namespace accelcore
