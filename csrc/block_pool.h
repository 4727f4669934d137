// A fixed set of equally sized KV-cache blocks, handed out by reference count.
#pragma once

#include <cstdint>
#include <vector>

#include "prefix_cache.h"

namespace nudge {

// Padding value of block tables: "no block here".
constexpr int32_t kNoBlock = -1;

// Blocks needed to hold `slots` KV slots (ceiling division).
inline int64_t blocks_for_slots(int64_t slots, int64_t block_size) {
  return (slots + block_size - 1) / block_size;
}

// Reference counts let several sequences share a block (prefix caching). A block is free exactly
// when its count is zero: then it is either on the free list, or, with prefix caching, a cached
// block kept on the cache's LRU list until allocate() needs it (free lists first, then the least
// recently used cached block). num_free() counts both kinds.
class BlockPool {
 public:
  BlockPool(int64_t num_blocks, int64_t block_size, bool enable_prefix_caching = false);

  // Takes a free block with one reference (evicting the LRU cached block when the free list is
  // empty). Throws std::runtime_error when none is free.
  int32_t allocate();
  // Both throw std::invalid_argument for an out-of-range or free block.
  void incref(int64_t block);
  void decref(int64_t block);

  int64_t ref_count(int64_t block) const;
  bool can_allocate(int64_t n) const;
  bool all_free() const { return num_free() == num_blocks(); }

  // Prefix cache (all no-ops / misses when caching is off). A hit takes a reference (a cached
  // block nobody referenced leaves the LRU list); kNoBlock when nothing matches.
  int32_t acquire_cached(uint64_t hash, uint64_t parent, const int64_t* tokens, int64_t n);
  // Registers a referenced, fully computed block; false when the hash has a block already.
  bool register_block(int64_t block, uint64_t hash, uint64_t parent, const int64_t* tokens, int64_t n);
  // Forgets a referenced block's registration: its owner is about to overwrite its slots.
  void unregister_block(int64_t block);
  bool is_cached(int64_t block) const { return cache_.is_registered(checked_block(block)); }
  // Drops every unreferenced cached block from the cache (they stay free). Returns how many.
  int64_t reset_prefix_cache();
  void record_lookup(int64_t query_tokens, int64_t hit_tokens) {
    query_tokens_ += query_tokens;
    hit_tokens_ += hit_tokens;
  }

  bool prefix_caching() const { return prefix_caching_; }
  int64_t num_cached() const { return cache_.num_registered(); }
  int64_t num_evictable() const { return cache_.num_evictable(); }
  int64_t hit_tokens() const { return hit_tokens_; }
  int64_t query_tokens() const { return query_tokens_; }
  int64_t evictions() const { return evictions_; }
  int64_t num_free() const {
    return static_cast<int64_t>(free_blocks_.size()) + cache_.num_evictable();
  }
  int64_t num_blocks() const { return static_cast<int64_t>(ref_counts_.size()); }
  int64_t block_size() const { return block_size_; }

 private:
  // Throws std::invalid_argument unless 0 <= block < num_blocks.
  int32_t checked_block(int64_t block) const;

  int64_t block_size_;
  bool prefix_caching_;
  std::vector<int64_t> ref_counts_;
  PrefixCache cache_;
  int64_t query_tokens_ = 0;  // prompt tokens looked up in the cache
  int64_t hit_tokens_ = 0;    // of those, found
  int64_t evictions_ = 0;     // cached blocks allocate() took back
  // Uncached free blocks, used as a stack: the most recently freed is reused first (warm memory).
  std::vector<int32_t> free_blocks_;
};

}  // namespace nudge
