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
  f.seqs = plan.num_seqs();
  for (int32_t p : plan.positions) f.kv_tokens += p + 1.0;
  return f;
}

StepTimeModel::StepTimeModel(double forgetting) : forgetting_(forgetting) {
  ACCEL_DCHECK(forgetting > 0 && forgetting <= 1);
}

void StepTimeModel::observe(const StepFeatures& f, double seconds) {
  if (!(seconds >= 0) || !std::isfinite(seconds)) return;
  const double x[kTerms] = {1.0, f.tokens, f.kv_tokens, f.seqs};
  for (double& v : ata_) v *= forgetting_;
  for (double& v : aty_) v *= forgetting_;
  for (int i = 0; i < kTerms; ++i) {
    for (int j = 0; j < kTerms; ++j) ata_[i * kTerms + j] += x[i] * x[j];
    aty_[i] += x[i] * seconds;
  }
  ++n_;
  // Refitting is a handful of 4x4 solves: every step while young, then every 8th.
  if (n_ <= 64 || n_ % 8 == 0) refit();
}

double StepTimeModel::predict(const StepFeatures& f) const {
  return coef_[0] + coef_[1] * f.tokens + coef_[2] * f.kv_tokens + coef_[3] * f.seqs;
}

// Non-negative least squares by enumeration: with 4 terms, solve the normal equations on every
// subset of them and keep the best fit whose coefficients are all >= 0 (a term that the data
// cannot separate, e.g. sequences when every step has one, drops out instead of going negative).
void StepTimeModel::refit() {
  // Scale each term by its root mean square so the solve is well conditioned whatever the units.
  double scale[kTerms];
  for (int i = 0; i < kTerms; ++i) scale[i] = ata_[i * kTerms + i] > 0 ? 1.0 / std::sqrt(ata_[i * kTerms + i]) : 0.0;
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
        for (int c = 0; c < m; ++c) a[r][c] = ata_[idx[r] * kTerms + idx[c]] * scale[idx[r]] * scale[idx[c]];
        a[r][r] += 1e-10;
        a[r][m] = aty_[idx[r]] * scale[idx[r]];
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
        for (int j = 0; j < kTerms; ++j) ac += ata_[i * kTerms + j] * coef[j];
        loss += coef[i] * (ac - 2 * aty_[i]);
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

SpecController::SpecController(SpecPolicy policy, int max_depth)
    : policy_(policy), max_depth_(max_depth), global_(max_depth + 1, kPrior) {}

float SpecController::rate(const Request* r, int d) const {
  if (d < 1 || d > max_depth_) return 0.0f;
  return r->spec_accept.empty() ? global_[d] : r->spec_accept[d];
}

void SpecController::node_probabilities(const Request* r, const DraftTree& t, std::vector<float>* p) const {
  p->resize(t.size());
  for (int i = 0; i < t.size(); ++i) {
    const float c = std::min(1.0f, rate(r, t.depths[i]) * t.shares[i]);
    (*p)[i] = c * (t.parents[i] < 0 ? 1.0f : (*p)[t.parents[i]]);
  }
}

void SpecController::on_verified(Request* r, const DraftTree& t, const int32_t* path, int n) {
  if (r->spec_accept.empty()) r->spec_accept = global_;
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
    global_[d] += kGlobalAlpha * (hit - global_[d]);
  }
}

// ---- allocation ----

double allocate_drafts(const StepTimeModel& model, const StepFeatures& base, double base_samples, int budget,
                       std::vector<DraftCandidate>* cands) {
  double tokens = base_samples;
  double time = std::max(model.predict(base), 1e-9);
  struct Next {
    double ratio;
    int cand;
  };
  auto lower = [](const Next& a, const Next& b) { return a.ratio != b.ratio ? a.ratio < b.ratio : a.cand > b.cand; };
  std::priority_queue<Next, std::vector<Next>, decltype(lower)> heap(lower);
  auto cost = [&](const DraftCandidate& c, int node) {
    return std::max(model.row_cost(c.kv_tokens + c.depths[node] - 1), 1e-12);
  };
  for (size_t i = 0; i < cands->size(); ++i) {
    DraftCandidate& c = (*cands)[i];
    c.chosen = 0;
    if (!c.probs.empty()) heap.push({c.probs[0] / cost(c, 0), static_cast<int>(i)});
  }
  while (budget > 0 && !heap.empty()) {
    const Next best = heap.top();
    heap.pop();
    // Goodput rises by adding a node iff its own ratio beats the current goodput; the heap holds
    // each request's best remaining node, so once the best fails, all would.
    if (best.ratio <= tokens / time) break;
    DraftCandidate& c = (*cands)[best.cand];
    tokens += c.probs[c.chosen];
    time += cost(c, c.chosen);
    ++c.chosen;
    --budget;
    if (c.chosen < static_cast<int>(c.probs.size())) heap.push({c.probs[c.chosen] / cost(c, c.chosen), best.cand});
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
