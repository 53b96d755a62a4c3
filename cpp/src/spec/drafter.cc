#include "spec/drafter.h"

#include <algorithm>
#include <chrono>
#include <queue>

#include <pthread.h>
#include <sched.h>

#include "util/check.h"

namespace accelcore {

Drafter::Drafter(const DrafterConfig& config)
    : config_(config),
      window_(config.max_match + config.max_depth),
      global_(window_),
      own_(std::max(config.max_depth, 1)) {
  ACCEL_CHECK(config.max_match > 0 && config.max_depth > 0, InvalidArgument)
      << "speculation needs max_match > 0 and max_depth > 0";
}

Drafter::~Drafter() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (background_.joinable()) background_.join();
}

void Drafter::start_background_indexing() {
  if (background_.joinable()) return;
  background_ = std::thread([this] { background_loop(); });
}

void Drafter::background_loop() {
  // Lowest priority: the thread takes a core only when nothing else wants it (between requests
  // at light load), never time from the forward pass. Best effort: without it, it just runs.
  sched_param param{};
  pthread_setschedparam(pthread_self(), SCHED_IDLE, &param);
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    // note_idle does not take mu_ to notify (the stepping thread must not wait for this thread),
    // so a wake-up may come just before the wait: the timeout bounds what that delays.
    cv_.wait_for(lock, std::chrono::milliseconds(20), [&] { return stop_ || (idle_ && pending_tokens_ > 0); });
    if (stop_) return;
    if (!idle_ || pending_tokens_ == 0) continue;
    const auto quiet = std::chrono::steady_clock::now().time_since_epoch() - std::chrono::nanoseconds(last_busy_ns_);
    if (quiet < config_.background_quiet) {
      lock.unlock();
      std::this_thread::sleep_for(config_.background_quiet - quiet);
      lock.lock();
      continue;
    }
    // Small parts, so that the store is seldom busy when the stepping thread wants it.
    take_inbox_locked();
    index_locked(kBackgroundChunk);
    lock.unlock();
    std::this_thread::yield();
    lock.lock();
  }
}

void Drafter::note_busy() {
  idle_ = false;
  last_busy_ns_ = std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

void Drafter::note_idle() {
  idle_ = true;
  cv_.notify_one();
}

void Drafter::add_output(const int32_t* output, int n) {
  if (n <= 0) return;
  std::vector<int32_t> tokens(output, output + n);
  pending_tokens_ += n;
  std::unique_lock<std::mutex> lock(mu_, std::try_to_lock);
  if (lock.owns_lock()) {
    take_inbox_locked();  // older ones first
    store_locked(std::move(tokens));
  } else {
    std::lock_guard<std::mutex> in(inbox_mu_);
    inbox_.push_back(std::move(tokens));
  }
  if (idle_) cv_.notify_one();
}

void Drafter::store_locked(std::vector<int32_t>&& tokens) {
  global_bytes_ += tokens.size() * sizeof(int32_t);
  stored_.push_back({std::move(tokens), 0});
  evict_until_within_bound();
}

void Drafter::take_inbox_locked() {
  std::deque<std::vector<int32_t>> taken;
  {
    std::lock_guard<std::mutex> in(inbox_mu_);
    taken.swap(inbox_);
  }
  for (auto& t : taken) store_locked(std::move(t));
}

size_t Drafter::num_pending_tokens() const { return pending_tokens_; }

size_t Drafter::global_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return global_bytes_;
}

size_t Drafter::num_global_sequences() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::lock_guard<std::mutex> in(inbox_mu_);
  return stored_.size() + inbox_.size();
}

void Drafter::drop_pending(size_t max_tokens) {
  std::unique_lock<std::mutex> lock(mu_, std::try_to_lock);
  if (lock.owns_lock()) {
    take_inbox_locked();
    // Outputs from `first` on have no window indexed (the one at num_indexed_ may be in part).
    const size_t first = num_indexed_ + (num_indexed_ < stored_.size() && stored_[num_indexed_].indexed > 0 ? 1 : 0);
    size_t last = first;
    while (pending_tokens_ > max_tokens && last < stored_.size()) {
      const size_t n = stored_[last].tokens.size();
      pending_tokens_ -= n;
      global_bytes_ -= n * sizeof(int32_t);
      ++last;
    }
    stored_.erase(stored_.begin() + static_cast<std::ptrdiff_t>(first), stored_.begin() + static_cast<std::ptrdiff_t>(last));
    return;
  }
  std::lock_guard<std::mutex> in(inbox_mu_);
  while (pending_tokens_ > max_tokens && !inbox_.empty()) {
    pending_tokens_ -= inbox_.front().size();
    inbox_.pop_front();
  }
}

void Drafter::index(size_t max_tokens) {
  std::lock_guard<std::mutex> lock(mu_);
  take_inbox_locked();
  index_locked(max_tokens);
}

