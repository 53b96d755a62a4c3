// The Lookahead drafter and its token trie, against brute-force references:
//  - TokenTrie: every path's count is the number of occurrences of that substring (length <= the
//    window) in the inserted sequences; removal restores the earlier state exactly and frees the
//    nodes; add_path and clear.
//  - Drafter: the retrieval rule (longest context suffix, up to max_match, that occurred earlier
//    with something after it, in the context itself or in a stored output; then best-first
//    growth by combined path count, ties to the lower token id) checked on hand-made cases and on
//    random ones against a brute-force reimplementation; tree order and bounds; the memory bound
//    of the global store and its eviction.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <future>
#include <mutex>
#include <iostream>
#include <map>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <chrono>
#include <utility>
#include <vector>

#include "spec/drafter.h"
#include "spec/token_trie.h"
#include "test_util.h"

namespace accelcore {
namespace {

using Path = std::vector<int32_t>;
using PathCounts = std::map<Path, int64_t>;

std::string str(const Path& p) {
  std::string s = "[";
  for (size_t i = 0; i < p.size(); ++i) s += (i ? " " : "") + std::to_string(p[i]);
  return s + "]";
}

// Every path from the root with its count, checking the trie's structural invariants on the way:
// positive counts, unique child tokens, child() agreeing with the sibling lists, and a node's
// count at least the sum of its children's (each occurrence of a child path extends one of the
// parent path).
PathCounts trie_paths(const TokenTrie& t) {
  PathCounts out;
  Path path;
  std::function<void(int32_t)> walk = [&](int32_t node) {
    int64_t child_sum = 0;
    for (int32_t c = t.first_child(node); c != TokenTrie::kNone; c = t.next_sibling(c)) {
      path.push_back(t.token(c));
      EXPECT_GT(t.count(c), 0) << str(path);
      EXPECT_TRUE(out.emplace(path, t.count(c)).second) << "duplicate child " << str(path);
      EXPECT_EQ(t.child(node, t.token(c)), c) << str(path);
      EXPECT_EQ(t.find(path.data(), static_cast<int>(path.size())), c) << str(path);
      child_sum += t.count(c);
      walk(c);
      path.pop_back();
    }
    if (node != TokenTrie::kRoot) {
      EXPECT_LE(child_sum, t.count(node)) << str(path);
    }
  };
  walk(TokenTrie::kRoot);
  EXPECT_LE(static_cast<int>(path.size()), t.window());
  for (const auto& [p, c] : out) EXPECT_LE(static_cast<int>(p.size()), t.window()) << str(p);
  return out;
}

// Brute force: every substring of length <= window, one count per occurrence.
void brute_add(PathCounts* pc, const std::vector<int32_t>& s, int window, int delta) {
  const int n = static_cast<int>(s.size());
  for (int i = 0; i < n; ++i)
    for (int len = 1; len <= std::min(window, n - i); ++len) {
      Path p(s.begin() + i, s.begin() + i + len);
      if (((*pc)[p] += delta) == 0) pc->erase(p);
    }
}

std::vector<int32_t> random_seq(std::mt19937& rng, int n, int vocab) {
  std::uniform_int_distribution<int32_t> tok(0, vocab - 1);
  std::vector<int32_t> s(n);
  for (auto& t : s) t = tok(rng);
  return s;
}

// A sequence with repeats: random tokens, and now and then a copy of an earlier stretch (of the
// sequence itself or of `pool`), so that long suffix matches exist.
std::vector<int32_t> repetitive_seq(std::mt19937& rng, int n, int vocab, const std::vector<std::vector<int32_t>>& pool) {
  std::uniform_int_distribution<int32_t> tok(0, vocab - 1);
  std::vector<int32_t> s;
  while (static_cast<int>(s.size()) < n) {
    const int kind = static_cast<int>(rng() % 3);
    if (kind == 0 || (s.empty() && pool.empty())) {
      s.push_back(tok(rng));
      continue;
    }
    const std::vector<int32_t>& src = (kind == 1 && !s.empty()) || pool.empty() ? s : pool[rng() % pool.size()];
    if (src.empty()) continue;
    const size_t from = rng() % src.size();
    const size_t len = 1 + rng() % 8;
    for (size_t i = from; i < std::min(src.size(), from + len) && static_cast<int>(s.size()) < n; ++i) {
      const int32_t t = src[i];  // src may be s itself: copy the value before growing s
      s.push_back(t);
    }
  }
  return s;
}

// ---- TokenTrie ----

TEST(TokenTrie, CountsAreSubstringOccurrences) {
  std::mt19937 rng(1);
  for (int window : {1, 2, 3, 5, 9}) {
    for (int vocab : {2, 3, 7, 50}) {
      TokenTrie trie(window);
      PathCounts ref;
      for (int k = 0; k < 6; ++k) {
        const auto s = random_seq(rng, static_cast<int>(rng() % 30), vocab);
        trie.add_windows(s.data(), static_cast<int>(s.size()), +1);
        brute_add(&ref, s, window, +1);
        const PathCounts got = trie_paths(trie);
        ASSERT_EQ(got, ref) << "window " << window << " vocab " << vocab << " after " << k + 1 << " sequences";
        ASSERT_EQ(trie.num_nodes(), ref.size());
      }
    }
  }
}

TEST(TokenTrie, HandCountedExample) {
  TokenTrie trie(3);
  const std::vector<int32_t> s = {1, 2, 1, 2, 1};
  trie.add_windows(s.data(), 5, +1);
  auto count = [&](Path p) {
    const int32_t n = trie.find(p.data(), static_cast<int>(p.size()));
    return n == TokenTrie::kNone ? 0 : trie.count(n);
  };
  EXPECT_EQ(count({1}), 3);
  EXPECT_EQ(count({2}), 2);
  EXPECT_EQ(count({1, 2}), 2);
  EXPECT_EQ(count({2, 1}), 2);
  EXPECT_EQ(count({1, 2, 1}), 2);
  EXPECT_EQ(count({2, 1, 2}), 1);
  EXPECT_EQ(count({1, 2, 1, 2}), 0);  // longer than the window
  EXPECT_EQ(count({3}), 0);
  EXPECT_EQ(trie.num_nodes(), 6u);
  EXPECT_EQ(trie.child(TokenTrie::kRoot, 9), TokenTrie::kNone);
  EXPECT_EQ(trie.child(TokenTrie::kRoot, -1), TokenTrie::kNone);
  EXPECT_EQ(trie.child(TokenTrie::kRoot, 10), TokenTrie::kNone);  // out of the vocabulary
}

TEST(TokenTrie, WindowsAddedInPartsEqualAllAtOnce) {
  std::mt19937 rng(13);
  for (int rep = 0; rep < 50; ++rep) {
    const int window = 1 + static_cast<int>(rng() % 6), n = static_cast<int>(rng() % 40);
    const auto s = random_seq(rng, n, 3);
    TokenTrie whole(window), parts(window);
    whole.add_windows(s.data(), n, +1);
    int at = 0;
    while (at < n) {
      const int next = std::min(n, at + 1 + static_cast<int>(rng() % 7));
      parts.add_windows(s.data(), n, at, next, +1);
      at = next;
    }
    ASSERT_EQ(trie_paths(parts), trie_paths(whole)) << "rep " << rep;
    // Removing the first part leaves exactly the windows of the rest.
    const int cut = n ? static_cast<int>(rng() % (n + 1)) : 0;
    parts.add_windows(s.data(), n, 0, cut, -1);
    TokenTrie rest(window);
    rest.add_windows(s.data(), n, cut, n, +1);
    ASSERT_EQ(trie_paths(parts), trie_paths(rest)) << "rep " << rep;
    ASSERT_EQ(parts.num_nodes(), rest.num_nodes());
    ASSERT_EQ(parts.bytes(), rest.bytes());
  }
}

TEST(TokenTrie, AddPathCountsOnePathAndClearEmpties) {
  TokenTrie trie(3);
  const std::vector<int32_t> a = {4, 5, 6}, b = {4, 5, 7}, c = {4, 9};
  for (const auto* p : {&a, &b, &c, &a}) trie.add_path(p->data(), static_cast<int>(p->size()));
  const PathCounts got = trie_paths(trie);
  const PathCounts want = {{{4}, 4}, {{4, 5}, 3}, {{4, 5, 6}, 2}, {{4, 5, 7}, 1}, {{4, 9}, 1}};
  EXPECT_EQ(got, want);
  trie.clear();
  EXPECT_EQ(trie.num_nodes(), 0u);
  EXPECT_EQ(trie.child(TokenTrie::kRoot, 4), TokenTrie::kNone);
  trie.add_path(c.data(), 2);
  EXPECT_EQ(trie_paths(trie), (PathCounts{{{4}, 1}, {{4, 9}, 1}}));
}

TEST(TokenTrie, RemovalRestoresThePreviousStateAndFreesNodes) {
  std::mt19937 rng(4);
  for (int window : {1, 3, 6}) {
    for (int vocab : {2, 4, 30}) {
      TokenTrie trie(window);
      std::vector<std::vector<int32_t>> seqs;
      for (int k = 0; k < 5; ++k) seqs.push_back(random_seq(rng, static_cast<int>(rng() % 25), vocab));
      std::vector<PathCounts> states = {trie_paths(trie)};
      std::vector<size_t> nodes = {trie.num_nodes()}, bytes = {trie.bytes()};
      for (const auto& s : seqs) {
        trie.add_windows(s.data(), static_cast<int>(s.size()), +1);
        states.push_back(trie_paths(trie));
        nodes.push_back(trie.num_nodes());
        bytes.push_back(trie.bytes());
      }
      // Last in, first out: each removal gives back exactly the state before that insertion.
      for (int k = static_cast<int>(seqs.size()) - 1; k >= 0; --k) {
        trie.add_windows(seqs[k].data(), static_cast<int>(seqs[k].size()), -1);
        ASSERT_EQ(trie_paths(trie), states[k]) << "window " << window << " vocab " << vocab << " removing " << k;
        ASSERT_EQ(trie.num_nodes(), nodes[k]);
        ASSERT_EQ(trie.bytes(), bytes[k]);  // hashed children go back to lists: no memory of history
      }
      ASSERT_EQ(trie.num_nodes(), 0u);
      for (int32_t t = 0; t < vocab; ++t) ASSERT_EQ(trie.child(TokenTrie::kRoot, t), TokenTrie::kNone);

      // Oldest first (as the drafter evicts), with reuse of the freed nodes in between.
      PathCounts ref;
      for (const auto& s : seqs) {
        trie.add_windows(s.data(), static_cast<int>(s.size()), +1);
        brute_add(&ref, s, window, +1);
      }
      for (size_t k = 0; k < seqs.size(); ++k) {
        trie.add_windows(seqs[k].data(), static_cast<int>(seqs[k].size()), -1);
        brute_add(&ref, seqs[k], window, -1);
        const auto extra = random_seq(rng, static_cast<int>(rng() % 10), vocab);
        trie.add_windows(extra.data(), static_cast<int>(extra.size()), +1);
        brute_add(&ref, extra, window, +1);
        ASSERT_EQ(trie_paths(trie), ref) << "window " << window << " vocab " << vocab << " evicting " << k;
        ASSERT_EQ(trie.num_nodes(), ref.size());
        trie.add_windows(extra.data(), static_cast<int>(extra.size()), -1);
        brute_add(&ref, extra, window, -1);
      }
      ASSERT_EQ(trie.num_nodes(), 0u);
    }
  }
}

// ---- Drafter: reference and tree checks ----

// Tree order and bounds: parents before children, parents[] valid, depths consistent, no two
// siblings with the same token, size and depth within the bounds.
void check_tree(const DraftTree& t, int max_nodes, int max_depth, const std::string& what) {
  ASSERT_EQ(t.tokens.size(), t.parents.size()) << what;
  ASSERT_EQ(t.tokens.size(), t.depths.size()) << what;
  ASSERT_LE(t.size(), std::max(max_nodes, 0)) << what;
  std::set<std::pair<int32_t, int32_t>> seen;
  for (int i = 0; i < t.size(); ++i) {
    const int32_t p = t.parents[i];
    if (p == -1) {
      ASSERT_EQ(t.depths[i], 1) << what << " node " << i;
    } else {
      ASSERT_GE(p, 0) << what << " node " << i;
      ASSERT_LT(p, i) << what << ": node " << i << " comes before its parent";
      ASSERT_EQ(t.depths[i], t.depths[p] + 1) << what << " node " << i;
    }
    ASSERT_LE(t.depths[i], max_depth) << what << " node " << i;
    ASSERT_TRUE(seen.insert({p, t.tokens[i]}).second) << what << ": two siblings hold token " << t.tokens[i];
  }
}

// The token path (from the context's end) of each node.
std::vector<Path> node_paths(const DraftTree& t) {
  std::vector<Path> out(t.size());
  for (int i = 0; i < t.size(); ++i) {
    if (t.parents[i] >= 0) out[i] = out[t.parents[i]];
    out[i].push_back(t.tokens[i]);
  }
  return out;
}

struct RefDraft {
  int match = 0;
  PathCounts counts;  // every continuation path of length <= depth with its occurrence count
};

// The retrieval rule, by brute force over the raw token sequences: the longest m <= max_match such
// that the context's last m tokens occur in some source with at least one token after them (the
// request's own tokens, i.e. the context itself, and every stored output); then every path of
// length <= depth after every such occurrence, counted once per occurrence.
RefDraft reference_draft(const std::vector<int32_t>* own, const std::vector<std::vector<int32_t>>& stored,
                         const std::vector<int32_t>& ctx, int max_match, int depth) {
  std::vector<const std::vector<int32_t>*> sources;
  if (own) sources.push_back(own);
  for (const auto& s : stored) sources.push_back(&s);
  const int n = static_cast<int>(ctx.size());
  RefDraft ref;
  for (int m = std::min(n, max_match); m >= 1 && ref.match == 0; --m) {
    for (const auto* src : sources) {
      const int len = static_cast<int>(src->size());
      for (int i = 0; i + m < len; ++i) {
        if (!std::equal(ctx.end() - m, ctx.end(), src->begin() + i)) continue;
        ref.match = m;
        for (int d = 1; d <= depth && i + m + d <= len; ++d) ++ref.counts[Path(src->begin() + i + m, src->begin() + i + m + d)];
      }
    }
  }
  return ref;
}

// Checks a drafter tree against the reference: same match length, and the nodes are what
// best-first growth over the reference counts picks: replaying the tree in order, every node is
// a best candidate (highest count, then lowest token) among the children of the context end and
// of the nodes before it, and the tree stops at max_nodes or when the candidates run out. Ties of
// equal (count, token) under different parents may go either way; where none occurs, the tree is
// also compared as a set of paths with the reference's own deterministic pick. Returns whether
// that exact comparison was made.
bool check_against_reference(const DraftTree& got, int got_match, const RefDraft& ref, int max_nodes,
                             const std::string& what) {
  EXPECT_EQ(got_match, ref.match) << what;
  if (ref.match == 0 || got_match != ref.match) {
    EXPECT_EQ(got.size(), 0) << what;
    return false;
  }
  const std::vector<Path> paths = node_paths(got);
  using Key = std::pair<int64_t, int32_t>;  // (count, -token): larger is better
  auto key = [&](const Path& p) { return Key(ref.counts.at(p), -p.back()); };
  auto children = [&](const Path& parent, std::set<Path>* frontier) {
    for (auto it = ref.counts.lower_bound(parent); it != ref.counts.end(); ++it) {
      const Path& p = it->first;
      if (p.size() < parent.size() || !std::equal(parent.begin(), parent.end(), p.begin())) break;
      if (p.size() == parent.size() + 1) frontier->insert(p);
    }
  };
  // Replay the library's picks.
  std::set<Path> frontier;
  children({}, &frontier);
  for (int i = 0; i < got.size(); ++i) {
    const Path& p = paths[i];
    if (!ref.counts.count(p)) {
      ADD_FAILURE() << what << ": node " << i << " path " << str(p) << " never follows the match";
      return false;
    }
    if (!frontier.count(p)) {
      ADD_FAILURE() << what << ": node " << i << " path " << str(p) << " is not a candidate";
      return false;
    }
    Key best(-1, 0);
    for (const Path& f : frontier) best = std::max(best, key(f));
    if (key(p) != best) {
      ADD_FAILURE() << what << ": node " << i << " path " << str(p) << " has (count " << key(p).first << ", token "
                    << -key(p).second << ") but a candidate has (count " << best.first << ", token " << -best.second << ")";
      return false;
    }
    frontier.erase(p);
    children(p, &frontier);
  }
  EXPECT_EQ(static_cast<size_t>(got.size()), std::min(static_cast<size_t>(max_nodes), ref.counts.size()))
      << what << ": the tree stopped early";

  // The reference's own pick (ties under different parents to the lexicographically first path).
  frontier.clear();
  children({}, &frontier);
  std::set<Path> picked;
  bool ambiguous = false;
  while (static_cast<int>(picked.size()) < max_nodes && !frontier.empty()) {
    const Path* best = nullptr;
    int num_best = 0;
    for (const Path& f : frontier) {
      if (!best || key(f) > key(*best)) {
        best = &f;
        num_best = 1;
      } else if (key(f) == key(*best)) {
        ++num_best;
      }
    }
    ambiguous |= num_best > 1;
    const Path p = *best;
    picked.insert(p);
    frontier.erase(p);
    children(p, &frontier);
  }
  if (ambiguous) return false;
  EXPECT_EQ(std::set<Path>(paths.begin(), paths.end()), picked) << what;
  return true;
}

DrafterConfig config(int vocab, int max_match, int max_depth, size_t memory = 64ull << 20) {
  DrafterConfig c;
  c.max_match = max_match;
  c.max_depth = max_depth;
  c.memory_bytes = memory;
  return c;
}

// own: the context's own occurrences count (as in the engine); false: the store alone.
int propose(Drafter& d, const std::vector<int32_t>& ctx, int max_nodes, int max_depth, DraftTree* t, bool own = true) {
  return d.propose(ctx.data(), static_cast<int>(ctx.size()), max_nodes, max_depth, t, own);
}

// ---- Drafter: hand-made cases ----

TEST(Drafter, PrefersTheLongestSuffixMatch) {
  Drafter d(config(20, 4, 4));
  // "1 2 3" occurred once (then 4); "2 3" three times (then 4, 5, 6).
  const std::vector<int32_t> ctx = {1, 2, 3, 4, 9, 2, 3, 5, 2, 3, 6, 8, 1, 2, 3};
  DraftTree t;
  EXPECT_EQ(propose(d, ctx, 8, 1, &t), 3);
  EXPECT_EQ(t.tokens, (std::vector<int32_t>{4}));
  EXPECT_EQ(propose(d, ctx, 8, 2, &t), 3);
  EXPECT_EQ(t.tokens, (std::vector<int32_t>{4, 9}));
  EXPECT_EQ(t.parents, (std::vector<int32_t>{-1, 0}));
  EXPECT_EQ(t.depths, (std::vector<int32_t>{1, 2}));

  // With max_match 2 the match is "2 3": three continuations of count 1, lower token first.
  Drafter d2(config(20, 2, 4));
  EXPECT_EQ(propose(d2, ctx, 8, 1, &t), 2);
  EXPECT_EQ(t.tokens, (std::vector<int32_t>{4, 5, 6}));
  EXPECT_EQ(t.parents, (std::vector<int32_t>{-1, -1, -1}));
  EXPECT_EQ(propose(d2, ctx, 2, 1, &t), 2);
  EXPECT_EQ(t.tokens, (std::vector<int32_t>{4, 5}));
}

TEST(Drafter, TheContextsOwnEndIsNoMatch) {
  Drafter d(config(20, 4, 4));
  DraftTree t;
  // No token repeats: every suffix occurs only at the end, with nothing after it.
  std::vector<int32_t> ctx = {5, 6, 7, 8};
  EXPECT_EQ(propose(d, ctx, 8, 4, &t), 0);
  EXPECT_EQ(t.size(), 0);
  // "7 8" and "8" only at the end; "6 7 8 6"? no: the suffix "6" occurred before (then 7).
  ctx.push_back(6);
  EXPECT_EQ(propose(d, ctx, 8, 4, &t), 1);
  EXPECT_EQ(t.tokens, (std::vector<int32_t>{7, 8, 6}));  // a chain: 6 -> 7 -> 8 -> 6
  EXPECT_EQ(t.depths, (std::vector<int32_t>{1, 2, 3}));
  // Overlapping occurrences count: in "1 2 3 1 2 3" the suffix "1 2 3" occurred at 0, then 1.
  std::vector<int32_t> rep = {1, 2, 3, 1, 2, 3};
  EXPECT_EQ(propose(d, rep, 8, 1, &t), 3);
  EXPECT_EQ(t.tokens, (std::vector<int32_t>{1}));

  // A stored output's end is no match either, but its inside is.
  Drafter g(config(20, 4, 4));
  const std::vector<int32_t> out = {4, 5, 6};
  g.add_output(out.data(), 3);
  g.flush();
  EXPECT_EQ(propose(g, {9, 5, 6}, 8, 4, &t), 0);
  EXPECT_EQ(propose(g, {9, 4, 5}, 8, 4, &t), 2);
  EXPECT_EQ(t.tokens, (std::vector<int32_t>{6}));
}

TEST(Drafter, BranchesRankedByCountTiesToTheLowerToken) {
  Drafter d(config(20, 2, 4));
  // After "10 11": 3 once, 5 three times, 2 once, 7 once; after "10 11 5" always 10.
  const std::vector<int32_t> ctx = {10, 11, 3, 10, 11, 5, 10, 11, 5, 10, 11, 5, 10, 11, 2, 10, 11, 7, 10, 11};
  DraftTree t;
  EXPECT_EQ(propose(d, ctx, 4, 1, &t), 2);
  EXPECT_EQ(t.tokens, (std::vector<int32_t>{5, 2, 3, 7}));
  EXPECT_EQ(propose(d, ctx, 2, 1, &t), 2);
  EXPECT_EQ(t.tokens, (std::vector<int32_t>{5, 2}));
  // Depth 2: "5 10" (count 3) beats the count-1 siblings of 5.
  EXPECT_EQ(propose(d, ctx, 3, 2, &t), 2);
  EXPECT_EQ(t.tokens, (std::vector<int32_t>{5, 10, 2}));
  EXPECT_EQ(t.parents, (std::vector<int32_t>{-1, 0, -1}));
  EXPECT_EQ(t.depths, (std::vector<int32_t>{1, 2, 1}));

  // Counts of the request's own tokens and of the stored outputs add up: 7 now follows 1 + 3 times.
  const std::vector<int32_t> out = {10, 11, 7, 10, 11, 7, 10, 11, 7};
  d.add_output(out.data(), static_cast<int>(out.size()));
  d.flush();
  EXPECT_EQ(propose(d, ctx, 2, 1, &t), 2);
  EXPECT_EQ(t.tokens, (std::vector<int32_t>{7, 5}));
  // The store alone (the context's own occurrences left out).
  EXPECT_EQ(propose(d, ctx, 4, 1, &t, false), 2);
  EXPECT_EQ(t.tokens, (std::vector<int32_t>{7}));
}

TEST(Drafter, RespectsMaxNodesAndMaxDepth) {
  Drafter d(config(10, 3, 5));
  std::vector<int32_t> ctx;
  for (int i = 0; i < 20; ++i)
    for (int32_t t : {1, 2, 3}) ctx.push_back(t);
  DraftTree t;
  // Period 3: the draft is the chain 1 2 3 1 2 ..., as deep as allowed.
  EXPECT_EQ(propose(d, ctx, 100, 100, &t), 3);
  EXPECT_EQ(t.tokens, (std::vector<int32_t>{1, 2, 3, 1, 2}));  // the drafter's own max_depth (5)
  EXPECT_EQ(propose(d, ctx, 100, 2, &t), 3);
  EXPECT_EQ(t.tokens, (std::vector<int32_t>{1, 2}));
  EXPECT_EQ(propose(d, ctx, 3, 5, &t), 3);
  EXPECT_EQ(t.tokens, (std::vector<int32_t>{1, 2, 3}));
  EXPECT_EQ(propose(d, ctx, 0, 5, &t), 0);
  EXPECT_EQ(t.size(), 0);
  EXPECT_EQ(propose(d, ctx, 5, 0, &t), 0);
  EXPECT_EQ(t.size(), 0);
  EXPECT_EQ(d.propose(ctx.data(), 0, 5, 5, &t), 0);
  EXPECT_EQ(t.size(), 0);

  // A bushy tree: random repetitive contexts, many bounds.
  std::mt19937 rng(5);
  for (int rep = 0; rep < 200; ++rep) {
    const int cfg_depth = 1 + static_cast<int>(rng() % 6);
    Drafter b(config(4, 1 + static_cast<int>(rng() % 4), cfg_depth));
    const auto s = random_seq(rng, 5 + static_cast<int>(rng() % 60), 4);
    const int max_nodes = static_cast<int>(rng() % 30), max_depth = 1 + static_cast<int>(rng() % 8);
    propose(b, s, max_nodes, max_depth, &t);
    ASSERT_NO_FATAL_FAILURE(check_tree(t, max_nodes, std::min(max_depth, cfg_depth), "bushy " + std::to_string(rep)));
    if (max_nodes > 0 && std::find(s.begin(), s.end() - 1, s.back()) != s.end() - 1) {  // the last token recurs
      EXPECT_GT(t.size(), 0) << "bushy " << rep << " " << str(s);
    }
  }
}

TEST(Drafter, RejectsNonPositiveMatchOrDepth) {
  EXPECT_ANY_THROW(Drafter(config(10, 0, 4)));
  EXPECT_ANY_THROW(Drafter(config(10, 4, 0)));
}

// ---- Drafter: random cases against the brute-force rule ----

TEST(Drafter, MatchesBruteForceRetrievalOnRandomCases) {
  std::mt19937 rng(6);
  int checked = 0, exact = 0, with_draft = 0;
  for (int trial = 0; trial < 300; ++trial) {
    const int vocab = 2 + static_cast<int>(rng() % 10);
    const int max_match = 1 + static_cast<int>(rng() % 6), max_depth = 1 + static_cast<int>(rng() % 5);
    // Now and then a small store, so that eviction keeps only the newest outputs.
    const size_t memory = rng() % 4 == 0 ? 200 + rng() % 2000 : 64ull << 20;
    Drafter d(config(vocab, max_match, max_depth, memory));
    std::vector<std::vector<int32_t>> kept;  // kept outputs, oldest first
    const int num_finished = static_cast<int>(rng() % 6);
    for (int k = 0; k < num_finished; ++k) {
      const auto prompt = random_seq(rng, static_cast<int>(rng() % 10), vocab);
      const auto out = repetitive_seq(rng, static_cast<int>(rng() % 40), vocab, kept);
      const bool keep = rng() % 5 != 0;
      if (keep) d.add_output(out.data(), static_cast<int>(out.size()));
      if (keep && !out.empty()) kept.push_back(out);
      ASSERT_LE(d.global_bytes(), memory);
    }
    d.flush();  // index the pending outputs, evicting what the bound does not hold
    ASSERT_LE(d.global_bytes(), memory);
    ASSERT_LE(d.num_global_sequences(), kept.size());
    // Eviction removes the oldest outputs whole: the store is the newest num_global_sequences().
    const std::vector<std::vector<int32_t>> stored(kept.end() - d.num_global_sequences(), kept.end());

    // A live request, decoding: propose after every token, as the scheduler does.
    std::vector<int32_t> ctx = repetitive_seq(rng, 1 + static_cast<int>(rng() % 20), vocab, stored);
    const std::vector<int32_t> more = repetitive_seq(rng, 25, vocab, stored);
    for (int step = 0; step <= static_cast<int>(more.size()); ++step) {
      const int max_nodes = 1 + static_cast<int>(rng() % 20), req_depth = 1 + static_cast<int>(rng() % (max_depth + 2));
      const int depth = std::min(req_depth, max_depth);
      for (const bool own : {true, false}) {
        // own: the context's occurrences and the store, as the engine drafts; else the store alone.
        DraftTree t;
        const int m = propose(d, ctx, max_nodes, req_depth, &t, own);
        const std::string what = "trial " + std::to_string(trial) + " step " + std::to_string(step) +
                                 (own ? " own" : " store-only") + " ctx " + str(ctx);
        ASSERT_NO_FATAL_FAILURE(check_tree(t, max_nodes, depth, what));
        const RefDraft ref = reference_draft(own ? &ctx : nullptr, stored, ctx, max_match, depth);
        const bool was_exact = check_against_reference(t, m, ref, max_nodes, what);
        if (::testing::Test::HasFailure()) return;
        // Any hint at the match length gives the same draft.
        for (int hint : {1, m, m + 1, max_match, max_match + 3}) {
          DraftTree h;
          ASSERT_EQ(d.propose(ctx.data(), static_cast<int>(ctx.size()), max_nodes, req_depth, &h, own, hint), m) << what;
          ASSERT_EQ(h.tokens, t.tokens) << what << " hint " << hint;
          ASSERT_EQ(h.parents, t.parents) << what << " hint " << hint;
          ASSERT_EQ(h.shares, t.shares) << what << " hint " << hint;
        }
        ++checked;
        exact += was_exact;
        with_draft += t.size() > 0;
      }
      if (step < static_cast<int>(more.size())) {
        ctx.push_back(more[step]);
      }
    }
  }
  std::cout << "[ INFO     ] " << checked << " proposals checked, " << with_draft << " with a draft, " << exact
            << " also compared exactly as a set of paths\n";
  EXPECT_GT(with_draft, checked / 2);
  EXPECT_GT(exact, checked / 4);
}

// ---- Drafter: lazy indexing ----

TEST(Drafter, LazyIndexingKeepsWhatEagerIndexingKeeps) {
  // The same outputs into three stores with a tight bound: one indexed after every output (as an
  // eager store would be), one only at the end, one in random small parts as it goes. Once all
  // is indexed they keep the same outputs and draft the same.
  std::mt19937 rng(11);
  for (int trial = 0; trial < 50; ++trial) {
    const size_t memory = 300 + rng() % 3000;
    Drafter eager(config(6, 4, 4, memory)), lazy(config(6, 4, 4, memory)), parts(config(6, 4, 4, memory));
    std::vector<std::vector<int32_t>> kept;
    for (int k = 0; k < 12; ++k) {
      const auto out = repetitive_seq(rng, static_cast<int>(rng() % 50), 6, kept);
      if (!out.empty()) kept.push_back(out);
      for (Drafter* d : {&eager, &lazy, &parts}) d->add_output(out.data(), static_cast<int>(out.size()));
      eager.flush();
      parts.index(rng() % 30);
      for (Drafter* d : {&eager, &lazy, &parts}) ASSERT_LE(d->global_bytes(), memory);
    }
    lazy.flush();
    parts.flush();
    for (Drafter* d : {&lazy, &parts}) {
      ASSERT_EQ(d->num_global_sequences(), eager.num_global_sequences()) << "trial " << trial;
      ASSERT_EQ(d->global_bytes(), eager.global_bytes()) << "trial " << trial;
      ASSERT_EQ(d->num_pending_tokens(), 0u);
    }
    for (int q = 0; q < 20; ++q) {
      const auto ctx = repetitive_seq(rng, 1 + static_cast<int>(rng() % 8), 6, kept);
      DraftTree a, b, c;
      const int m = propose(eager, ctx, 8, 4, &a);
      ASSERT_EQ(propose(lazy, ctx, 8, 4, &b), m);
      ASSERT_EQ(propose(parts, ctx, 8, 4, &c), m);
      ASSERT_EQ(a.tokens, b.tokens);
      ASSERT_EQ(a.parents, b.parents);
      ASSERT_EQ(a.tokens, c.tokens);
      ASSERT_EQ(a.parents, c.parents);
    }
  }
}

TEST(Drafter, OutputsDraftOnceIndexedAndIndexingIsBounded) {
  Drafter d(config(1000, 4, 4));
  std::mt19937 rng(12);
  std::vector<int32_t> out(1000);
  for (int k = 0; k < 20; ++k) {
    for (auto& x : out) x = static_cast<int32_t>(rng() % 1000);
    d.add_output(out.data(), static_cast<int>(out.size()));
  }
  EXPECT_EQ(d.num_pending_tokens(), 20000u);
  const size_t pending_bytes = d.global_bytes();
  DraftTree t;
  // Pending outputs do not draft yet.
  EXPECT_EQ(propose(d, {out[10], out[11]}, 1, 1, &t), 0);
  EXPECT_EQ(d.num_pending_tokens(), 20000u);
  // Oldest first, exactly the amount asked for (an output may be indexed in parts).
  d.index(1500);
  EXPECT_EQ(d.num_pending_tokens(), 18500u);
  const size_t after_part = d.global_bytes() - pending_bytes;
  EXPECT_GT(after_part, 0u);
  EXPECT_LT(propose(d, {out[10], out[11]}, 1, 1, &t), 2);  // the newest output is still pending
  d.index(0);
  EXPECT_EQ(d.num_pending_tokens(), 18500u);
  d.flush();
  EXPECT_EQ(d.num_pending_tokens(), 0u);
  EXPECT_GT(d.global_bytes() - pending_bytes, 5 * after_part);
  EXPECT_GE(propose(d, {out[10], out[11]}, 1, 1, &t), 2);
  EXPECT_EQ(t.tokens, (std::vector<int32_t>{out[12]}));
}

}  // namespace

// The store's lock, as the background thread holds it while it indexes.
struct DrafterTestAccess {
  static std::mutex& store(Drafter& d) { return d.mu_; }
};

namespace {

// While another thread holds the store (the background indexer may be preempted holding it), the
// stepping thread's calls return at once: a new output waits in the inbox, a proposal drafts from
// the context alone, dropping takes from the inbox. Afterwards the store is what a store given
// the same outputs in the same order holds.
TEST(Drafter, TheSteppingThreadNeverWaitsForABusyStore) {
  Drafter d(config(100, 4, 4)), ref(config(100, 4, 4));
  std::mt19937 rng(15);
  auto random_output = [&] {
    std::vector<int32_t> o(60);
    for (auto& x : o) x = static_cast<int32_t>(rng() % 100);
    return o;
  };
  const auto a = random_output(), b = random_output(), c = random_output();
  d.add_output(a.data(), 60);
  d.flush();
  std::promise<void> held, release;
  std::thread holder([&] {
    std::lock_guard<std::mutex> lock(DrafterTestAccess::store(d));
    held.set_value();
    release.get_future().wait();
  });
  held.get_future().wait();
  auto calls = std::async(std::launch::async, [&] {
    d.add_output(b.data(), 60);
    d.add_output(c.data(), 60);
    EXPECT_EQ(d.num_pending_tokens(), 120u);
    DraftTree t;
    // a's text is in the store only: nothing to draft while it is busy.
    EXPECT_EQ(propose(d, {a[10], a[11], a[12]}, 4, 4, &t), 0);
    // The context's own repetition still drafts.
    EXPECT_GE(propose(d, {7, 8, 9, 5, 7, 8}, 4, 4, &t), 2);
    EXPECT_EQ(t.tokens, (std::vector<int32_t>{9, 5, 7, 8}));
    d.drop_pending(60);  // b, the oldest, goes
    EXPECT_EQ(d.num_pending_tokens(), 60u);
  });
  const bool returned = calls.wait_for(std::chrono::seconds(10)) == std::future_status::ready;
  release.set_value();
  holder.join();
  calls.get();
  ASSERT_TRUE(returned) << "a call waited for the busy store";
  d.flush();
  ref.add_output(a.data(), 60);
  ref.add_output(c.data(), 60);
  ref.flush();
  EXPECT_EQ(d.num_global_sequences(), 2u);
  EXPECT_EQ(d.global_bytes(), ref.global_bytes());
  for (const auto* o : {&a, &b, &c}) {
    DraftTree x, y;
    const std::vector<int32_t> ctx(o->begin() + 20, o->begin() + 23);
    ASSERT_EQ(propose(d, ctx, 4, 4, &x), propose(ref, ctx, 4, 4, &y));
    ASSERT_EQ(x.tokens, y.tokens);
  }
}

// Under sustained load the scheduler drops waiting outputs instead of indexing them on the
// critical path: the oldest wholly pending ones go; indexed and partly indexed ones stay, and the
// store then holds exactly what a store given only the kept outputs holds.
TEST(Drafter, DropPendingDropsTheOldestWhollyPendingOutputs) {
  Drafter d(config(100, 4, 4)), ref(config(100, 4, 4));
  std::mt19937 rng(13);
  std::vector<std::vector<int32_t>> outs(6);
  for (auto& o : outs) {
    o.resize(100);
    for (auto& x : o) x = static_cast<int32_t>(rng() % 100);
    d.add_output(o.data(), 100);
  }
  d.index(150);  // outputs 0 whole, 1 in part
  EXPECT_EQ(d.num_pending_tokens(), 450u);
  d.drop_pending(460);  // nothing to do
  EXPECT_EQ(d.num_global_sequences(), 6u);
  d.drop_pending(220);  // 2, 3 and 4 go (450 -> 150): 50 of 1 and all of 5 are left pending
  EXPECT_EQ(d.num_pending_tokens(), 150u);
  EXPECT_EQ(d.num_global_sequences(), 3u);
  d.drop_pending(0);  // 5 goes; the rest of 1 is pending, but 1 is partly indexed: it stays
  EXPECT_EQ(d.num_pending_tokens(), 50u);
  EXPECT_EQ(d.num_global_sequences(), 2u);
  d.flush();
  for (int k : {0, 1}) ref.add_output(outs[k].data(), 100);
  ref.flush();
  EXPECT_EQ(d.global_bytes(), ref.global_bytes());
  for (int k = 0; k < 6; ++k) {
    DraftTree a, b;
    const std::vector<int32_t> ctx(outs[k].begin(), outs[k].begin() + 3);
    ASSERT_EQ(propose(d, ctx, 4, 4, &a), propose(ref, ctx, 4, 4, &b)) << "output " << k;
    ASSERT_EQ(a.tokens, b.tokens) << "output " << k;
  }
}

// After the stepping thread says it is busy, the background thread leaves the pending outputs
// alone until it says it is idle, and then for the quiet window (here long, so that the check
// cannot race it; indexing all 2000 tokens takes about 1.5 ms); then it indexes them all.
TEST(Drafter, BackgroundIndexingWaitsWhileTheSteppingThreadIsBusy) {
  DrafterConfig c = config(100, 4, 4);
  c.background_quiet = std::chrono::milliseconds(300);
  Drafter d(c);
  d.start_background_indexing();
  std::mt19937 rng(16);
  std::vector<int32_t> out(2000);
  for (auto& x : out) x = static_cast<int32_t>(rng() % 100);
  const auto busy = std::chrono::steady_clock::now();
  d.note_busy();
  d.add_output(out.data(), static_cast<int>(out.size()));
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  const size_t pending = d.num_pending_tokens();
  if (std::chrono::steady_clock::now() - busy < c.background_quiet) {
    EXPECT_EQ(pending, 2000u);
  }
  d.note_idle();
  testing::eventually([&] { return d.num_pending_tokens() == 0; });
  EXPECT_EQ(d.num_pending_tokens(), 0u);
  EXPECT_GE(std::chrono::steady_clock::now() - busy, c.background_quiet);
}

// Busy steps that follow each other with pauses longer than the quiet window are still busy:
// nothing is indexed until the stepping thread says it is idle.
TEST(Drafter, BackgroundIndexingWaitsForIdle) {
  DrafterConfig c = config(100, 4, 4);
  c.background_quiet = std::chrono::microseconds(100);
  Drafter d(c);
  d.start_background_indexing();
  std::vector<int32_t> out(500);
  for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<int32_t>(i % 37);
  d.note_busy();
  d.add_output(out.data(), static_cast<int>(out.size()));
  std::this_thread::sleep_for(std::chrono::milliseconds(60));  // three of the thread's timeouts
  EXPECT_EQ(d.num_pending_tokens(), 500u);
  d.note_idle();
  testing::eventually([&] { return d.num_pending_tokens() == 0; });
  EXPECT_EQ(d.num_pending_tokens(), 0u);
}

TEST(Drafter, BackgroundIndexingIndexesEverythingAndKeepsTheBound) {
  const size_t memory = 20000;
  Drafter d(config(50, 4, 4, memory)), ref(config(50, 4, 4, memory));
  d.start_background_indexing();
  d.start_background_indexing();  // a second call does nothing
  std::mt19937 rng(14);
  std::vector<std::vector<int32_t>> kept;
  for (int k = 0; k < 200; ++k) {
    const auto out = repetitive_seq(rng, 1 + static_cast<int>(rng() % 60), 50, kept);
    kept.push_back(out);
    d.add_output(out.data(), static_cast<int>(out.size()));
    ref.add_output(out.data(), static_cast<int>(out.size()));
    ref.flush();
    ASSERT_LE(d.global_bytes(), memory);
    if (k % 20 == 0) {  // proposals meanwhile, from this thread
      DraftTree t;
      propose(d, out, 4, 4, &t);
    }
  }
  // The background thread works off the rest (it may run only when a core is idle: wait).
  testing::eventually([&] { return d.num_pending_tokens() == 0; });
  ASSERT_EQ(d.num_pending_tokens(), 0u);
  EXPECT_EQ(d.num_global_sequences(), ref.num_global_sequences());
  EXPECT_EQ(d.global_bytes(), ref.global_bytes());
  for (int q = 0; q < 50; ++q) {
    const auto ctx = repetitive_seq(rng, 1 + static_cast<int>(rng() % 8), 50, kept);
    DraftTree a, b;
    ASSERT_EQ(propose(d, ctx, 8, 4, &a), propose(ref, ctx, 8, 4, &b));
    ASSERT_EQ(a.tokens, b.tokens);
  }
}

// ---- Drafter: the memory bound of the global store ----

TEST(Drafter, GlobalStoreStaysWithinItsMemoryBound) {
  const size_t memory = 40000;
  const int vocab = 1000;
  Drafter d(config(vocab, 8, 4, memory));
  DraftTree t;
  // The first output uses tokens no later output has; it drafts now, and must not once evicted.
  std::vector<int32_t> first;
  for (int32_t i = 0; i < 40; ++i) first.push_back(900 + i);
  d.add_output(first.data(), static_cast<int>(first.size()));
  d.flush();
  EXPECT_EQ(propose(d, {7, 900, 901, 902}, 4, 4, &t), 3);
  EXPECT_EQ(t.tokens, (std::vector<int32_t>{903, 904, 905, 906}));

  std::mt19937 rng(7);
  std::uniform_int_distribution<int32_t> tok(0, 799);
  size_t max_bytes = 0, max_seqs = 0;
  for (uint64_t id = 2; id < 10002; ++id) {
    std::vector<int32_t> prompt(1 + rng() % 8), out(rng() % 60);
    for (auto& x : prompt) x = tok(rng);
    for (auto& x : out) x = tok(rng);
    // A live engine indexes pending outputs as it drafts.
    if (id % 3 == 0) d.index(64);
    const bool keep = rng() % 10 != 0;
    if (keep) d.add_output(out.data(), static_cast<int>(out.size()));
    ASSERT_LE(d.global_bytes(), memory) << "after request " << id;
    if (d.num_global_sequences() == 0) {
      ASSERT_EQ(d.global_bytes(), 0u);
    }
    max_bytes = std::max(max_bytes, d.global_bytes());
    max_seqs = std::max(max_seqs, d.num_global_sequences());
  }
  d.flush();
  ASSERT_LE(d.global_bytes(), memory);
  EXPECT_GT(max_bytes, memory / 2);  // the store was really used up to near its bound
  EXPECT_GT(d.num_global_sequences(), 0u);
  EXPECT_LT(max_seqs, 10000u);
  // The first output was evicted long ago: its tokens draft nothing any more.
  EXPECT_EQ(propose(d, {7, 900, 901, 902}, 4, 4, &t), 0);
  EXPECT_EQ(t.size(), 0);
  // The newest output is there.
  std::vector<int32_t> newest(20);
  for (auto& x : newest) x = tok(rng);
  d.add_output(newest.data(), static_cast<int>(newest.size()));
  d.flush();
  ASSERT_LE(d.global_bytes(), memory);
  const std::vector<int32_t> probe(newest.begin(), newest.begin() + 3);
  EXPECT_GE(propose(d, probe, 1, 1, &t), 1);
  EXPECT_EQ(t.size(), 1);

  // An output larger than the whole bound is stored and evicted at once.
  std::vector<int32_t> huge(memory / sizeof(int32_t) + 1, 3);
  d.add_output(huge.data(), static_cast<int>(huge.size()));
  EXPECT_EQ(d.num_global_sequences(), 0u);
  EXPECT_EQ(d.global_bytes(), 0u);
  EXPECT_EQ(propose(d, probe, 4, 4, &t), 0);
}

}  // namespace
}  // namespace accelcore
