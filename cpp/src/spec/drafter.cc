#include "spec/drafter.h"

#include <algorithm>
#include <queue>

#include "util/check.h"

namespace accelcore {

Drafter::Drafter(const DrafterConfig& config)
    : config_(config), window_(config.max_match + config.max_depth), global_(window_) {
  ACCEL_CHECK(config.max_match > 0 && config.max_depth > 0, InvalidArgument)
      << "speculation needs max_match > 0 and max_depth > 0";
}

void Drafter::add_tokens(uint64_t request, const int32_t* tokens, int n) {
  auto it = local_.find(request);
  if (it == local_.end()) it = local_.emplace(request, Local(window_)).first;
  it->second.pending.insert(it->second.pending.end(), tokens, tokens + n);
}

void Drafter::finish(uint64_t request, const int32_t* output, int n, bool keep_output) {
  local_.erase(request);
  if (!keep_output || n == 0) return;
  stored_.emplace_back(output, output + n);
  global_bytes_ += n * sizeof(int32_t);
  evict_until_within_bound();
}

void Drafter::index_pending(size_t max_tokens) {
  // One output at a time, evicting after each as an eager insertion would: the bound holds
  // throughout, and the outputs kept do not depend on when indexing happens.
  size_t done = 0;
  while (num_indexed_ < stored_.size() && done < max_tokens) {
    const std::vector<int32_t>& s = stored_[num_indexed_];
    const size_t before = global_.num_nodes();
    global_.add_windows(s.data(), static_cast<int>(s.size()), +1);
    global_bytes_ += (global_.num_nodes() - before) * TokenTrie::kBytesPerNode;
    done += s.size();
    ++num_indexed_;
    evict_until_within_bound();
  }
}

void Drafter::evict_until_within_bound() {
  while (global_bytes_ > config_.memory_bytes && !stored_.empty()) {
    const std::vector<int32_t>& old = stored_.front();
    if (num_indexed_ > 0) {
      const size_t before = global_.num_nodes();
      global_.add_windows(old.data(), static_cast<int>(old.size()), -1);
      global_bytes_ -= (before - global_.num_nodes()) * TokenTrie::kBytesPerNode;
      --num_indexed_;
    }
    global_bytes_ -= old.size() * sizeof(int32_t);
    stored_.pop_front();
  }
}

int Drafter::propose(uint64_t request, const int32_t* context, int n, int max_nodes, int max_depth,
                     DraftTree* out) {
  out->clear();
  if (max_nodes <= 0 || max_depth <= 0 || n <= 0) return 0;
  max_depth = std::min(max_depth, config_.max_depth);
  index_pending(kMaxIndexPerCall);
  auto it = local_.find(request);
  const TokenTrie* local = nullptr;
  if (it != local_.end()) {
    Local& l = it->second;
    for (int32_t t : l.pending) l.trie.extend(&l.open, t);
    l.pending.clear();
    local = &l.trie;
  }

  // Longest matched suffix that has something after it, in either source. Monotone in m (the
  // occurrence of a suffix also holds every shorter suffix, followed by the same token), so a
  // binary search over m finds it.
  auto lookup = [&](int m, int32_t* l, int32_t* g) {
    const int32_t* suffix = context + n - m;
    // The request's own trie holds the context itself: its occurrence at the very end has nothing
    // after it yet; only earlier ones (the node has children) count.
    *l = local ? local->find(suffix, m) : TokenTrie::kNone;
    *g = global_.find(suffix, m);
    if (*l != TokenTrie::kNone && local->first_child(*l) == TokenTrie::kNone) *l = TokenTrie::kNone;
    if (*g != TokenTrie::kNone && global_.first_child(*g) == TokenTrie::kNone) *g = TokenTrie::kNone;
    return *l != TokenTrie::kNone || *g != TokenTrie::kNone;
  };
  int match = 0;
  int32_t lnode = TokenTrie::kNone, gnode = TokenTrie::kNone;
  for (int lo = 1, hi = std::min(n, config_.max_match); lo <= hi;) {
    const int mid = (lo + hi) / 2;
    int32_t l, g;
    if (lookup(mid, &l, &g)) {
      match = mid;
      lnode = l;
      gnode = g;
      lo = mid + 1;
    } else {
      hi = mid - 1;
    }
  }
  if (match == 0) return 0;
  max_depth = std::min(max_depth, window_ - match);

  // Best-first growth over the merged tries: a candidate is (local node, global node) for the same
  // token path; its score is its combined count (monotone along a path, so the first max_nodes
  // popped are the most frequent continuations).
  struct Cand {
    int64_t count;
    int32_t token, parent, depth, l, g;
    float share;
  };
  auto worse = [](const Cand& a, const Cand& b) {
    return a.count != b.count ? a.count < b.count : a.token > b.token;
  };
  std::priority_queue<Cand, std::vector<Cand>, decltype(worse)> heap(worse);
  // Children of a merged node, by token: (token, local child, global child, combined count). Only
  // the most frequent `max_nodes` can ever be picked, so only those enter the heap.
  struct Kid {
    int32_t token, l, g;
    int64_t count;
  };
  std::vector<Kid> kids;
  auto push_children = [&](int32_t l, int32_t g, int32_t parent, int32_t depth) {
    if (depth > max_depth) return;
    kids.clear();
    if (l != TokenTrie::kNone)
      for (int32_t c = local->first_child(l); c != TokenTrie::kNone; c = local->next_sibling(c))
        kids.push_back({local->token(c), c, TokenTrie::kNone, local->count(c)});
    const size_t num_local = kids.size();
    if (g != TokenTrie::kNone)
      for (int32_t c = global_.first_child(g); c != TokenTrie::kNone; c = global_.next_sibling(c))
        kids.push_back({global_.token(c), TokenTrie::kNone, c, global_.count(c)});
    if (num_local > 0 && kids.size() > num_local) {
      // Merge the two lists: sort by token, fold equal tokens together.
      std::sort(kids.begin(), kids.end(), [](const Kid& a, const Kid& b) { return a.token < b.token; });
      size_t w = 0;
      for (size_t r = 0; r < kids.size(); ++r) {
        if (w > 0 && kids[w - 1].token == kids[r].token) {
          Kid& k = kids[w - 1];
          if (kids[r].l != TokenTrie::kNone) k.l = kids[r].l;
          if (kids[r].g != TokenTrie::kNone) k.g = kids[r].g;
          k.count += kids[r].count;
        } else {
          kids[w++] = kids[r];
        }
      }
      kids.resize(w);
    }
    const size_t keep = std::min(kids.size(), static_cast<size_t>(max_nodes));
    std::partial_sort(kids.begin(), kids.begin() + keep, kids.end(), [](const Kid& a, const Kid& b) {
      return a.count != b.count ? a.count > b.count : a.token < b.token;
    });
    for (size_t i = 0; i < keep; ++i)
      heap.push({kids[i].count, kids[i].token, parent, depth, kids[i].l, kids[i].g,
                 static_cast<float>(kids[i].count) / static_cast<float>(kids[0].count)});
  };
  push_children(lnode, gnode, -1, 1);
  // Popped in score order, but the tree must list parents before children: collect, then order.
  std::vector<Cand> picked;
  while (!heap.empty() && static_cast<int>(picked.size()) < max_nodes) {
    Cand c = heap.top();
    heap.pop();
    picked.push_back(c);
    push_children(c.l, c.g, static_cast<int32_t>(picked.size()) - 1, c.depth + 1);
  }
  // Popping order already puts every parent before its children (a child enters the heap only
  // after its parent is picked), so picked is a valid BFS-like order.
  for (const Cand& c : picked) {
    out->tokens.push_back(c.token);
    out->parents.push_back(c.parent);
    out->depths.push_back(c.depth);
    out->shares.push_back(c.share);
  }
  out->match = match;
  return match;
}

}  // namespace accelcore
