// The one contract between scheduling and execution: a ragged batch of tokens from many requests,
// flattened. The model never sees requests; the scheduler never sees kernels.
#pragma once

#include <cstdint>
#include <vector>

namespace accelcore {

struct BatchPlan {
  // Per token (size num_tokens()).
  std::vector<int32_t> token_ids;
  std::vector<int32_t> positions;     // position in its sequence (RoPE and the causal bound)
  std::vector<int64_t> slots;         // KV slot the token's K/V is written to: block * block_size + offset
  std::vector<int32_t> seq_of_token;  // index into the per-sequence arrays
  // Per sequence.
  std::vector<int32_t> block_table_offset;  // into block_tables
  std::vector<int32_t> block_tables;        // flattened block ids, position p lives in block p / block_size
  // Tokens whose logits are needed, in the order the logits are returned.
  std::vector<int32_t> logit_rows;
  // Draft-tree tokens (empty when the step has none): token t's ancestors and itself, in depth
  // order, are at extra_slots[extra_offset[t] .. extra_offset[t + 1]); a token with none reads
  // its sequence causally.
  std::vector<int32_t> extra_offset;
  std::vector<int64_t> extra_slots;

  int num_tokens() const { return static_cast<int>(token_ids.size()); }
  int num_seqs() const { return static_cast<int>(block_table_offset.size()); }
  void clear() {
    token_ids.clear();
    positions.clear();
    slots.clear();
    seq_of_token.clear();
    block_table_offset.clear();
    block_tables.clear();
    logit_rows.clear();
    extra_offset.clear();
    extra_slots.clear();
  }
};

}  // namespace accelcore
