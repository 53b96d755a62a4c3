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
  if (node == kRoot) {
    auto it = root_child_.find(token);
    return it == root_child_.end() ? kNone : it->second;
  }
  for (int32_t c = nodes_[node].first_child; c != kNone; c = nodes_[c].next_sibling)
    if (nodes_[c].token == token) return c;
  return kNone;
}

int32_t TokenTrie::child_or_add(int32_t node, int32_t token) {
  int32_t c;
  if (node == kRoot) {
    auto it = root_child_.find(token);
    c = it == root_child_.end() ? kNone : it->second;
  } else {
    // Move the child found to the front of its siblings: insertion revisits the frequent
    // continuations, and the short prefixes fan out to hundreds of children.
    int32_t* link = &nodes_[node].first_child;
    while (*link != kNone && nodes_[*link].token != token) link = &nodes_[*link].next_sibling;
    c = *link;
    if (c != kNone && link != &nodes_[node].first_child) {
      *link = nodes_[c].next_sibling;
      nodes_[c].next_sibling = nodes_[node].first_child;
      nodes_[node].first_child = c;
    }
  }
  if (c != kNone) return c;
  if (!free_.empty()) {
    c = free_.back();
    free_.pop_back();
  } else {
    c = static_cast<int32_t>(nodes_.size());
    nodes_.emplace_back();
  }
  Node& n = nodes_[c];
  n.token = token;
  n.count = 0;
  n.parent = node;
  n.first_child = kNone;
  n.next_sibling = nodes_[node].first_child;
  nodes_[node].first_child = c;
  if (node == kRoot) root_child_.emplace(token, c);
  return c;
}

void TokenTrie::unlink(int32_t c) {
  const int32_t parent = nodes_[c].parent;
  int32_t* link = &nodes_[parent].first_child;
  while (*link != c) link = &nodes_[*link].next_sibling;
  *link = nodes_[c].next_sibling;
  if (parent == kRoot) root_child_.erase(nodes_[c].token);
  nodes_[c] = Node();
  free_.push_back(c);
}

void TokenTrie::add_windows(const int32_t* tokens, int n, int delta) {
  ACCEL_DCHECK(delta == 1 || delta == -1);
  for (int i = 0; i < n; ++i) {
    const int len = std::min(window_, n - i);
    int32_t node = kRoot;
    if (delta > 0) {
      for (int j = 0; j < len; ++j) {
        node = child_or_add(node, tokens[i + j]);
        ++nodes_[node].count;
      }
    } else {
      // Walk down first, then decrement bottom-up so that emptied nodes can be freed.
      int32_t path[kMaxWindow];
      int depth = 0;
      for (int j = 0; j < len; ++j) {
        node = child(node, tokens[i + j]);
        ACCEL_DCHECK(node != kNone);
        if (node == kNone) break;
        path[depth++] = node;
      }
      for (int d = depth - 1; d >= 0; --d) {
        if (--nodes_[path[d]].count == 0) {
          ACCEL_DCHECK(nodes_[path[d]].first_child == kNone);
          unlink(path[d]);
        }
      }
    }
  }
}

void TokenTrie::extend(std::vector<int32_t>* open, int32_t token) {
  // open[i] is the node of the window that started open.size() - i tokens ago (oldest first).
  // Each grows by the token, a new one starts at it, and the oldest closes at length W.
  open->push_back(kRoot);
  for (int32_t& node : *open) {
    node = child_or_add(node, token);
    ++nodes_[node].count;
  }
  if (static_cast<int>(open->size()) >= window_) open->erase(open->begin());
}

int32_t TokenTrie::find(const int32_t* tokens, int n) const {
  int32_t node = kRoot;
  for (int i = 0; i < n && node != kNone; ++i) node = child(node, tokens[i]);
  return node;
}

}  // namespace accelcore
