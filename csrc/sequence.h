// One model's view of one request: the tokens it knows and the KV blocks that hold them.
#pragma once

#include <climits>
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
//
// Prefix caching (when the pool has it on): every full block inside [0, num_computed) is
// registered in the pool under its hash chain as soon as it is computed (block_hashes_ holds
// the chain of those blocks, so they are always a prefix of the table). When num_computed drops
// below a hashed block (truncate after a draft rollback, a lowered set_num_computed) the block's
// slots will be rewritten, so it stops being cached first: a block only this sequence holds is
// unregistered; a block another sequence shares is never written: it and every block after it
// leave the table and num_computed drops to its start (recomputed into fresh blocks).
// No provisional token in the sequence.
constexpr int64_t kNoProvisional = INT64_MAX;

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
  // Appends tokens whose values the host does not know yet (drafts picked on the device): their
  // K/V are computed from the device's values, so no block holding one is cached (its hash would
  // be the placeholder's) until overwrite() gives the values.
  void append_provisional(const std::vector<int64_t>& placeholders);
  // tokens[start:start + len(tokens)] = tokens, in place (no block or num_computed change): the
  // drafts a round appended as placeholders get their values after the walk's one host read.
  // Provisional tokens it covers become known, and their computed full blocks are cached.
  void overwrite(int64_t start, const std::vector<int64_t>& tokens);

  // Blocks to add so positions [0, total_slots) have slots (0 when they already do).
  int64_t blocks_needed(int64_t total_slots) const;
  // Adds those blocks. All-or-nothing: false (and no change) when the pool is short.
  bool reserve(int64_t total_slots);
  // Frees every block and forgets what was computed; tokens stay (recomputed after preemption).
  void release();
  // With an empty block table and nothing computed: takes the longest run of cached full blocks
  // that match the tokens, leaving at least the last token to compute (it must give logits).
  // Returns the tokens taken (0 when caching is off, reuse is off, or the table is not empty).
  int64_t match_cached_prefix();
  // False: this sequence never takes cached blocks (it still registers its own), e.g. when the
  // caller needs every prompt position computed (prompt logprobs).
  bool reuse_cached_prefix() const { return reuse_cached_prefix_; }
  void set_reuse_cached_prefix(bool on) { reuse_cached_prefix_ = on; }
  int64_t num_cached_tokens() const { return num_cached_tokens_; }  // taken by the last match
  int64_t num_hashed_blocks() const { return static_cast<int64_t>(block_hashes_.size()); }

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
  // Registers the full blocks below num_computed that have no hash yet.
  void register_computed_blocks();
  // Slots from position pos on will be rewritten: no block there may stay shared or cached.
  void invalidate_from(int64_t pos);
  uint64_t parent_hash(size_t block_index) const {
    return block_index == 0 ? kRootBlockHash : block_hashes_[block_index - 1];
  }

  std::shared_ptr<BlockPool> pool_;  // shared: the pool outlives every sequence that uses it
  std::vector<int64_t> tokens_;
  std::vector<int32_t> block_table_;
  int64_t num_computed_ = 0;
  std::vector<uint64_t> block_hashes_;  // [i]: hash chain of block i, for i < num_hashed_blocks
  bool reuse_cached_prefix_ = true;
  int64_t num_cached_tokens_ = 0;
  // Position of the first provisional token (see append_provisional); kNoProvisional when none.
  int64_t provisional_from_ = kNoProvisional;
};

}  // namespace nudge
