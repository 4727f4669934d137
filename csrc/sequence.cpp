#include "sequence.h"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace nudge {

namespace {

void check_token(int64_t token) {
  // Token ids index an embedding table; a negative id is always a caller bug.
  if (token < 0) throw std::invalid_argument("token ids must be >= 0, got " + std::to_string(token));
}

}  // namespace

Sequence::Sequence(std::shared_ptr<BlockPool> pool) : pool_(std::move(pool)) {
  if (!pool_) throw std::invalid_argument("Sequence needs a BlockPool, got None");
}

Sequence::~Sequence() {
  // decref cannot fail here: every block in the table holds a reference taken by reserve().
  for (auto it = block_table_.rbegin(); it != block_table_.rend(); ++it) {
    try {
      pool_->decref(*it);
    } catch (...) {
      // A destructor must not throw; a broken refcount was already reported elsewhere.
    }
  }
}

void Sequence::append(int64_t token) {
  check_token(token);
  tokens_.push_back(token);
}

void Sequence::append(const std::vector<int64_t>& tokens) {
  for (int64_t t : tokens) check_token(t);  // validate all first: append is all-or-nothing
  tokens_.insert(tokens_.end(), tokens.begin(), tokens.end());
}

void Sequence::set_num_computed(int64_t n) {
  if (n < 0 || n > num_tokens()) {
    throw std::invalid_argument("set_num_computed(" + std::to_string(n) + "): must be in [0, " +
                                std::to_string(num_tokens()) + "] (num_tokens)");
  }
  if (n > num_reserved_slots()) {
    throw std::invalid_argument("set_num_computed(" + std::to_string(n) + "): only " +
                                std::to_string(num_reserved_slots()) +
                                " slots are reserved; reserve() first");
  }
  if (n < num_computed_) invalidate_from(n);
  num_computed_ = n;
  // invalidate_from may have cut shared blocks off the table, and with them computed slots.
  num_computed_ = std::min(num_computed_, num_reserved_slots());
  register_computed_blocks();
}

void Sequence::overwrite(int64_t start, const std::vector<int64_t>& tokens) {
  const int64_t end = start + static_cast<int64_t>(tokens.size());
  if (start < 0 || end > num_tokens()) {
    throw std::invalid_argument("overwrite(" + std::to_string(start) + ", " + std::to_string(tokens.size()) +
                                " tokens): must lie within [0, " + std::to_string(num_tokens()) + ")");
  }
  for (int64_t t : tokens) check_token(t);
  for (size_t i = 0; i < tokens.size(); ++i) tokens_[static_cast<size_t>(start) + i] = tokens[i];
  if (provisional_from_ >= start && provisional_from_ < end) {
    provisional_from_ = end < num_tokens() ? end : kNoProvisional;
    register_computed_blocks();
  }
}

void Sequence::append_provisional(const std::vector<int64_t>& placeholders) {
  if (placeholders.empty()) return;
  provisional_from_ = std::min(provisional_from_, num_tokens());
  append(placeholders);
}

void Sequence::truncate(int64_t n) {
  if (n < 0 || n > num_tokens()) {
    throw std::invalid_argument("truncate(" + std::to_string(n) + "): must be in [0, " +
                                std::to_string(num_tokens()) + "] (num_tokens)");
  }
  tokens_.resize(static_cast<size_t>(n));
  if (provisional_from_ >= n) provisional_from_ = kNoProvisional;
  const int64_t keep = blocks_for_slots(n, block_size());
  // Whole blocks past the end hold valid K/V of their hash: they go back to the pool still cached.
  if (keep < static_cast<int64_t>(block_table_.size())) free_blocks_from(static_cast<size_t>(keep));
  if (num_computed_ > n) {
    invalidate_from(n);
    num_computed_ = std::min(n, num_reserved_slots());
  }
}

int64_t Sequence::blocks_needed(int64_t total_slots) const {
  if (total_slots < 0) {
    throw std::invalid_argument("total_slots must be >= 0, got " + std::to_string(total_slots));
  }
  const int64_t needed = blocks_for_slots(total_slots, block_size()) -
                         static_cast<int64_t>(block_table_.size());
  return needed > 0 ? needed : 0;
}

bool Sequence::reserve(int64_t total_slots) {
  const int64_t needed = blocks_needed(total_slots);
  // Checking first keeps reserve all-or-nothing: allocate() cannot fail after this.
  if (!pool_->can_allocate(needed)) return false;
  block_table_.reserve(block_table_.size() + static_cast<size_t>(needed));
  for (int64_t i = 0; i < needed; ++i) block_table_.push_back(pool_->allocate());
  return true;
}

void Sequence::release() {
  free_blocks_from(0);
  num_computed_ = 0;
}

int64_t Sequence::match_cached_prefix() {
  num_cached_tokens_ = 0;
  if (!pool_->prefix_caching() || !reuse_cached_prefix_ || !block_table_.empty() || num_computed_ != 0) {
    return 0;
  }
  const int64_t bs = block_size();
  const int64_t max_blocks = num_tokens() > 0 ? (num_tokens() - 1) / bs : 0;  // last token stays pending
  for (int64_t i = 0; i < max_blocks; ++i) {
    const int64_t* tokens = tokens_.data() + i * bs;
    const uint64_t parent = parent_hash(static_cast<size_t>(i));
    const uint64_t hash = hash_block_tokens(parent, tokens, bs);
    const int32_t block = pool_->acquire_cached(hash, parent, tokens, bs);
    if (block == kNoBlock) break;
    block_table_.push_back(block);
    block_hashes_.push_back(hash);
  }
  num_computed_ = num_reserved_slots();
  num_cached_tokens_ = num_computed_;
  return num_cached_tokens_;
}

void Sequence::register_computed_blocks() {
  if (!pool_->prefix_caching()) return;
  const int64_t bs = block_size();
  const size_t full = static_cast<size_t>(std::min(num_computed_, provisional_from_) / bs);
  for (size_t i = block_hashes_.size(); i < full; ++i) {
    const int64_t* tokens = tokens_.data() + static_cast<int64_t>(i) * bs;
    const uint64_t parent = parent_hash(i);
    const uint64_t hash = hash_block_tokens(parent, tokens, bs);
    // False when another block holds this prefix already: ours then stays private; the chain
    // still records the hash so the blocks after it can be found.
    pool_->register_block(block_table_[i], hash, parent, tokens, bs);
    block_hashes_.push_back(hash);
  }
}

void Sequence::invalidate_from(int64_t pos) {
  const size_t first = static_cast<size_t>(pos / block_size());
  for (size_t i = first; i < block_hashes_.size() && i < block_table_.size(); ++i) {
    const int32_t block = block_table_[i];
    if (pool_->ref_count(block) > 1) {
      // Shared: never written. It and what follows leave the table; recomputed elsewhere.
      free_blocks_from(i);
      break;
    }
    pool_->unregister_block(block);
  }
  if (block_hashes_.size() > first) block_hashes_.resize(first);
}

void Sequence::free_blocks_from(size_t keep) {
  if (block_hashes_.size() > keep) block_hashes_.resize(keep);
  // From the end: a block table only ever grows and shrinks at its end.
  while (block_table_.size() > keep) {
    pool_->decref(block_table_.back());
    block_table_.pop_back();
  }
}

}  // namespace nudge
