// A trie of token windows with occurrence counts, in a bounded node pool.
//
// Every window tokens[i .. i + W) of an inserted sequence is a path from the root, so any
// substring of length <= W is a path, and a node's count is how many times its substring occurred
// (each occurrence starts exactly one window). Retrieval walks the context's last m tokens from
// the root and reads what followed them, ranked by count.
#pragma once

#include <cstddef>
#include <cstdint>
#include <unordered_map>
#include <vector>

namespace accelcore {

class TokenTrie {
 public:
  static constexpr int32_t kNone = -1;
  static constexpr int32_t kRoot = 0;
  static constexpr int kMaxWindow = 256;

  explicit TokenTrie(int window);

  int window() const { return window_; }
  size_t num_nodes() const { return nodes_.size() - free_.size() - 1; }  // excluding the root
  static constexpr size_t kBytesPerNode = 20;

  // Adds (delta = +1) or removes (delta = -1) every window of tokens[0, n). Removal only undoes an
  // earlier insertion of the same tokens; nodes whose count reaches zero are freed.
  void add_windows(const int32_t* tokens, int n, int delta);

  // Incremental insertion of one growing sequence: call extend() with each new token; `open`
  // carries the windows still shorter than W (owned by the caller, starts empty).
  void extend(std::vector<int32_t>* open, int32_t token);

  // The node of the path tokens[0, n) from the root, or kNone.
  int32_t find(const int32_t* tokens, int n) const;

  int32_t child(int32_t node, int32_t token) const;
  int32_t first_child(int32_t node) const { return nodes_[node].first_child; }
  int32_t next_sibling(int32_t node) const { return nodes_[node].next_sibling; }
  int32_t token(int32_t node) const { return nodes_[node].token; }
  int32_t count(int32_t node) const { return nodes_[node].count; }

 private:
  struct Node {
    int32_t token = -1, count = 0, parent = kNone, first_child = kNone, next_sibling = kNone;
  };
  int32_t child_or_add(int32_t node, int32_t token);
  void unlink(int32_t node);

  int window_;
  std::vector<Node> nodes_;          // nodes_[0] is the root
  // The root's children by token: the root fans out widely, and a map costs memory only for the
  // tokens seen (a request's own trie would otherwise carry a vocabulary-sized table).
  std::unordered_map<int32_t, int32_t> root_child_;
  std::vector<int32_t> free_;
};

}  // namespace accelcore
