// The prefix cache of one BlockPool: full KV blocks found by the hash chain of their tokens, and the
// least-recently-used order of the cached blocks nobody references (they are free, but kept until
// the pool needs them).
#pragma once

#include <cstdint>
#include <list>
#include <unordered_map>
#include <vector>

namespace nudge {

// Parent hash of a sequence's first block. Every pool serves one model, so a block's KV depends
// only on its tokens and on every token before it (its position and context): the chain holds both.
constexpr uint64_t kRootBlockHash = 0x6e75646765000001ULL;

// Hash of a full block: its parent's hash and its token ids (deterministic across runs).
uint64_t hash_block_tokens(uint64_t parent, const int64_t* tokens, int64_t num_tokens);

class PrefixCache {
 public:
  explicit PrefixCache(int64_t num_blocks);

  // The block registered under `hash` whose parent hash and tokens match exactly (a 64-bit hash
  // collision must never hand out a wrong block), or -1.
  int32_t lookup(uint64_t hash, uint64_t parent, const int64_t* tokens, int64_t n) const;
  // Registers `block` under `hash`. False (and no change) when the hash already has a block or
  // the block is already registered: the first writer of a prefix keeps it.
  bool insert(int32_t block, uint64_t hash, uint64_t parent, const int64_t* tokens, int64_t n);
  // Forgets the block's registration (no-op when it has none). Must not be evictable.
  void erase(int32_t block);
  bool is_registered(int32_t block) const { return entries_[block].registered; }

  // Unreferenced registered blocks, least recently used first.
  void push_evictable(int32_t block);    // the block's last reference went away
  void remove_evictable(int32_t block);  // it is referenced again (a cache hit)
  bool is_evictable(int32_t block) const { return entries_[block].evictable; }
  // Takes the least recently used evictable block and forgets its registration; -1 if none.
  int32_t evict_lru();
  // Every evictable block, forgotten (reset).
  std::vector<int32_t> evict_all();

  int64_t num_evictable() const { return static_cast<int64_t>(lru_.size()); }
  int64_t num_registered() const { return static_cast<int64_t>(by_hash_.size()); }

 private:
  struct Entry {
    bool registered = false;
    bool evictable = false;
    uint64_t hash = 0;
    uint64_t parent = 0;
    std::vector<int64_t> tokens;         // exact key, checked on every hit
    std::list<int32_t>::iterator lru_it;  // valid while evictable
  };
  std::vector<Entry> entries_;  // [block]
  std::unordered_map<uint64_t, int32_t> by_hash_;
  std::list<int32_t> lru_;  // front: least recently used
};

}  // namespace nudge
