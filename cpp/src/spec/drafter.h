// Model-free drafting for Lookahead-style speculation: proposes a multi-branch draft tree of
// tokens likely to follow a request's context, from
//  - the request's own tokens (prompt and output so far), dropped when the request ends, and
//  - a global store of the outputs of finished requests, with counts, under a hard memory bound:
//    when over it, the oldest stored outputs are removed whole.
//
// Both are indexed lazily, when a draft is asked for: a request that never drafts (SmartSpec at
// high load, or a model where drafts do not pay) costs a copy of its tokens, not a trie update
// per token.
//
// Retrieval rule: the longest suffix of the context (up to max_match tokens) that occurred before
// in either source; below it, the draft is grown best first by path frequency (counts of the
// request's own occurrences and the global ones added), to at most max_nodes nodes and depth
// max_depth. Ties go to the lower token id, so drafts are deterministic.
#pragma once

#include <cstddef>
#include <cstdint>
#include <deque>
#include <unordered_map>
#include <vector>

#include "spec/token_trie.h"

namespace accelcore {

// Nodes with every parent before its children; parent -1 means "child of the last context token".
// shares[i]: node i's count over the count of its most frequent sibling (1 for that one), the
// trie's estimate of how likely it is next to the best alternative.
struct DraftTree {
  std::vector<int32_t> tokens, parents, depths;
  std::vector<float> shares;
  int match = 0;  // length of the context suffix it was retrieved by
  int size() const { return static_cast<int>(tokens.size()); }
  void clear() {
    truncate(0);
    match = 0;
  }
  void truncate(int k) {
    tokens.resize(k);
    parents.resize(k);
    depths.resize(k);
    shares.resize(k);
  }
};

struct DrafterConfig {
  int max_match = 8;        // longest context suffix matched
  int max_depth = 8;        // deepest draft the tries can serve (window = max_match + max_depth)
  size_t memory_bytes = 64ull << 20;  // bound on the global store (nodes and stored outputs)
};

class Drafter {
 public:
  explicit Drafter(const DrafterConfig& config);

  // Indexing work one propose() call does for the store at most (in tokens of pending outputs), so
  // that a request drafting after a long stretch without drafts does not pay for all of it.
  static constexpr size_t kMaxIndexPerCall = 256;

  // A request's tokens: its prompt when added, then each generated token.
  void add_tokens(uint64_t request, const int32_t* tokens, int n);
  // The request ended: its own index goes; its output joins the global store (keep_output).
  void finish(uint64_t request, const int32_t* output, int n, bool keep_output);

  // Proposes a draft after `context` (the request's known tokens). Returns the match length used
  // (0: no draft). Indexes the request's new tokens and, up to kMaxIndexPerCall, the store's.
  int propose(uint64_t request, const int32_t* context, int n, int max_nodes, int max_depth, DraftTree* out);

  // Indexes every pending output now. The outputs kept are the same either way: the newest ones
  // whose index fits the bound.
  void flush() { index_pending(SIZE_MAX); }

  // Bytes of the store (nodes and stored outputs, pending ones included); never above the bound.
  size_t global_bytes() const { return global_bytes_; }
  size_t num_global_sequences() const { return stored_.size(); }  // pending ones included
  size_t num_requests() const { return local_.size(); }

 private:
  struct Local {
    TokenTrie trie;
    std::vector<int32_t> open;     // windows still growing (TokenTrie::extend)
    std::vector<int32_t> pending;  // tokens not yet in the trie
    explicit Local(int window) : trie(window) {}
  };
  void index_pending(size_t max_tokens);
  void evict_until_within_bound();

  DrafterConfig config_;
  int window_;
  TokenTrie global_;
  // Global outputs, oldest first; the first num_indexed_ are in global_, the rest pending.
  std::deque<std::vector<int32_t>> stored_;
  size_t num_indexed_ = 0;
  size_t global_bytes_ = 0;
  std::unordered_map<uint64_t, Local> local_;
};

}  // namespace accelcore