void Drafter::index_locked(size_t max_tokens) {
  // In parts, evicting after each as an eager insertion would: the bound holds throughout, and
  // the outputs kept once all is indexed do not depend on when or in what parts it happened.
  size_t done = 0;
  while (done < max_tokens && num_indexed_ < stored_.size()) {
    Stored& s = stored_[num_indexed_];
    const int n = static_cast<int>(s.tokens.size());
    const int end = s.indexed + static_cast<int>(std::min<size_t>(max_tokens - done, n - s.indexed));
    const size_t before = global_.bytes();
    global_.add_windows(s.tokens.data(), n, s.indexed, end, +1);
    global_bytes_ += global_.bytes() - before;
    done += end - s.indexed;
    pending_tokens_ -= end - s.indexed;
    s.indexed = end;
    if (end == n) ++num_indexed_;
    evict_until_within_bound();  // may drop s
  }
}

void Drafter::evict_until_within_bound() {
  while (global_bytes_ > config_.memory_bytes && !stored_.empty()) {
    Stored& old = stored_.front();
    const int n = static_cast<int>(old.tokens.size());
    if (old.indexed > 0) {
      const size_t before = global_.bytes();
      global_.add_windows(old.tokens.data(), n, 0, old.indexed, -1);
      global_bytes_ -= before - global_.bytes();
    }
    if (num_indexed_ > 0) --num_indexed_;
    pending_tokens_ -= n - old.indexed;
    global_bytes_ -= n * sizeof(int32_t);
    stored_.pop_front();
  }
}

int Drafter::propose(const int32_t* context, int n, int max_nodes, int max_depth, DraftTree* out,
                     bool search_context, int match_hint) {
  out->clear();
  if (max_nodes <= 0 || max_depth <= 0 || n <= 0) return 0;
  max_depth = std::min(max_depth, config_.max_depth);

  // The context's own earlier occurrences of its suffix: every end i < n - 1 (something follows)
  // with the length of the suffix it shares, up to max_match. Most ends fail at the first token.
  int own_match = 0;
  occurrences_.clear();
  if (search_context) {
    const int32_t last = context[n - 1];
    for (int i = 0; i + 1 < n; ++i) {
      if (context[i] != last) continue;
      int len = 1;
      while (len < config_.max_match && len <= i && context[i - len] == context[n - 1 - len]) ++len;
      occurrences_.emplace_back(i, len);
      own_match = std::max(own_match, len);
    }
  }
  // The store, to the end; while the background thread holds it, the context alone serves.
  std::unique_lock<std::mutex> lock(mu_, std::try_to_lock);
  const bool store = lock.owns_lock();
  // The store's longest suffix with something after it. Monotone in m (the occurrence of a suffix
  // also holds every shorter suffix, followed by the same token), so a binary search finds it.
  // Each probe is a walk from the root through scattered nodes (a cache miss a level): the hint is
  // probed first, then the longest, so a request that keeps matching as long as it can (the
  // common case while drafts are accepted) costs one or two walks, not three or four.
  auto store_node = [&](int m) {
    const int32_t g = global_.find(context + n - m, m);
    return g != TokenTrie::kNone && global_.first_child(g) != TokenTrie::kNone ? g : TokenTrie::kNone;
  };
  int store_match = 0;
  int32_t store_g = TokenTrie::kNone;  // the node of store_match's suffix
  auto probe = [&](int m) {
    const int32_t g = store_node(m);
    if (g == TokenTrie::kNone) return false;
    store_match = m, store_g = g;
    return true;
  };
  int lo = 1, hi = store ? std::min(n, config_.max_match) : 0;
  if (match_hint > 0 && lo <= hi) {
    const int guess = std::clamp(match_hint, lo, hi);
    if (!probe(guess)) {
      hi = guess - 1;
    } else {
      lo = guess + 1;
      if (lo <= hi) {
        if (probe(hi)) lo = hi + 1;
        else --hi;
      }
    }
  }
  while (lo <= hi) {
    const int mid = (lo + hi) / 2;
    if (probe(mid)) lo = mid + 1;
    else hi = mid - 1;
  }
  const int match = std::max(own_match, store_match);
  if (match == 0) return 0;
  max_depth = std::min(max_depth, window_ - match);
  const int32_t gnode = store_match >= match ? store_g : TokenTrie::kNone;
  // What followed the context's own occurrences, as a trie whose root stands for the match.
  const TokenTrie* local = nullptr;
  int32_t lnode = TokenTrie::kNone;
  if (own_match >= match) {
    own_.clear();
    for (const auto& [end, len] : occurrences_)
      if (len >= match) own_.add_path(context + end + 1, std::min(max_depth, n - 1 - end));
    local = &own_;
    lnode = TokenTrie::kRoot;
  }

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
