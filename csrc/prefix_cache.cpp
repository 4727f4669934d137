#include "prefix_cache.h"

#include <stdexcept>

namespace nudge {

namespace {

// splitmix64 finaliser: a cheap, well-mixed 64-bit step.
uint64_t mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

}  // namespace

uint64_t hash_block_tokens(uint64_t parent, const int64_t* tokens, int64_t num_tokens) {
  uint64_t h = mix(parent ^ static_cast<uint64_t>(num_tokens));
  for (int64_t i = 0; i < num_tokens; ++i) h = mix(h ^ static_cast<uint64_t>(tokens[i]));
  return h;
}

PrefixCache::PrefixCache(int64_t num_blocks) : entries_(static_cast<size_t>(num_blocks)) {}

int32_t PrefixCache::lookup(uint64_t hash, uint64_t parent, const int64_t* tokens, int64_t n) const {
  auto it = by_hash_.find(hash);
  if (it == by_hash_.end()) return -1;
  const Entry& e = entries_[it->second];
  if (e.parent != parent || static_cast<int64_t>(e.tokens.size()) != n) return -1;
  for (int64_t i = 0; i < n; ++i) {
    if (e.tokens[i] != tokens[i]) return -1;
  }
  return it->second;
}

bool PrefixCache::insert(int32_t block, uint64_t hash, uint64_t parent, const int64_t* tokens,
                         int64_t n) {
  Entry& e = entries_[block];
  if (e.registered || by_hash_.count(hash)) return false;
  e.registered = true;
  e.hash = hash;
  e.parent = parent;
  e.tokens.assign(tokens, tokens + n);
  by_hash_.emplace(hash, block);
  return true;
}

void PrefixCache::erase(int32_t block) {
  Entry& e = entries_[block];
  if (!e.registered) return;
  if (e.evictable) throw std::logic_error("PrefixCache: erase of an evictable block");
  by_hash_.erase(e.hash);
  e.registered = false;
  e.tokens.clear();
  e.tokens.shrink_to_fit();
}

void PrefixCache::push_evictable(int32_t block) {
  Entry& e = entries_[block];
  if (!e.registered || e.evictable) throw std::logic_error("PrefixCache: bad push_evictable");
  e.lru_it = lru_.insert(lru_.end(), block);
  e.evictable = true;
}

void PrefixCache::remove_evictable(int32_t block) {
  Entry& e = entries_[block];
  if (!e.evictable) throw std::logic_error("PrefixCache: bad remove_evictable");
  lru_.erase(e.lru_it);
  e.evictable = false;
}

int32_t PrefixCache::evict_lru() {
  if (lru_.empty()) return -1;
  const int32_t block = lru_.front();
  remove_evictable(block);
  erase(block);
  return block;
}

std::vector<int32_t> PrefixCache::evict_all() {
  std::vector<int32_t> out;
  for (int32_t b = evict_lru(); b >= 0; b = evict_lru()) out.push_back(b);
  return out;
}

}  // namespace nudge
