// Model-free drafting for Lookahead-style speculation: proposes a multi-branch draft tree of
// tokens likely to follow a request's context, from
//  - the context itself (the request's prompt and output so far), searched when a draft is asked
//    for: a scan of the tokens costs less than keeping a per-request index up to date, and
//    nothing at all for a request that never drafts; and
//  - a global store of the outputs of finished requests, with counts, under a hard memory bound:
//    when over it, the oldest stored outputs are removed whole. Outputs wait until indexed: by
//    index() or flush(), or by a background thread (start_background_indexing) that runs only
//    when a core is otherwise idle and the engine has no request to run, so that indexing (about
//    a microsecond per token) stays off the steps' critical path.
// The stepping thread never waits for that thread, which may be preempted while it holds the
// store (it runs at the lowest priority; a step once waited 0.7 ms for it): add_output puts an
// output in an inbox when the store is busy, propose then drafts from the context alone, and
// num_pending_tokens is a plain read.
//
// Retrieval rule: the longest suffix of the context (up to max_match tokens) that occurred before
// in either source; below it, the draft is grown best first by path frequency (counts of the
// context's own occurrences and the store's added), to at most max_nodes nodes and depth
// max_depth. Ties go to the lower token id, so drafts are deterministic.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <mutex>
#include <thread>
#include <utility>
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
  int max_depth = 8;        // deepest draft the store can serve (window = max_match + max_depth)
  size_t memory_bytes = 64ull << 20;  // bound on the global store (nodes and stored outputs)
  // The background thread indexes only after the stepping thread has been quiet this long:
  // longer than the thread pool's workers spin before they sleep (200 us). A spinning worker
  // yields now and then; a yield to this thread leaves the worker off its core, not woken, so
  // not put back until the scheduler's next tick, however soon the next step wants it.
  std::chrono::microseconds background_quiet{300};
};

class Drafter {
 public:
  explicit Drafter(const DrafterConfig& config);
  ~Drafter();
  Drafter(const Drafter&) = delete;
  Drafter& operator=(const Drafter&) = delete;

  // Starts a thread that indexes pending outputs a little at a time, at the lowest scheduling
  // priority (SCHED_IDLE: only on an otherwise idle core), and only while the stepping thread is
  // idle (note_idle, not yet note_busy) and has been quiet for config.background_quiet. The other
  // methods stay safe to call meanwhile, from one thread (the engine's stepping thread;
  // propose's scratch is not shared).
  void start_background_indexing();
  // The stepping thread is working (a step is being scheduled): the background thread stays off
  // the cores until note_idle. While steps follow each other it does not even wake. It used to
  // wake every few tens of microseconds to check, and to index in any pause between steps; the
  // pool's spinning threads yield now and then, and a yield could hand it their core. With
  // drafting turned off, that alone gave stories260K at 1600 req/s (near saturation) a median
  // mean latency of 5.8 ms, against 4.3 ms without speculation. Under a load that never pauses,
  // the backlog is dropped instead (drop_pending).
  void note_busy();
  // The stepping thread has nothing left to run (no request running or waiting).
  void note_idle();

  // A finished request's output joins the store, pending until indexed (in the inbox while the
  // store is busy: it joins the store, in order, when the store is next taken).
  void add_output(const int32_t* output, int n);

  // Indexes up to max_tokens tokens (windows starting at them) of pending outputs, oldest first.
  void index(size_t max_tokens);
  void flush() { index(SIZE_MAX); }
  size_t num_pending_tokens() const;
  // Drops the oldest outputs that are wholly pending until at most max_tokens tokens are pending:
  // under a load that leaves no core idle, the store skips outputs rather than index them on the
  // steps' critical path (about a microsecond per token). Only the inbox's while the store is busy.
  void drop_pending(size_t max_tokens);

  // Proposes a draft after context[0, n) from the context's own earlier occurrences and the
  // indexed store. Returns the match length used (0: no draft). search_context false: the store
  // alone serves (for tests of the store). match_hint (> 0): a guess at the store's match length
  // (the request's last, plus what it has gained since), tried first; the result is the same
  // with any hint or none, only the number of trie walks differs.
  int propose(const int32_t* context, int n, int max_nodes, int max_depth, DraftTree* out, bool search_context = true,
              int match_hint = 0);

  // Bytes of the store (nodes and stored outputs, pending ones included); never above the bound.
  // Outputs in the inbox come on top (the scheduler keeps them under its backlog bound).
  size_t global_bytes() const;
  size_t num_global_sequences() const;  // pending ones included, the inbox's too

 private:
  friend struct DrafterTestAccess;  // holds the store from another thread
  static constexpr size_t kBackgroundChunk = 8;  // tokens the background thread indexes per lock
  // Under mu_.
  void index_locked(size_t max_tokens);
  void take_inbox_locked();  // the inbox's outputs join stored_, in order
  void store_locked(std::vector<int32_t>&& tokens);
  void evict_until_within_bound();
  void background_loop();

  DrafterConfig config_;
  int window_;
  // The store (global_, stored_ and their counters) is shared with the background thread.
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::thread background_;
  bool stop_ = false;
  TokenTrie global_;
  // Global outputs, oldest first. The first num_indexed_ are in global_, the next one may be in
  // part (the windows starting before its `indexed`), the rest are pending.
  struct Stored {
    std::vector<int32_t> tokens;
    int indexed = 0;
  };
  std::deque<Stored> stored_;
  size_t num_indexed_ = 0;
  std::atomic<size_t> pending_tokens_{0};  // tokens whose windows are not indexed yet (inbox included)
  std::atomic<int64_t> last_busy_ns_{0};   // steady clock of the last note_busy
  std::atomic<bool> idle_{true};           // note_idle came after the last note_busy
  // Outputs that came while the store was busy (under inbox_mu_, taken after mu_ if both).
  mutable std::mutex inbox_mu_;
  std::deque<std::vector<int32_t>> inbox_;
  size_t global_bytes_ = 0;
  // Scratch of propose: the continuations of the context's own occurrences of the match, as a
  // trie (rebuilt by each call), and the (end, match length) of candidate occurrences.
  TokenTrie own_;
  std::vector<std::pair<int, int>> occurrences_;
};

}  // namespace accelcore
