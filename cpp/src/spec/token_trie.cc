#include "spec/token_trie.h"

#include <algorithm>

#include "util/check.h"

namespace accelcore {

TokenTrie::TokenTrie(int window) : window_(window) {
  ACCEL_CHECK(window > 0 && window <= kMaxWindow, InvalidArgument)
      << "trie window must be in [1, " << kMaxWindow << "], got " << window;
  nodes_.emplace_back();  // root
}

int32_t TokenTrie::child(int32_t node, int32_t token) const {
  if (nodes_[node].hashed) {
    auto it = wide_.find(key(node, token));
    return it == wide_.end() ? kNone : it->second;
  }
  for (int32_t c = nodes_[node].first_child; c != kNone; c = nodes_[c].next_sibling)
    if (nodes_[c].token == token) return c;
  return kNone;
}

int32_t TokenTrie::child_or_add(int32_t node, int32_t token) {
  int32_t c = child(node, token);
  if (c != kNone) return c;
  if (!free_.empty()) {
    c = free_.back();
    free_.pop_back();
  } else {
    c = static_cast<int32_t>(nodes_.size());
    nodes_.emplace_back();
  }
  Node& n = nodes_[c];
  Node& p = nodes_[node];
  n = Node();
  n.token = token;
  n.parent = node;
  n.next_sibling = p.first_child;
  if (p.first_child != kNone) nodes_[p.first_child].prev_sibling = c;
  p.first_child = c;
  ++p.num_children;
  if (p.hashed) {
    wide_.emplace(key(node, token), c);
  } else if (p.num_children > kWide) {
    p.hashed = true;
    for (int32_t s = p.first_child; s != kNone; s = nodes_[s].next_sibling) wide_.emplace(key(node, nodes_[s].token), s);
  }
  return c;
}

void TokenTrie::unlink(int32_t c) {
  Node& n = nodes_[c];
  ACCEL_DCHECK(n.first_child == kNone);
  Node& p = nodes_[n.parent];
  if (n.prev_sibling != kNone) {
    nodes_[n.prev_sibling].next_sibling = n.next_sibling;
  } else {
    p.first_child = n.next_sibling;
  }
  if (n.next_sibling != kNone) nodes_[n.next_sibling].prev_sibling = n.prev_sibling;
  --p.num_children;
  if (p.hashed) {
    wide_.erase(key(n.parent, n.token));
    // Back to a plain list at kWide children, so that the memory (and with it the store's
    // eviction) depends on the trie's contents only, not on its history.
    if (p.num_children <= kWide) {
      for (int32_t s = p.first_child; s != kNone; s = nodes_[s].next_sibling) wide_.erase(key(n.parent, nodes_[s].token));
      p.hashed = false;
    }
  }
  n = Node();
  free_.push_back(c);
}

void TokenTrie::add_windows(const int32_t* tokens, int n, int begin, int end, int delta) {
  ACCEL_DCHECK(delta == 1 || delta == -1);
  ACCEL_DCHECK(0 <= begin && begin <= end && end <= n);
  // The windows are walked kLanes at a time, one level of each in turn: each level is a cache miss
  // (the child, in a store of megabytes), and one walk's misses follow each other, while the
  // lanes' are independent, so their loads overlap. The counts come out the same in any order; so
  // do the drafts (they rank children by count and token, not by list order).
  constexpr int kLanes = 8;
  for (int i0 = begin; i0 < end; i0 += kLanes) {
    const int lanes = std::min(kLanes, end - i0);
    int32_t node[kLanes];
    int len[kLanes];  // non-increasing: windows near the end are cut short
    for (int g = 0; g < lanes; ++g) node[g] = kRoot, len[g] = std::min(window_, n - (i0 + g));
    if (delta > 0) {
      for (int j = 0; j < len[0]; ++j)
        for (int g = 0; g < lanes && j < len[g]; ++g) {
          node[g] = child_or_add(node[g], tokens[i0 + g + j]);
          Node& c = nodes_[node[g]];
          ++c.count;
          if (c.first_child != kNone) __builtin_prefetch(&nodes_[c.first_child]);
        }
      continue;
    }
    // Removal: walk all the lanes down first (nothing is freed meanwhile), then decrement each
    // window bottom-up so that emptied nodes can be freed. A node two windows share is counted
    // by both, so the first window's decrement never frees it under the second.
    int32_t path[kLanes][kMaxWindow];
    int depth[kLanes] = {};
    for (int j = 0; j < len[0]; ++j)
      for (int g = 0; g < lanes && j < len[g]; ++g) {
        if (depth[g] < j) continue;  // this window's walk ended (a missing node)
        node[g] = child(node[g], tokens[i0 + g + j]);
        ACCEL_DCHECK(node[g] != kNone);
        if (node[g] == kNone) continue;
        path[g][depth[g]++] = node[g];
        const int32_t fc = nodes_[node[g]].first_child;
        if (fc != kNone) __builtin_prefetch(&nodes_[fc]);
      }
    for (int g = 0; g < lanes; ++g)
      for (int d = depth[g] - 1; d >= 0; --d) {
        if (--nodes_[path[g][d]].count == 0) {
          ACCEL_DCHECK(nodes_[path[g][d]].first_child == kNone);
          unlink(path[g][d]);
        }
      }
  }
}

void TokenTrie::add_path(const int32_t* tokens, int n) {
  ACCEL_DCHECK(n <= window_);
  int32_t node = kRoot;
  for (int j = 0; j < n; ++j) {
    node = child_or_add(node, tokens[j]);
    ++nodes_[node].count;
  }
}

void TokenTrie::clear() {
  nodes_.resize(1);
  nodes_[0] = Node();
  wide_.clear();
  free_.clear();
}

int32_t TokenTrie::find(const int32_t* tokens, int n) const {
  int32_t node = kRoot;
  for (int i = 0; i < n && node != kNone; ++i) node = child(node, tokens[i]);
  return node;
}

}  // namespace accelcore
