// A fixed set of equally sized KV-cache blocks, handed out by reference count.
#pragma once

#include <cstdint>
#include <vector>

namespace nudge {

// Padding value of block tables: "no block here".
constexpr int32_t kNoBlock = -1;

// Blocks needed to hold `slots` KV slots (ceiling division).
inline int64_t blocks_for_slots(int64_t slots, int64_t block_size) {
  return (slots + block_size - 1) / block_size;
}

// Reference counts (rather than a plain owner flag) let several sequences share a block
// later (prefix caching, forks) without changing the pool. A block is free exactly when its
// count is zero, and then it sits on the free list.
class BlockPool {
 public:
  BlockPool(int64_t num_blocks, int64_t block_size);

  // Takes a free block with one reference. Throws std::runtime_error when none is free.
  int32_t allocate();
  // Both throw std::invalid_argument for an out-of-range or free block.
  void incref(int64_t block);
  void decref(int64_t block);

  int64_t ref_count(int64_t block) const;
  bool can_allocate(int64_t n) const;
  bool all_free() const { return num_free() == num_blocks(); }

  int64_t num_free() const { return static_cast<int64_t>(free_blocks_.size()); }
  int64_t num_blocks() const { return static_cast<int64_t>(ref_counts_.size()); }
  int64_t block_size() const { return block_size_; }

 private:
  // Throws std::invalid_argument unless 0 <= block < num_blocks.
  int32_t checked_block(int64_t block) const;

  int64_t block_size_;
  std::vector<int64_t> ref_counts_;
  // Used as a stack: the most recently freed block is reused first (its memory is warm).
  std::vector<int32_t> free_blocks_;
};

}  // namespace nudge
