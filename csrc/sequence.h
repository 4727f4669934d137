// One model's view of one request: the tokens it knows and the KV blocks that hold them.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "block_pool.h"

namespace nudge {

// Invariants (checked by every mutator):
//   0 <= num_computed <= num_tokens
//   num_computed <= num_reserved_slots   (computed K/V always have a slot)
// Tokens beyond num_computed are "pending": known, but their K/V are not in the cache yet.
// Blocks are only ever added at the end of the block table and removed from the end, so the
// slot of position p is fixed for as long as the sequence holds it.
class Sequence {
 public:
  explicit Sequence(std::shared_ptr<BlockPool> pool);
  // Returns the blocks, so a sequence dropped without release() does not leak them.
  ~Sequence();
  Sequence(const Sequence&) = delete;
  Sequence& operator=(const Sequence&) = delete;

  void append(int64_t token);
  void append(const std::vector<int64_t>& tokens);
  // Throws std::invalid_argument unless 0 <= n <= num_tokens and n <= num_reserved_slots.
  void set_num_computed(int64_t n);
  // Keeps tokens[:n] and the blocks that hold their slots; the rest go back to the pool.
  void truncate(int64_t n);
  // tokens[start:start + len(tokens)] = tokens, in place (no block or num_computed change): the
  // drafts a round appended as placeholders get their values after the walk's one host read.
  void overwrite(int64_t start, const std::vector<int64_t>& tokens);

  // Blocks to add so positions [0, total_slots) have slots (0 when they already do).
  int64_t blocks_needed(int64_t total_slots) const;
  // Adds those blocks. All-or-nothing: false (and no change) when the pool is short.
  bool reserve(int64_t total_slots);
  // Frees every block and forgets what was computed; tokens stay (recomputed after preemption).
  void release();

  const std::vector<int64_t>& tokens() const { return tokens_; }
  const std::vector<int32_t>& block_table() const { return block_table_; }
  const std::shared_ptr<BlockPool>& pool() const { return pool_; }
  int64_t num_tokens() const { return static_cast<int64_t>(tokens_.size()); }
  int64_t num_computed() const { return num_computed_; }
  int64_t num_pending() const { return num_tokens() - num_computed_; }
  int64_t block_size() const { return pool_->block_size(); }
  int64_t num_reserved_slots() const {
    return static_cast<int64_t>(block_table_.size()) * pool_->block_size();
  }

 private:
  // Drops the blocks at table positions >= keep, newest first.
  void free_blocks_from(size_t keep);

  std::shared_ptr<BlockPool> pool_;  // shared: the pool outlives every sequence that uses it
  std::vector<int64_t> tokens_;
  std::vector<int32_t> block_table_;
  int64_t num_computed_ = 0;
};

}  // namespace nudge
