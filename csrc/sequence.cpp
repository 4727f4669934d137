#include "sequence.h"

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
  num_computed_ = n;
}

void Sequence::overwrite(int64_t start, const std::vector<int64_t>& tokens) {
  const int64_t end = start + static_cast<int64_t>(tokens.size());
  if (start < 0 || end > num_tokens()) {
    throw std::invalid_argument("overwrite(" + std::to_string(start) + ", " + std::to_string(tokens.size()) +
                                " tokens): must lie within [0, " + std::to_string(num_tokens()) + ")");
  }
  for (int64_t t : tokens) check_token(t);
  for (size_t i = 0; i < tokens.size(); ++i) tokens_[static_cast<size_t>(start) + i] = tokens[i];
}

void Sequence::truncate(int64_t n) {
  if (n < 0 || n > num_tokens()) {
    throw std::invalid_argument("truncate(" + std::to_string(n) + "): must be in [0, " +
                                std::to_string(num_tokens()) + "] (num_tokens)");
  }
  tokens_.resize(static_cast<size_t>(n));
  if (num_computed_ > n) num_computed_ = n;
  const int64_t keep = blocks_for_slots(n, block_size());
  if (keep < static_cast<int64_t>(block_table_.size())) free_blocks_from(static_cast<size_t>(keep));
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

void Sequence::free_blocks_from(size_t keep) {
  // From the end: a block table only ever grows and shrinks at its end.
  while (block_table_.size() > keep) {
    pool_->decref(block_table_.back());
    block_table_.pop_back();
  }
}

}  // namespace nudge
