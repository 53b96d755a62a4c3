// LlamaModel's two ways of running a step across threads (kernel by kernel, or one phased job of
// each thread's share: LlamaModel::run_parts) give the same logits bit for bit, and the same K/V,
// for prompts, decode rows of several sequences and draft-tree rows, on the real stories260K.
#include <gtest/gtest.h>

#include <cstring>
#include <vector>

#include "kv/kv_cache.h"
#include "model/llama.h"
#include "model/model_config.h"
#include "sched/batch_plan.h"
#include "test_util.h"
#include "util/buffer.h"
#include "util/thread_pool.h"

namespace accelcore {
namespace {

constexpr int kBlocksPerSeq = 8;

// One sequence's rows: tokens at positions [first, first + n) after the cache holds [0, first),
// then a chain of `draft` draft rows after the last one; logits for every row.
void add_seq(BatchPlan* plan, int seq, int first, int n, int draft, int block_size, int token0) {
  plan->block_table_offset.push_back(static_cast<int32_t>(plan->block_tables.size()));
  for (int b = 0; b < kBlocksPerSeq; ++b) plan->block_tables.push_back(seq * kBlocksPerSeq + b);
  auto slot = [&](int pos) { return static_cast<int64_t>(seq * kBlocksPerSeq + pos / block_size) * block_size + pos % block_size; };
  const int last = first + n - 1;
  for (int i = first; i <= last + draft; ++i) {
    plan->token_ids.push_back((token0 + 7 * i) % 500 + 1);
    plan->positions.push_back(i);
    plan->slots.push_back(slot(i));
    plan->seq_of_token.push_back(plan->num_seqs() - 1);  // the plan's own index of the sequence
    if (!plan->extra_offset.empty() || draft > 0) {
      if (plan->extra_offset.empty()) plan->extra_offset.assign(plan->num_tokens(), 0);
      for (int a = last + 1; a <= i && i > last; ++a) plan->extra_slots.push_back(slot(a));
      plan->extra_offset.push_back(static_cast<int32_t>(plan->extra_slots.size()));
    }
    plan->logit_rows.push_back(plan->num_tokens() - 1);
  }
}

struct StepsOut {
  std::vector<float> logits, k, v;
};

// The same steps on a fresh cache with the split forced.
StepsOut run(LlamaModel& model, const ModelConfig& c, ThreadPool& pool, LlamaModel::Split split,
        const std::vector<BatchPlan>& steps) {
  KvCacheShape shape;
  shape.num_layers = c.num_layers;
  shape.num_blocks = 4 * kBlocksPerSeq;
  shape.num_kv_heads = c.num_kv_heads;
  shape.block_size = 16;
  shape.head_dim = c.head_dim;
  KvCache cache(shape);
  cache.zero_blocks(shape.num_blocks);  // the slots no step writes compare equal too
  model.set_split(split);
  StepsOut r;
  FloatBuffer logits;
  for (const BatchPlan& plan : steps) {
    model.forward(plan, cache, pool, &logits);
    r.logits.insert(r.logits.end(), logits.data(), logits.data() + plan.logit_rows.size() * c.vocab_size);
  }
  const size_t floats = shape.floats_per_block() * shape.num_blocks;
  for (int l = 0; l < c.num_layers; ++l) {
    r.k.insert(r.k.end(), cache.k(l), cache.k(l) + floats);
    r.v.insert(r.v.end(), cache.v(l), cache.v(l) + floats);
  }
  model.set_split(LlamaModel::Split::kMeasured);
  return r;
}

TEST(ModelSplit, PhasedPartsGiveTheKernelSplitsBits) {
  const std::string dir = testing::test_model_dir();
  ModelConfig config = load_model_config(dir);
  ModelWeights weights = load_weights(config, dir);
  LlamaModel model(config, std::move(weights));
  const ModelConfig& c = model.config();
  // Prompts of three sequences (one past a block boundary), one decode row each, then decode
  // rows with draft chains (a tree's branches are chains) and a lone decode row.
  std::vector<BatchPlan> steps(4);
  add_seq(&steps[0], 0, 0, 21, 0, 16, 3);
  add_seq(&steps[0], 1, 0, 5, 0, 16, 11);
  add_seq(&steps[0], 2, 0, 40, 0, 16, 29);
  add_seq(&steps[1], 0, 21, 1, 0, 16, 3);
  add_seq(&steps[1], 1, 5, 1, 0, 16, 11);
  add_seq(&steps[1], 2, 40, 1, 0, 16, 29);
  add_seq(&steps[2], 0, 22, 1, 4, 16, 3);
  add_seq(&steps[2], 2, 41, 1, 2, 16, 29);
  add_seq(&steps[3], 1, 6, 1, 0, 16, 11);
  for (int threads : {2, 3, 5}) {
    ThreadPool pool(threads);
    KvCacheShape probe;
    probe.num_layers = c.num_layers, probe.num_blocks = 1, probe.num_kv_heads = c.num_kv_heads;
    probe.block_size = 16, probe.head_dim = c.head_dim;
    ASSERT_TRUE(model.can_split_parts(1, KvCache(probe), pool)) << "stories260K should run phased on " << threads << " threads";
    const StepsOut kernels = run(model, c, pool, LlamaModel::Split::kKernels, steps);
    const StepsOut parts = run(model, c, pool, LlamaModel::Split::kParts, steps);
    ASSERT_EQ(kernels.logits.size(), parts.logits.size());
    EXPECT_EQ(0, std::memcmp(kernels.logits.data(), parts.logits.data(), kernels.logits.size() * sizeof(float)))
        << threads << " threads: logits differ";
    EXPECT_EQ(0, std::memcmp(kernels.k.data(), parts.k.data(), kernels.k.size() * sizeof(float))) << threads << " threads: K";
    EXPECT_EQ(0, std::memcmp(kernels.v.data(), parts.v.data(), kernels.v.size() * sizeof(float))) << threads << " threads: V";
    // And against one thread (where no split applies).
    ThreadPool one(1);
    const StepsOut serial = run(model, c, one, LlamaModel::Split::kMeasured, steps);
    EXPECT_EQ(0, std::memcmp(serial.logits.data(), parts.logits.data(), serial.logits.size() * sizeof(float)))
        << threads << " threads against one";
  }
}

}  // namespace
}  // namespace accelcore
