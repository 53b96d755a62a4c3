// A trie of token windows with occurrence counts, in a bounded node pool.
//
// Every window tokens[i .. i + W) of an inserted sequence is a path from the root, so any
// substring of length <= W is a path, and a node's count is how many times its substring occurred
// (each occurrence starts exactly one window). Retrieval walks the context's last m tokens from
// the root and reads what followed them, ranked by count.
//
// Children are a doubly linked sibling list; a node with more than kWide children (the root and
// the short prefixes, which fan out to hundreds) also finds them through a hash map, since a walk
// of a long list of scattered nodes made insertion cost a microsecond per token.
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
  // Memory of the live nodes and the hash map's entries (an estimate of the map's per entry cost).
  size_t bytes() const { return num_nodes() * sizeof(Node) + wide_.size() * kBytesPerMapEntry; }

  // Adds (delta = +1) or removes (delta = -1) every window of tokens[0, n). Removal only undoes an
  // earlier insertion of the same tokens; nodes whose count reaches zero are freed.
  void add_windows(const int32_t* tokens, int n, int delta) { add_windows(tokens, n, 0, n, delta); }
  // The same for the windows that start in [begin, end) only (a sequence indexed in parts).
  void add_windows(const int32_t* tokens, int n, int begin, int end, int delta);

  // Adds one path (at most window() tokens) from the root: count + 1 on each of its nodes, and
  // none of its later windows.
  void add_path(const int32_t* tokens, int n);
  // Back to an empty trie, keeping the memory for reuse.
  void clear();

  // The node of the path tokens[0, n) from the root, or kNone.
  int32_t find(const int32_t* tokens, int n) const;

  int32_t child(int32_t node, int32_t token) const;
  int32_t first_child(int32_t node) const { return nodes_[node].first_child; }
  int32_t next_sibling(int32_t node) const { return nodes_[node].next_sibling; }
  int32_t token(int32_t node) const { return nodes_[node].token; }
  int32_t count(int32_t node) const { return nodes_[node].count; }

 private:
  static constexpr int32_t kWide = 8;
  static constexpr size_t kBytesPerMapEntry = 40;
  struct Node {
    int32_t token = -1, count = 0, parent = kNone;
    int32_t first_child = kNone, next_sibling = kNone, prev_sibling = kNone;
    int32_t num_children = 0;
    bool hashed = false;  // its children are in wide_ (it has more than kWide)
  };
  static uint64_t key(int32_t parent, int32_t token) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(parent)) << 32) | static_cast<uint32_t>(token);
  }
  int32_t child_or_add(int32_t node, int32_t token);
  void unlink(int32_t node);

  int window_;
  std::vector<Node> nodes_;  // nodes_[0] is the root
  std::unordered_map<uint64_t, int32_t> wide_;  // (parent, token) -> child, for hashed parents
  std::vector<int32_t> free_;
};

}  // namespace accelcore
