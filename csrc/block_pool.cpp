#include "block_pool.h"

#include <limits>
#include <stdexcept>
#include <string>

namespace nudge {

BlockPool::BlockPool(int64_t num_blocks, int64_t block_size, bool enable_prefix_caching)
    : block_size_(block_size),
      prefix_caching_(enable_prefix_caching),
      cache_(num_blocks > 0 && num_blocks <= std::numeric_limits<int32_t>::max() ? num_blocks : 0) {
  // Block ids travel as int32 in block tables, and slot ids (block * block_size + offset)
  // must fit an int64 comfortably, so both are capped at the int32 range.
  constexpr int64_t kMaxInt32 = std::numeric_limits<int32_t>::max();
  if (num_blocks <= 0 || num_blocks > kMaxInt32) {
    throw std::invalid_argument("BlockPool: num_blocks must be in [1, 2^31), got " +
                                std::to_string(num_blocks));
  }
  if (block_size <= 0 || block_size > kMaxInt32) {
    throw std::invalid_argument("BlockPool: block_size must be in [1, 2^31), got " +
                                std::to_string(block_size));
  }
  ref_counts_.assign(static_cast<size_t>(num_blocks), 0);
  free_blocks_.reserve(static_cast<size_t>(num_blocks));
  // Pushed in reverse so a fresh pool hands out 0, 1, 2, ... (easier to read in tests).
  for (int64_t b = num_blocks - 1; b >= 0; --b) free_blocks_.push_back(static_cast<int32_t>(b));
}

int32_t BlockPool::checked_block(int64_t block) const {
  if (block < 0 || block >= num_blocks()) {
    throw std::invalid_argument("block id " + std::to_string(block) + " out of range [0, " +
                                std::to_string(num_blocks()) + ")");
  }
  return static_cast<int32_t>(block);
}

int32_t BlockPool::allocate() {
  int32_t block;
  if (!free_blocks_.empty()) {
    block = free_blocks_.back();
    free_blocks_.pop_back();
  } else {
    block = cache_.evict_lru();
    if (block < 0) throw std::runtime_error("KV block pool exhausted");
    ++evictions_;
  }
  ref_counts_[block] = 1;
  return block;
}

int32_t BlockPool::acquire_cached(uint64_t hash, uint64_t parent, const int64_t* tokens, int64_t n) {
  if (!prefix_caching_) return kNoBlock;
  const int32_t block = cache_.lookup(hash, parent, tokens, n);
  if (block < 0) return kNoBlock;
  if (ref_counts_[block] == 0) cache_.remove_evictable(block);
  ++ref_counts_[block];
  return block;
}

bool BlockPool::register_block(int64_t block, uint64_t hash, uint64_t parent, const int64_t* tokens,
                               int64_t n) {
  const int32_t b = checked_block(block);
  if (!prefix_caching_) return false;
  if (ref_counts_[b] == 0) throw std::invalid_argument("register_block of free block " + std::to_string(block));
  return cache_.insert(b, hash, parent, tokens, n);
}

void BlockPool::unregister_block(int64_t block) {
  const int32_t b = checked_block(block);
  if (ref_counts_[b] == 0) throw std::invalid_argument("unregister_block of free block " + std::to_string(block));
  cache_.erase(b);
}

int64_t BlockPool::reset_prefix_cache() {
  const std::vector<int32_t> dropped = cache_.evict_all();
  free_blocks_.insert(free_blocks_.end(), dropped.begin(), dropped.end());
  return static_cast<int64_t>(dropped.size());
}

void BlockPool::incref(int64_t block) {
  const int32_t b = checked_block(block);
  // A free block has no owner to share it with: incref on it would resurrect a block that
  // is still on the free list and could be handed out twice.
  if (ref_counts_[b] == 0) {
    throw std::invalid_argument("incref of free block " + std::to_string(block));
  }
  ++ref_counts_[b];
}

void BlockPool::decref(int64_t block) {
  const int32_t b = checked_block(block);
  if (ref_counts_[b] == 0) {
    throw std::invalid_argument("decref of free block " + std::to_string(block) +
                                " (double free)");
  }
  if (--ref_counts_[b] > 0) return;
  // A cached block stays findable until allocate() needs its memory.
  if (cache_.is_registered(b)) {
    cache_.push_evictable(b);
  } else {
    free_blocks_.push_back(b);
  }
}

int64_t BlockPool::ref_count(int64_t block) const { return ref_counts_[checked_block(block)]; }

bool BlockPool::can_allocate(int64_t n) const {
  if (n < 0) throw std::invalid_argument("can_allocate: n must be >= 0, got " + std::to_string(n));
  return n <= num_free();
}

}  // namespace nudge
